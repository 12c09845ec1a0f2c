import os
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One intra-op thread for the tests and the runs they start (inherited through the
# environment): the models are tiny, and on a 2-core machine that is busy with anything
# else OpenMP's spinning threads made runs up to 20x slower (the suite: 3.5 min with one
# thread, 13.6 min with two beside another process). Set OMP_NUM_THREADS to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    # sacred 0.8.7 imports pkg_resources, which setuptools marks as deprecated
    config.addinivalue_line("filterwarnings", "ignore:pkg_resources is deprecated:UserWarning")


def read_key_list(name: str) -> dict:
    """key -> (shape, dtype) from a released-checkpoint key list in tests/data/."""
    layout = {}
    with open(os.path.join(ROOT, "tests", "data", name)) as handle:
        for line in handle:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, dtype = line.rstrip("\n").split("\t")
            layout[key] = (tuple(int(x) for x in shape.strip("()").split(",") if x.strip()), dtype.strip())
    return layout


def resolved_config(*named, **updates) -> dict:
    """run.py's configuration as Sacred resolves it for ``with *named key=value...``
    (named configs in order, then the updates), through the public API: the Run of the
    print_config command (which prints it) holds it."""
    from run import ex

    return dict(ex.run("print_config", config_updates=updates, named_configs=list(named)).config)


def run_folder(run) -> Path:
    """The folder that a finished Sacred ``Run`` (what ``ex.run`` returns) was recorded in:
    its FileStorageObserver's directory (asserts there is exactly one)."""
    from sacred.observers import FileStorageObserver

    folders = [observer.dir for observer in run.observers if isinstance(observer, FileStorageObserver) and observer.dir]
    assert len(folders) == 1, f"the run was recorded in {len(folders)} FileStorageObserver folder(s): {folders}"
    return Path(folders[0])


def run_folders(observer_dir) -> set:
    """The run folders under a FileStorageObserver's directory: every entry but _sources
    (none while the directory does not exist yet)."""
    root = Path(observer_dir)
    return {path for path in root.iterdir() if path.name != "_sources"} if root.is_dir() else set()


def only_run_folder(observer_dir, besides=()) -> Path:
    """The one run folder under ``observer_dir`` (a run started as a subprocess, or one that
    raised before ``ex.run`` could return it), leaving out ``besides`` (the folders of
    earlier runs there); asserts there is exactly one."""
    folders = run_folders(observer_dir) - {Path(folder) for folder in besides}
    assert len(folders) == 1, f"{observer_dir} holds {len(folders)} new run folder(s): {sorted(map(str, folders))}"
    return folders.pop()
