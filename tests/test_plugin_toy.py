"""A third model, defined in tests/toy_model.py and registered through the plug-in
interface alone, trains and evaluates through the runner (run.py and hat/loop.py know
nothing of it)."""
import json

import pytest

from hat.evaluation import METRIC_KEYS
from hat.plugins import model_names
from tests.conftest import resolved_config, run_folder
from tests.toy_model import registered_toy


def test_toy_model_trains_an_epoch_and_evaluates_through_the_runner(tmp_path):
    from run import ex

    updates = {"model": "toy", "data_root": str(tmp_path / "data"), "observer_dir": str(tmp_path / "runs"),
               "demo_train_images": 48, "demo_eval_images": 12, "eval_batch_size": 16, "progress": False,
               "log_every_steps": 1, "eval_folds": 3}
    with registered_toy():
        config = resolved_config("demo", **updates)
        assert (config["toy_dim"], config["per_gpu_batchsize"], config["image_size"]) == (16, 16, 64)
        assert "level_pairs" not in config and "queue_size" not in config  # other models' keys
        run = ex.run(named_configs=["demo"], config_updates=updates)
        run_dir = run_folder(run)
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == "COMPLETED"
        assert set(METRIC_KEYS) | {f"folds_{k}" for k in METRIC_KEYS} <= set(record["result"])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        losses = metrics["train.step_loss"]["values"]
        assert len(losses) == 48 * 5 // 16 and losses[-1] < losses[0]  # it learnt from its loss
        assert metrics["val.rsum"]["steps"] == [0]
        # the plug-in's other losses are logged beside the loss, per step and per epoch
        positives = metrics["train.step_mean_positive"]["values"]
        assert len(positives) == len(losses) and positives[-1] > positives[0]
        assert metrics["train.mean_positive"]["values"] == [pytest.approx(sum(positives) / len(positives))]
        again = ex.run(named_configs=["demo"],
                       config_updates=dict(updates, test_only=True, checkpoint=str(run_dir / "best.ckpt")))
        assert again.result == run.result  # to the last digit
        assert again.info["checkpoint_format"] == "hat-toolkit"
    assert "toy" not in model_names()
