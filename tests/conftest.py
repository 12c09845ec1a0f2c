import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)



def pytest_configure(config):
    # sacred 0.8.7 imports pkg_resources, which setuptools marks as deprecated
    config.addinivalue_line("filterwarnings", "ignore:pkg_resources is deprecated:UserWarning")
