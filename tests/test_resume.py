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
from tests.conftest import ROOT, only_run_folder, run_folders

TINY = ["demo_train_images=64", "demo_eval_images=8", "max_epoch=2", "per_gpu_batchsize=16",
        "eval_batch_size=16", "progress=False", "swin_depths=[1,1,1,1]", "embed_dim=32",
        "checkpoint_every_steps=3", "vse_warmup_epochs=1"]


def command(data_root, observer_dir, *extra):
    return [sys.executable, "run.py", "with", "demo", f"data_root={data_root}",
            f"observer_dir={observer_dir}", *TINY, *extra]


def run(args, timeout=600):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def wait_for_checkpoint(proc, root, accept, timeout=300):
    """Poll until the one run folder under ``root`` (an observer or checkpoint_dir folder
    that the run is the first to write in) holds a last.ckpt for which accept(state) is
    true; (that run folder, the state)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        folder = only_run_folder(root) if run_folders(root) else None
        path = str(folder / "last.ckpt") if folder else None
        if path and os.path.exists(path):
            try:
                state = load_checkpoint(path)
            except CheckpointError:  # replaced while reading
                continue
            if accept(state):
                return folder, state
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
    """An uninterrupted run: its observer folder."""
    observer = tmp_path_factory.mktemp("straight")
    proc = run(command(data_root, observer))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return only_run_folder(observer)


def same_weights(a_path, b_path) -> bool:
    a, b = load_checkpoint(str(a_path))["model"], load_checkpoint(str(b_path))["model"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_mid_epoch_then_resume_is_exact(data_root, straight, tmp_path):
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(command(data_root, killed_dir), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed, state = wait_for_checkpoint(proc, killed_dir, lambda s: s["epoch"] == 1 and s["step"] >= 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < state["step"] < 20  # 64 images x 5 captions / 16 = 20 steps an epoch

    resumed = run(command(data_root, killed_dir, "resume=True"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    again = only_run_folder(killed_dir, besides=[killed])  # the resumed run's folder
    info = json.loads((again / "info.json").read_text())
    assert info["resumed_run"] == int(killed.name) and info["resumed_from"]["epoch"] == 1

    status, result = result_of(again)
    assert status == "COMPLETED"
    assert result == result_of(straight)[1]  # to the last digit
    for name in ("last.ckpt", "best.ckpt"):
        assert same_weights(straight / name, again / name), name
    metrics_a = json.loads((straight / "metrics.json").read_text())
    metrics_b = json.loads((again / "metrics.json").read_text())
    assert metrics_b["train.loss"]["values"] == metrics_a["train.loss"]["values"][1:]


@pytest.fixture(scope="module")
def interrupted(data_root, tmp_path_factory):
    observer = tmp_path_factory.mktemp("sigterm")
    proc = subprocess.Popen(command(data_root, observer), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    run_dir, _ = wait_for_checkpoint(proc, observer, lambda s: s["step"] >= 3)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr, run_dir


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
    killed_checkpoints, _ = wait_for_checkpoint(proc, checkpoints, lambda s: s["epoch"] == 1 and s["step"] >= 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = {path.name: path.read_bytes() for path in killed_checkpoints.iterdir()}
    assert {"last.ckpt", "best.ckpt", "config.json"} <= set(killed)
    killed_run = only_run_folder(observer)
    assert not (killed_run / "last.ckpt").exists()  # checkpoints live in checkpoint_dir only

    resumed = run(command(data_root, observer, f"checkpoint_dir={checkpoints}", "resume=True"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = only_run_folder(observer, besides=[killed_run])  # the resumed run's folder
    info = json.loads((again / "info.json").read_text())
    assert info["resumed_run"] == int(killed_run.name) and info["resumed_from"]["epoch"] == 1
    assert os.path.samefile(info["resumed_from"]["checkpoint"], killed_checkpoints / "last.ckpt")
    assert result_of(again) == ("COMPLETED", result_of(straight)[1])
    resumed_checkpoints = only_run_folder(checkpoints, besides=[killed_checkpoints])  # checkpoint_dir/<its id>
    for name in ("last.ckpt", "best.ckpt"):
        assert same_weights(straight / name, resumed_checkpoints / name), name
    assert {path.name: path.read_bytes() for path in killed_checkpoints.iterdir()} == killed


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
    stopped = start_and_signal_at(args, "epoch 0: validating")
    return (*stopped, observer, only_run_folder(observer), args)


def test_sigterm_during_the_last_validation_ends_interrupted(stopped_in_validation):
    returncode, stdout, stderr, _, run_dir, _ = stopped_in_validation
    assert returncode != 0 and result_of(run_dir) == ("INTERRUPTED", None)
    assert f"SIGTERM at the end of epoch 0; resume with resume_from={run_dir / 'last.ckpt'}" in stderr
    assert "test split" not in stdout  # the test never started
    assert load_checkpoint(str(run_dir / "last.ckpt"))["epoch"] == 1


def test_resumed_run_that_had_finished_training_leaves_a_last_ckpt(stopped_in_validation):
    _, _, _, observer, run_dir, args = stopped_in_validation
    proc = run(args + ["resume=True"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = only_run_folder(observer, besides=[run_dir])  # the resumed run's folder
    assert result_of(again)[0] == "COMPLETED"
    assert load_checkpoint(str(again / "last.ckpt"))["epoch"] == 1
    assert same_weights(run_dir / "last.ckpt", again / "last.ckpt")


def test_sigterm_during_test_only_ends_interrupted_and_writes_nothing(stopped_in_validation, tmp_path):
    _, _, _, _, run_dir, args = stopped_in_validation
    cache = tmp_path / "features"
    cache.mkdir()
    test_args = [a for a in args if not a.startswith("observer_dir=")] + [
        f"observer_dir={tmp_path / 'runs'}", "test_only=True", f"checkpoint={run_dir / 'last.ckpt'}",
        f"feature_cache={cache}"]
    returncode, stdout, stderr = start_and_signal_at(test_args, "testing ")
    assert returncode != 0
    assert result_of(only_run_folder(tmp_path / "runs")) == ("INTERRUPTED", None)
    assert "SIGTERM: stopped at once; nothing half-written was left" in stderr
    assert "R@1" not in stdout and list(cache.iterdir()) == []
