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


@pytest.fixture(scope="module")
def straight(data_root, tmp_path_factory):
    """An uninterrupted run: the observer folder of run 1."""
    observer = tmp_path_factory.mktemp("straight")
    proc = run(command(data_root, observer))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return observer / "1"


def same_weights(a_path, b_path) -> bool:
    a, b = load_checkpoint(str(a_path))["model"], load_checkpoint(str(b_path))["model"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_mid_epoch_then_resume_is_exact(data_root, straight, tmp_path):
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
    assert result == result_of(straight)[1]  # to the last digit
    for name in ("last.ckpt", "best.ckpt"):
        assert same_weights(straight / name, killed_dir / "2" / name), name
    metrics_a = json.loads((straight / "metrics.json").read_text())
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


def test_resume_with_checkpoint_dir_continues_the_killed_run(data_root, straight, tmp_path):
    """Each run's checkpoints go to checkpoint_dir/<run id>/; resume=True finds the killed
    run's last.ckpt there, continues it exactly and leaves its files as they were."""
    observer, checkpoints = tmp_path / "runs", tmp_path / "checkpoints"
    proc = subprocess.Popen(command(data_root, observer, f"checkpoint_dir={checkpoints}"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(proc, checkpoints / "1" / "last.ckpt", lambda s: s["epoch"] == 1 and s["step"] >= 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = {path.name: path.read_bytes() for path in (checkpoints / "1").iterdir()}
    assert {"last.ckpt", "best.ckpt", "config.json"} <= set(killed)
    assert not (observer / "1" / "last.ckpt").exists()  # checkpoints live in checkpoint_dir only

    resumed = run(command(data_root, observer, f"checkpoint_dir={checkpoints}", "resume=True"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    info = json.loads((observer / "2" / "info.json").read_text())
    assert info["resumed_run"] == 1 and info["resumed_from"]["epoch"] == 1
    assert os.path.samefile(info["resumed_from"]["checkpoint"], checkpoints / "1" / "last.ckpt")
    assert result_of(observer / "2") == ("COMPLETED", result_of(straight)[1])
    for name in ("last.ckpt", "best.ckpt"):
        assert same_weights(straight / name, checkpoints / "2" / name), name
    assert {path.name: path.read_bytes() for path in (checkpoints / "1").iterdir()} == killed


def test_unrecorded_runs_never_share_a_checkpoint_folder(tmp_path):
    from hat.run_folders import checkpoint_folder, find_resumable

    config = {"exp_name": "x", "checkpoint_dir": None, "observer_dir": None, "seed": 1, "resume": False,
              "resume_from": None, "progress": True}
    os.chdir(tmp_path)  # unrecorded runs without checkpoint_dir: ./checkpoints/<exp_name>/
    try:
        first, second = checkpoint_folder(config, None, None), checkpoint_folder(config, None, None)
        assert first != second and os.path.dirname(first) == os.path.dirname(second) == "checkpoints/x"
        for folder in (first, second):
            torch.save({}, os.path.join(folder, "last.ckpt"))
        newest = time.time_ns() + 10**12
        os.utime(os.path.join(first, "last.ckpt"), ns=(newest, newest))  # written last
        assert find_resumable(dict(config, resume=True)) == (first, os.path.join(first, "last.ckpt"))
        assert find_resumable(dict(config, seed=2)) is None  # another configuration
        assert find_resumable(config, exclude=[first]) == (second, os.path.join(second, "last.ckpt"))
    finally:
        os.chdir(ROOT)


@pytest.fixture(scope="module")
def slow_eval_root(tmp_path_factory):
    """Demo data with larger val/test splits, so that evaluation lasts long enough to be
    interrupted."""
    from datamodules.demo import ensure_demo_data

    return ensure_demo_data(str(tmp_path_factory.mktemp("demo60")), train_images=32, eval_images=60)


def start_and_signal_at(args, marker: str):
    """Start the run, send SIGTERM as soon as it prints ``marker``; (status, stdout, stderr)."""
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + stdout, stderr


@pytest.fixture(scope="module")
def stopped_in_validation(slow_eval_root, tmp_path_factory):
    observer = tmp_path_factory.mktemp("sigterm-val")
    args = command(slow_eval_root, observer, "demo_train_images=32", "demo_eval_images=60", "max_epoch=1")
    return (*start_and_signal_at(args, "epoch 0: validating"), observer, args)


def test_sigterm_during_the_last_validation_ends_interrupted(stopped_in_validation):
    returncode, stdout, stderr, observer, _ = stopped_in_validation
    assert returncode != 0 and result_of(observer / "1") == ("INTERRUPTED", None)
    assert f"SIGTERM at the end of epoch 0; resume with resume_from={observer / '1' / 'last.ckpt'}" in stderr
    assert "test split" not in stdout  # the test never started
    assert load_checkpoint(str(observer / "1" / "last.ckpt"))["epoch"] == 1


def test_resumed_run_that_had_finished_training_leaves_a_last_ckpt(stopped_in_validation):
    _, _, _, observer, args = stopped_in_validation
    proc = run(args + ["resume=True"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result_of(observer / "2")[0] == "COMPLETED"
    assert load_checkpoint(str(observer / "2" / "last.ckpt"))["epoch"] == 1
    assert same_weights(observer / "1" / "last.ckpt", observer / "2" / "last.ckpt")


def test_sigterm_during_test_only_ends_interrupted_and_writes_nothing(stopped_in_validation, tmp_path):
    _, _, _, observer, args = stopped_in_validation
    cache = tmp_path / "features"
    cache.mkdir()
    test_args = [a for a in args if not a.startswith("observer_dir=")] + [
        f"observer_dir={tmp_path / 'runs'}", "test_only=True", f"checkpoint={observer / '1' / 'last.ckpt'}",
        f"feature_cache={cache}"]
    returncode, stdout, stderr = start_and_signal_at(test_args, "testing ")
    assert returncode != 0
    assert result_of(tmp_path / "runs" / "1") == ("INTERRUPTED", None)
    assert "SIGTERM: stopped at once; nothing half-written was left" in stderr
    assert "R@1" not in stdout and list(cache.iterdir()) == []
