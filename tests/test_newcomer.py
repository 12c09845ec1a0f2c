"""What a new user meets first: a data set smaller than one batch, a device the machine
lacks, the noise at the start of every command, what a run leaves in the checkout."""
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


@pytest.mark.parametrize("model, extra, message", [
    ("hat", [], "the training split has 50 captions, fewer than one batch of 64: set per_gpu_batchsize to at most "
                "50, or train on more data (demo_train_images)"),
    ("multisea", ["per_gpu_batchsize=16"], "the training split has 10 images, fewer than one batch of 64: set "
                                           "batch_size (and per_gpu_batchsize) to at most 10, or train on more "
                                           "data (demo_train_images)"),
])
def test_a_training_set_smaller_than_one_batch_is_one_line_naming_the_keys(tmp_path, model, extra, message):
    proc = subprocess.run([sys.executable, "run.py", "-u", "with", "demo", f"model={model}", "demo_train_images=10",
                           "demo_eval_images=4", f"data_root={tmp_path / 'data'}", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if "Error" in line] == [f"UsageError: {message}"]


def test_load_model_on_a_device_this_machine_lacks_is_one_line(tmp_path):
    import hat

    if torch.cuda.is_available():
        device, message = f"cuda:{torch.cuda.device_count()}", "CUDA device(s)"
    else:
        device, message = "cuda", "device=cuda: this machine has no usable CUDA device"
    with pytest.raises(ValueError, match=message):
        hat.load_model(str(tmp_path / "never-read.ckpt"), device=device)
    with pytest.raises(ValueError, match=r"^device='gpu' is not valid; allowed: cpu, cuda or cuda:N$"):
        hat.load_model(str(tmp_path / "never-read.ckpt"), device="gpu")


def test_commands_start_without_warnings_and_with_workers_the_machine_has():
    proc = subprocess.run([sys.executable, "run.py", "print_config"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pkg_resources" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-2000:]
    from hat.defaults import default_config

    assert default_config("hat", "f30k")["num_workers"] == min(8, os.cpu_count() or 1)
    assert default_config("hat", "demo")["num_workers"] == 0


def test_what_runs_write_is_not_tracked_by_git():
    if subprocess.run(["git", "-C", ROOT, "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    paths = ["runs/1/best.ckpt", "features/best-test-0123.features.pt", "checkpoints/hat_f30k/1/last.ckpt",
             "sub/runs/2/cout.txt", "elsewhere.ckpt"]
    ignored = subprocess.run(["git", "-C", ROOT, "check-ignore", *paths], capture_output=True, text=True).stdout
    assert ignored.split() == paths
    kept = subprocess.run(["git", "-C", ROOT, "check-ignore", "hat/runs.py", "tests/data/hat_state_dict.txt"],
                          capture_output=True, text=True).stdout
    assert kept == ""
