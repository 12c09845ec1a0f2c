import os
import sys

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
