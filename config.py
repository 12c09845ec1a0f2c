"""The experiment and its configuration: HAT on Flickr30K by default.

Selectors pick the recipe: ``model`` (a registered model: hat | multisea), ``dataset``
(f30k | coco | demo) and ``demo_recipe`` (the demo's small models). The named configs only
set them (``with multisea``, ``with coco_config``, ``with flickr``, ``with demo``), so they
compose in any order and with any key: ``python run.py with multisea coco_config
per_gpu_batchsize=16``.

The runner's keys, shared by every model, are in ``hat/defaults.py``. Each model's own keys
and its recipe live next to the model (``hat/models/<name>/plugin.py``) and exist only
when that model is selected: ``print_config with multisea`` shows no HAT key, and a HAT
key given with ``with multisea`` is refused. Anything given on the command line wins.
"""
import glob
import importlib.metadata
import os
import subprocess

import hat.models  # noqa: F401, I001  (registers the built-in models; first: hat silences sacred's pkg_resources warning)
from sacred import Experiment
from sacred.host_info import host_info_gatherer

from hat.defaults import demo_defaults, runner_defaults
from hat.plugins import on_register

ROOT = os.path.dirname(os.path.abspath(__file__))


@host_info_gatherer("git")
def git_state():
    """The checkout's commit and whether it has uncommitted changes (None outside git)."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30)

    try:
        commit = git("rev-parse", "HEAD")
        if commit.returncode != 0:
            return None
        return {"commit": commit.stdout.strip(), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")
                                                              .stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


# the commit (run.json host.git) comes from one git call per run: Sacred's own git
# recording would ask git about every source file at start-up
ex = Experiment("HAT", save_git_info=False, additional_host_info=[git_state])
for _path in ["run.py", *sorted(glob.glob("hat/**/*.py", root_dir=ROOT, recursive=True)),
              *sorted(glob.glob("datamodules/**/*.py", root_dir=ROOT, recursive=True))]:
    ex.add_source_file(os.path.join(ROOT, _path))  # the project's code, stored with every run
for _package in ("torch", "torchvision", "timm", "transformers", "pyarrow", "numpy", "sacred", "pillow"):
    try:
        ex.add_package_dependency(_package, importlib.metadata.version(_package))
    except importlib.metadata.PackageNotFoundError:
        pass
ex.config(runner_defaults)

_SCOPES = set()


def _add_model_config(plugin) -> None:
    """Each registered model's config function becomes a config scope of the experiment
    (once per name); its keys exist only when that model is selected."""
    if plugin.config is not None and plugin.name not in _SCOPES:
        _SCOPES.add(plugin.name)
        ex.config(plugin.config)


on_register(_add_model_config)
ex.config(demo_defaults)  # after the models' scopes: the demo's shared settings win


# Named configs only set selectors (and what goes with them), so they compose in any order;
# of two dataset configs the last one named wins.
NAMED_CONFIGS = {
    "flickr": {"dataset": "f30k"},  # Flickr30K (the default): Karpathy 1K test
    # MSCOCO (train = train + restval, Karpathy 5K test) and the 1K protocol (5 folds) next to it
    "coco_config": {"dataset": "coco", "eval_folds": 5},
    "multisea": {"model": "multisea"},  # CLIP ViT-B/16 + RoBERTa-base, AFormer, ITC + ITM, re-rank
    "t2i": {"direction": "t2i"},  # HAT (t-i): words attend to regions, in training and at test time
    "demo": {"dataset": "demo", "demo_recipe": True},  # the embedded demo: with demo, with multisea demo
}
for _name, _values in NAMED_CONFIGS.items():
    ex.add_named_config(_name, _values)
