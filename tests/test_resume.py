"""Long runs that survive: exact resume after SIGKILL, SIGTERM, truncated checkpoints."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hat.checkpoint import CheckpointError, load_checkpoint
from tests.conftest import ROOT

TINY = ["demo_train_images=64", "demo_eval_images=8", "max_epoch=2", "per_gpu_batchsize=16",
        "eval_batch_size=16", "progress=False", "swin_depths=[1,1,1,1]", "embed_dim=32",
        "checkpoint_every_steps=3", "vse_warmup_epochs=1"]


def command(data_root, observer_dir, *extra):
    return [sys.executable, "run.py", "with", "demo", f"data_root={data_root}",
            f"observer_dir={observer_dir}", *TINY, *extra]


def run(args, timeout=600):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def wait_for_checkpoint(proc, path, accept, timeout=300):
    """Poll until ``path`` holds a checkpoint for which accept(state) is true."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if os.path.exists(path):
            try:
                state = load_checkpoint(path)
            except CheckpointError:  # replaced while reading
                continue
            if accept(state):
                return state
        time.sleep(0.02)
    raise AssertionError("no checkpoint in time")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from datamodules.demo import ensure_demo_data

    return ensure_demo_data(str(tmp_path_factory.mktemp("demo")), train_images=64, eval_images=8)


def result_of(run_dir):
    record = json.loads((run_dir / "run.json").read_text())
    return record["status"], record.get("result")


def test_sigkill_mid_epoch_then_resume_is_exact(data_root, tmp_path):
    straight = run(command(data_root, tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(command(data_root, killed_dir), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = wait_for_checkpoint(proc, killed_dir / "1" / "last.ckpt",
                                lambda s: s["epoch"] == 1 and s["step"] >= 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < state["step"] < 20  # 64 images x 5 captions / 16 = 20 steps an epoch

    resumed = run(command(data_root, killed_dir, "resume=True"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    info = json.loads((killed_dir / "2" / "info.json").read_text())
    assert info["resumed_run"] == 1 and info["resumed_from"]["epoch"] == 1

    status, result = result_of(killed_dir / "2")
    assert status == "COMPLETED"
    assert result == result_of(tmp_path / "straight" / "1")[1]  # to the last digit
    for name in ("last.ckpt", "best.ckpt"):
        a = load_checkpoint(str(tmp_path / "straight" / "1" / name))["model"]
        b = load_checkpoint(str(killed_dir / "2" / name))["model"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    metrics_a = json.loads((tmp_path / "straight" / "1" / "metrics.json").read_text())
    metrics_b = json.loads((killed_dir / "2" / "metrics.json").read_text())
    assert metrics_b["train.loss"]["values"] == metrics_a["train.loss"]["values"][1:]


@pytest.fixture(scope="module")
def interrupted(data_root, tmp_path_factory):
    observer = tmp_path_factory.mktemp("sigterm")
    proc = subprocess.Popen(command(data_root, observer), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, observer / "1" / "last.ckpt", lambda s: s["step"] >= 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr, observer / "1"


def test_sigterm_writes_last_and_marks_interrupted(interrupted):
    returncode, stderr, run_dir = interrupted
    assert returncode != 0
    assert result_of(run_dir)[0] == "INTERRUPTED"
    assert "SIGTERM at epoch" in stderr and "resume_from=" in stderr
    state = load_checkpoint(str(run_dir / "last.ckpt"))
    assert state["step"] >= 3 and "rng" in state and state["optimizer"] is not None


def test_truncated_checkpoint_is_refused_and_previous_still_loads(interrupted, data_root, tmp_path):
    _, _, run_dir = interrupted
    good = run_dir / "last.ckpt"
    bad = tmp_path / "last.ckpt"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    proc = run(command(data_root, tmp_path / "runs", f"resume_from={bad}"))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "Error" in line]
    assert len(lines) == 1 and f"checkpoint={bad} cannot be read" in lines[0], proc.stderr[-2000:]
    assert load_checkpoint(str(good))["step"] >= 3
