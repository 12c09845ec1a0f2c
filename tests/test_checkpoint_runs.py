"""Runs that start from a checkpoint: test_only evaluates it as it was trained (its
recorded configuration), checkpoint= without test_only fine-tunes from it; and what a run
records (one folder with -F, the commit, the versions, readable output)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from hat.checkpoint import load_checkpoint
from tests.conftest import ROOT, only_run_folder, run_folder

TINY = {"demo_train_images": 48, "demo_eval_images": 12, "max_epoch": 1, "per_gpu_batchsize": 16,
        "eval_batch_size": 16, "progress": False, "swin_depths": [1, 1, 1, 1], "embed_dim": 32}


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A demo HAT trained with non-default keys: t2i, a smaller demo, a tiny Swin."""
    from run import ex

    tmp = tmp_path_factory.mktemp("trained")
    run = ex.run(named_configs=["demo", "t2i"],
                 config_updates=dict(TINY, data_root=str(tmp / "data"), observer_dir=str(tmp / "runs")))
    return run, str(run_folder(run) / "best.ckpt"), str(tmp / "data"), tmp


def test_test_only_takes_the_recorded_configuration(trained, tmp_path):
    from run import ex

    run, checkpoint, data_root, _ = trained
    # no `with demo t2i`, no sizes, no architecture keys: all of them come from the checkpoint
    again = ex.run(config_updates={"data_root": data_root, "test_only": True, "checkpoint": checkpoint,
                                   "observer_dir": str(tmp_path / "runs")})
    assert again.result == run.result  # to the last digit
    assert (again.config["direction"], again.config["demo_eval_images"], again.config["swin_depths"]) == (
        "t2i", 12, [1, 1, 1, 1])
    # a scoring key given on the command line (even the default value) wins, with a note
    proc = cli("with", f"data_root={data_root}", "test_only=True", f"checkpoint={checkpoint}", "direction=i2t",
               f"observer_dir={tmp_path}/cli")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"note: scoring checkpoint={checkpoint} with direction='i2t'; it was trained with direction='t2i'" \
        in proc.stdout
    config = json.loads((only_run_folder(tmp_path / "cli") / "config.json").read_text())
    assert (config["direction"], config["demo_eval_images"]) == ("i2t", 12)


def test_a_conflicting_architecture_key_is_refused_in_one_line(trained, tmp_path):
    _, checkpoint, data_root, _ = trained
    proc = cli("with", f"data_root={data_root}", "test_only=True", f"checkpoint={checkpoint}", "embed_dim=64",
               f"observer_dir={tmp_path}/runs")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ConfigError: embed_dim=64 conflicts with checkpoint={checkpoint}, trained with embed_dim=32; leave "
        f"embed_dim out to evaluate the checkpoint as trained")
    proc = cli("with", "multisea", f"data_root={data_root}", "test_only=True", f"checkpoint={checkpoint}",
               f"observer_dir={tmp_path}/runs")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("ConfigError: model='multisea' conflicts with checkpoint=")
    assert not (tmp_path / "runs").exists()


def test_checkpoint_without_test_only_fine_tunes_from_it(trained, tmp_path):
    from run import ex

    _, checkpoint, data_root, _ = trained
    run = ex.run(named_configs=["demo"], config_updates=dict(
        TINY, data_root=data_root, observer_dir=str(tmp_path / "runs"), checkpoint=checkpoint, learning_rate=0.0))
    info = json.loads((run_folder(run) / "info.json").read_text())
    assert info["initialized_from"]["checkpoint"] == os.path.abspath(checkpoint)
    assert info["initialized_from"]["format"] == "hat-toolkit"
    assert f"initialised the model from checkpoint={checkpoint}" in run.captured_out
    start, after = load_checkpoint(checkpoint)["model"], load_checkpoint(str(run_folder(run) / "last.ckpt"))["model"]
    assert start.keys() == after.keys() and all(torch.equal(start[k], after[k]) for k in start)  # lr 0: unchanged


def test_file_observer_records_once_with_commit_versions_and_readable_output(trained, tmp_path):
    _, _, data_root, _ = trained
    proc = cli("-F", str(tmp_path / "F"), "with", "demo", f"data_root={data_root}", "demo_train_images=48",
               "demo_eval_images=12", "max_epoch=1", "per_gpu_batchsize=16", "eval_batch_size=16",
               "swin_depths=[1,1,1,1]", "embed_dim=32", f"observer_dir={tmp_path}/runs", "progress=True")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = only_run_folder(tmp_path / "F")  # one run folder, beside _sources
    assert sorted(os.listdir(tmp_path / "F")) == sorted([run_dir.name, "_sources"]) and not (tmp_path / "runs").exists()
    assert {"best.ckpt", "last.ckpt", "run.json", "cout.txt"} <= set(os.listdir(run_dir))  # checkpoints there
    record = json.loads((run_dir / "run.json").read_text())
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:  # a git checkout
        assert record["host"]["git"]["commit"] == commit.stdout.strip()
    versions = dict(d.split("==") for d in record["experiment"]["dependencies"])
    assert versions["torch"] == torch.__version__.split("+")[0] and {"timm", "transformers", "pyarrow", "numpy", "torchvision"} <= set(versions)
    sources = {name for name, _ in record["experiment"]["sources"]}
    assert {"run.py", "hat/loop.py", "hat/models/hat/model.py", "datamodules/arrow.py"} <= sources
    cout = (run_dir / "cout.txt").read_text()
    assert "\r" not in cout and "it/s]" not in cout
    lines = re.findall(r"^epoch 0: (\d+)% \((\d+)/15\), loss=\d+\.\d{3}$", cout, flags=re.M)
    assert len(lines) == 10 and lines[-1] == ("100", "15")  # a plain line every tenth of the epoch


def test_unknown_key_names_the_closest(tmp_path):
    proc = cli("with", "max_epochs=3", f"observer_dir={tmp_path}/runs")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "ConfigError: unknown config key max_epochs; did you mean max_epoch? (python run.py print_config lists "
        "the keys)")
    proc = cli("with", "multisea", "margin=0.3", f"observer_dir={tmp_path}/runs")
    assert proc.stderr.strip().splitlines()[-1] == (
        "ConfigError: margin is a key of model=hat, not of model=multisea; leave it out")
