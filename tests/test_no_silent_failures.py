"""No silent wrong results and no lost work, through the runner: broken weights and
diverged training are refused in one line instead of reporting a recall, the feature
cache follows the test files, a full disk keeps the earlier files."""
import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, only_run_folder, resolved_config

TINY = {"demo_train_images": 64, "demo_eval_images": 8, "max_epoch": 2, "per_gpu_batchsize": 16,
        "eval_batch_size": 16, "progress": False, "swin_depths": [1, 1, 1, 1], "embed_dim": 32}


def command_line(updates: dict) -> list[str]:
    return [sys.executable, "run.py", "with", "demo",
            *(f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
              for key, value in updates.items())]


def run_cli(updates: dict, **kwargs):
    return subprocess.run(command_line(updates), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          **kwargs)


def the_error_line(proc) -> str:
    """The one line that says what went wrong (exit status 1, no traceback)."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "Error" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def status_of(observer_dir) -> list[str]:
    return [json.loads((run / "run.json").read_text())["status"]
            for run in sorted(observer_dir.iterdir()) if (run / "run.json").is_file()]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from datamodules.demo import ensure_demo_data

    return ensure_demo_data(str(tmp_path_factory.mktemp("demo")), TINY["demo_train_images"],
                            TINY["demo_eval_images"])


def make_checkpoint(path, data_root, change=None) -> str:
    """An untrained tiny demo HAT written as a project checkpoint (``change`` edits the
    model first)."""
    from hat.checkpoint import save_checkpoint
    from hat.plugins import get_plugin

    config = resolved_config("demo", **dict(TINY, data_root=data_root))
    torch.manual_seed(0)
    model = get_plugin("hat")(config).build(pretrained=True)
    if change is not None:
        with torch.no_grad():
            change(model)
    return save_checkpoint(str(path), model, config=config)


def test_checkpoint_with_a_nan_tensor_is_refused(data_root, tmp_path):
    def one_nan(model):
        model.text_proj[1].weight[3, 5] = float("nan")

    checkpoint = make_checkpoint(tmp_path / "nan.ckpt", data_root, one_nan)
    proc = run_cli(dict(TINY, data_root=data_root, observer_dir=str(tmp_path / "runs"), test_only=True,
                        checkpoint=checkpoint))
    assert the_error_line(proc) == (f"UsageError: checkpoint={checkpoint} holds NaN/infinite weights in 1 "
                                    f"parameter(s) (first: text_proj.1.weight): the run that wrote it "
                                    f"diverged or the file is corrupted; use an earlier checkpoint")
    assert "R@1" not in proc.stdout and status_of(tmp_path / "runs") == ["FAILED"]


def test_weights_that_overflow_to_nan_scores_give_no_recall(data_root, tmp_path):
    def overflow(model):  # finite weights whose products overflow: +inf - inf = NaN
        for projection in model.image_proj:
            projection.weight.mul_(3e38)

    checkpoint = make_checkpoint(tmp_path / "huge.ckpt", data_root, overflow)
    proc = run_cli(dict(TINY, data_root=data_root, observer_dir=str(tmp_path / "runs"), test_only=True,
                        checkpoint=checkpoint))
    assert the_error_line(proc) == (
        f"UsageError: test split, checkpoint {checkpoint}: 320 NaN and 0 infinite scores of 320; its "
        f"weights are broken (a run that diverged or a corrupted file): evaluate another checkpoint")
    assert "rsum" not in proc.stdout and status_of(tmp_path / "runs") == ["FAILED"]


def test_diverged_training_stops_at_validation_and_saves_no_best(tmp_path):
    # 4 images x 5 captions = one step of 16 per epoch; at this learning rate the
    # weights overflow in that step (its loss was still finite)
    observer = tmp_path / "runs"
    proc = run_cli(dict(TINY, data_root=str(tmp_path / "data"), observer_dir=str(observer),
                        demo_train_images=4, learning_rate=1e9, vse_warmup_epochs=0))
    assert the_error_line(proc) == (
        "UsageError: val split at epoch 0, the model being trained: 320 NaN and 0 infinite scores of 320; "
        "the training diverged (no good checkpoint: none was written before the step that diverged): lower "
        "learning_rate")
    assert status_of(observer) == ["FAILED"] and not (only_run_folder(observer) / "best.ckpt").exists()


def test_feature_cache_follows_a_replaced_test_file(data_root, tmp_path):
    """The cache key holds the test files' identity: a test file replaced at the same
    path is encoded again, and the result equals a run without the cache."""
    import shutil

    from datamodules.demo import ensure_demo_data
    from run import ex

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    checkpoint = make_checkpoint(tmp_path / "best.ckpt", str(root))
    cache = tmp_path / "features"
    updates = dict(TINY, data_root=str(root), observer_dir=str(tmp_path / "runs"), test_only=True,
                   checkpoint=checkpoint)
    before = ex.run(named_configs=["demo"], config_updates=dict(updates, feature_cache=str(cache))).result
    other = ensure_demo_data(str(tmp_path / "other"), TINY["demo_train_images"], TINY["demo_eval_images"],
                             seed=1)  # the same sizes, other pictures and captions
    shutil.copyfile(os.path.join(other, "demo_caption_test.arrow"), root / "demo_caption_test.arrow")
    cached = ex.run(named_configs=["demo"], config_updates=dict(updates, feature_cache=str(cache))).result
    plain = ex.run(named_configs=["demo"], config_updates=updates).result
    assert cached == plain and cached != before
    assert len(list(cache.glob("*.features.pt"))) == 2 and not list(cache.glob("*.tmp*"))


def test_full_disk_while_saving_is_one_line_and_leaves_no_partial_file(data_root, tmp_path):
    """A file size limit makes every write past 20 MB fail (EFBIG), as a full disk would."""
    limit = 20 * 2**20

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    checkpoints = tmp_path / "checkpoints"
    proc = run_cli(dict(TINY, data_root=data_root, observer_dir=str(tmp_path / "runs"),
                        checkpoint_dir=str(checkpoints), checkpoint_every_steps=2), preexec_fn=small_disk)
    line = the_error_line(proc)
    folder = only_run_folder(checkpoints)  # checkpoint_dir/<run id>
    assert line.startswith(f"UsageError: could not write checkpoint {folder / 'last.ckpt'} (")
    assert line.endswith("); the file there before (if any) is unchanged: free disk space there or set "
                         "checkpoint_dir=/a/folder/with/space")
    assert sorted(os.listdir(folder)) == ["config.json"]  # no partial or temporary checkpoint
    assert status_of(tmp_path / "runs") == ["FAILED"]
