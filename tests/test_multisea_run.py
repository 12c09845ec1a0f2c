"""Multi-SEA through the runner: the named configs compose, a tiny demo trains and
evaluates as a recorded Sacred run, and test_only reproduces it to the last digit."""
import json

import pytest

from tests.conftest import resolved_config, run_folder

TINY = {
    "demo_train_images": 48, "demo_eval_images": 12, "max_epoch": 2, "batch_size": 16,
    "per_gpu_batchsize": 8, "eval_batch_size": 16, "progress": False, "vision_depth": 2,
    "embed_dim": 32, "fusion_heads": 2, "fusion_layers": 2, "queue_size": 32, "top_k": 8,
    "image_backbone_kwargs": {"patch_size": 16, "embed_dim": 32, "num_heads": 2},
}


config_of = resolved_config


@pytest.mark.parametrize("order", [("multisea", "coco_config"), ("coco_config", "multisea")])
def test_multisea_composes_with_the_dataset_configs(order):
    c = config_of(*order)
    assert (c["model"], c["dataset"], c["exp_name"]) == ("multisea", "coco", "multisea_coco")
    recipe = {"learning_rate": 1e-5, "encoder_lr": 1e-6, "alpha_lr": 1e-4, "temp_lr": 5e-4,
              "weight_decay": 0.05, "adam_betas": [0.9, 0.98], "warmup_ratio": 0.15, "num_cycles": 0.3,
              "batch_size": 500, "per_gpu_batchsize": 20, "clip_norm": 1.0, "max_text_len": 40,
              "image_transform": "clip", "image_size": 224, "select_metric": ["rsum"], "top_k": 64,
              "queue_size": 1000, "vision_depth": 11, "frozen_vision_blocks": 7, "fusion_layers": 4,
              "max_epoch": 200, "text_backbone": "roberta-base", "eval_folds": 5, "precision": "fp32",
              "image_backbone": "vit_base_patch16_clip_quickgelu_224.openai"}
    assert {k: c[k] for k in recipe} == recipe
    hat = config_of("coco_config")
    assert (hat["model"], hat["learning_rate"], hat["max_text_len"]) == ("hat", 1e-4, 32)


def test_multisea_demo_is_the_same_in_either_order():
    a, b = config_of("multisea", "demo"), config_of("demo", "multisea")
    assert a == b
    assert (a["dataset"], a["image_size"], a["text_backbone"]) == ("demo", 64, "packaged-minilm")
    assert config_of("multisea", "demo", learning_rate=1e-3)["learning_rate"] == 1e-3


@pytest.mark.parametrize("updates, message", [
    ({"precision": "fp16"}, "precision='fp16' is not valid; allowed: ['fp32'] with model=multisea"),
    ({"batch_size": 30}, "batch_size=30 is not valid; allowed: a multiple of per_gpu_batchsize"),
    ({"itm_layers": [5]}, "itm_layers=[5] is not valid; allowed: AFormer layers 1..1 (fusion_layers)"),
    ({"model": "clip"}, "model='clip' is not valid; allowed: ['hat', 'multisea']"),
])
def test_bad_multisea_config(tmp_path, updates, message):
    from run import UsageError, validate_config

    with pytest.raises(UsageError) as error:
        validate_config(config_of("multisea", "demo", **updates))
    assert message in str(error.value)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from run import ex

    tmp = tmp_path_factory.mktemp("multisea")
    updates = dict(TINY, data_root=str(tmp / "data"), observer_dir=str(tmp / "runs"))
    return ex, ex.run(named_configs=["multisea", "demo"], config_updates=updates), tmp, updates


def test_multisea_demo_run_is_recorded_and_reproduced(trained):
    ex, run, tmp, updates = trained
    run_dir = run_folder(run)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "COMPLETED"
    assert {"i2t_r1", "t2i_r1", "rsum", "i2t_meanr"} <= set(record["result"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train.loss"]["steps"] == [0, 1]
    assert len(metrics["val.rsum"]["values"]) == 2
    from hat.checkpoint import load_checkpoint

    state = load_checkpoint(str(run_dir / "last.ckpt"))
    assert state["config"]["model"] == "multisea"
    assert state["scheduler"]["last_epoch"] == 2 * (48 // 16)  # stepped once per optimizer step
    assert "image_queue" in state["model"]
    again = ex.run(named_configs=["multisea", "demo"],
                   config_updates=dict(updates, test_only=True, checkpoint=str(run_dir / "best.ckpt")))
    assert again.result == run.result  # to the last digit
