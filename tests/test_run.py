"""End to end: a tiny demo training + evaluation through Sacred, then test_only."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_folder

TINY = {
    "demo_train_images": 48, "demo_eval_images": 12, "max_epoch": 2, "per_gpu_batchsize": 16,
    "eval_batch_size": 16, "progress": False, "swin_depths": [1, 1, 1, 1], "embed_dim": 32,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from run import ex

    tmp = tmp_path_factory.mktemp("e2e")
    updates = dict(TINY, data_root=str(tmp / "data"), observer_dir=str(tmp / "runs"))
    run = ex.run(named_configs=["demo"], config_updates=updates)
    return ex, run, tmp, updates


def test_train_run_records_everything(trained):
    _, run, tmp, _ = trained
    run_dir = run_folder(run)
    for name in ("config.json", "run.json", "metrics.json", "cout.txt", "best.ckpt", "last.ckpt"):
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "COMPLETED"
    result = record["result"]
    expected = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
                "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr"}
    levels = {f"level{k}_{key}" for k in (1, 2, 3) for key in expected}  # per_level=True
    assert set(result) == expected | levels
    assert result["rsum"] == pytest.approx(sum(result[k] for k in expected if "_r" in k and "medr" not in k and "meanr" not in k))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train.loss"]["steps"] == [0, 1]
    assert len(metrics["val.i2t_r1"]["values"]) == 2
    assert metrics["train.lr"]["values"][0] == pytest.approx(5e-4)
    info = json.loads((run_dir / "info.json").read_text())
    assert os.path.samefile(info["checkpoint"], run_dir / "best.ckpt")


def test_test_only_reproduces_the_metrics(trained):
    ex, run, tmp, updates = trained
    checkpoint = run_folder(run) / "best.ckpt"
    again = ex.run(named_configs=["demo"],
                   config_updates=dict(updates, test_only=True, checkpoint=str(checkpoint)))
    assert again.result == run.result  # to the last digit
    assert run_folder(again) != run_folder(run)  # recorded as a run of its own


def test_ensemble_folds_and_feature_cache(trained):
    """ensemble=[a, b] averages the members' level matrices (here one checkpoint scored
    i2t and t2i: HAT (*)), eval_folds adds the 1K-fold protocol, feature_cache re-uses
    the encoded features; checked against the library on the cached features."""
    import torch

    from hat.models.hat.alignment import scan_similarity
    from hat.evaluation import fold_recall, recall
    from hat.models.hat.evaluation import load_features

    ex, run, tmp, updates = trained
    checkpoint = str(run_folder(run) / "best.ckpt")
    cache = tmp / "features"
    ensemble = dict(updates, test_only=True, ensemble=[checkpoint, checkpoint],
                    ensemble_directions=["i2t", "t2i"], eval_folds=3, feature_cache=str(cache))
    first = ex.run(named_configs=["demo"], config_updates=ensemble).result
    files = list(cache.glob("*.features.pt"))
    assert len(files) == 1  # features do not depend on the direction: encoded once
    features = load_features(str(files[0]), "cpu")
    levels = []
    for images, captions in zip(features["images"], features["captions"]):
        both = [scan_similarity(images, captions, features["lengths"], direction=d, lambda_softmax=9.0)
                for d in ("i2t", "t2i")]
        levels.append((both[0] + both[1]) / 2)
    total = levels[0] + levels[1] + levels[2]
    expected = recall(total)
    folds = fold_recall(total, 3)
    for key, value in expected.items():
        assert first[key] == pytest.approx(value, abs=1e-6), key
        assert first[f"folds_{key}"] == pytest.approx(folds[key], abs=1e-6), key
    for k, level in enumerate(levels, start=1):
        assert first[f"level{k}_rsum"] == pytest.approx(recall(level)["rsum"], abs=1e-6)
    assert first["rsum"] != run.result["rsum"] or first["t2i_meanr"] != run.result["t2i_meanr"]
    mtime = files[0].stat().st_mtime_ns
    again = ex.run(named_configs=["demo"], config_updates=ensemble).result
    assert again == first and files[0].stat().st_mtime_ns == mtime  # read, not re-written
    uneven = ex.run(named_configs=["demo"], config_updates=dict(ensemble, eval_folds=5))
    assert "eval_folds=5: 12 images cannot be cut into 5 equal folds" in uneven.captured_out
    assert uneven.result == {k: v for k, v in first.items() if not k.startswith("folds_")}


def test_checkpoint_is_readable_without_sacred(trained):
    from hat.checkpoint import load_checkpoint

    _, run, tmp, _ = trained
    state = load_checkpoint(str(run_folder(run) / "best.ckpt"))
    assert state["config"]["dataset"] == "demo"
    assert state["epoch"] in (1, 2)  # epochs completed
    assert any(key.startswith("image_proj.0") for key in state["model"])


def test_missing_data_root_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "with", f"observer_dir={tmp_path}/runs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "Error" in line]
    assert len(errors) == 1 and "data_root" in errors[0] and "README" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing recorded for a run that never started
