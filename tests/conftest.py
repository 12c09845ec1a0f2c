import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)



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
