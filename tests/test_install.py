"""The project installs as a package: after `pip install .`, hat and datamodules import
from any directory, from the installed copy."""
import os
import shutil
import subprocess
import sys
import venv

from tests.conftest import ROOT


def test_pip_install_makes_hat_importable_anywhere(tmp_path):
    # a fresh environment that sees this environment's dependencies (torch & co. are large)
    # through a .pth of plain paths (no .pth in them runs, so this checkout's editable
    # install stays out of it)
    import site
    import sysconfig

    env_dir = tmp_path / "env"
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    target_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    ours = [path for path in dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
            if os.path.isdir(path)]
    with open(os.path.join(target_site, "dependencies.pth"), "w") as handle:
        handle.write("\n".join(ours) + "\n")
    source = tmp_path / "source"  # a copy: building in place would leave build/ in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "hat", "datamodules"):
        copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy
        copy(os.path.join(ROOT, name), source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                         if copy is shutil.copytree else {}))
    # the wheel is built here, with the setuptools this environment installed from
    # requirements.txt (no download); installing a wheel needs no build backend there
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--disable-pip-version-check", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("hat_retrieval-*.whl")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
                              "--disable-pip-version-check", str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([python, "-c", "import hat, datamodules; print(hat.__file__); print(datamodules.__file__);"
                            "print(callable(hat.load_model))"],
                           cwd=elsewhere, capture_output=True, text=True, timeout=300, env=env)
    assert probe.returncode == 0, probe.stderr[-2000:]
    hat_file, datamodules_file, loader = probe.stdout.split()
    site = str(env_dir)
    assert hat_file.startswith(site) and datamodules_file.startswith(site)  # the installed copy
    assert loader == "True"
