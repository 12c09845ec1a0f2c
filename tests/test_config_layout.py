"""The configuration's shape: the runner's keys for every model, each model's keys only
when it is selected, named configs that compose in any order."""
import pytest
import torch
from sacred.utils import ConfigAddedError

from tests.conftest import resolved_config

HAT_ONLY = {"level_pairs", "margin", "lambda_softmax", "direction", "swin_depths", "swin_embed_dim",
            "vse_warmup_epochs", "same_image_mask", "lr_step_epochs", "freeze_image_epochs", "text_dropout",
            "per_level", "ensemble", "ensemble_directions", "feature_cache", "feature_dtype", "image_tile"}
MULTISEA_ONLY = {"queue_size", "itm_layers", "fusion_layers", "fusion_heads", "num_agents", "top_k", "encoder_lr",
                 "alpha_lr", "temp_lr", "warmup_ratio", "num_cycles", "weight_decay", "vision_depth",
                 "activation", "temp_init", "freeze_text_encoder"}
RUNNER = {"model", "dataset", "data_root", "per_gpu_batchsize", "batch_size", "max_epoch", "precision",
          "clip_norm", "select_metric", "eval_folds", "checkpoint", "resume", "text_backbone", "max_text_len"}


config_of = resolved_config


def test_each_model_lists_only_its_own_keys():
    hat, multisea = config_of(), config_of("multisea")
    assert RUNNER <= set(hat) and RUNNER <= set(multisea)
    assert HAT_ONLY <= set(hat) and not HAT_ONLY & set(multisea)
    assert MULTISEA_ONLY <= set(multisea) and not MULTISEA_ONLY & set(hat)


def test_a_key_of_the_other_model_is_refused():
    with pytest.raises(ConfigAddedError, match="margin"):
        config_of("multisea", margin=0.3)
    with pytest.raises(ConfigAddedError, match="queue_size"):
        config_of(queue_size=10)


def test_flickr_composes_with_the_other_named_configs():
    assert config_of("flickr") == config_of()  # Flickr30K is the default
    assert config_of("multisea", "flickr") == config_of("flickr", "multisea") == config_of("multisea")
    assert config_of("multisea", "flickr")["exp_name"] == "multisea_f30k"
    coco_last, flickr_last = config_of("flickr", "coco_config"), config_of("coco_config", "flickr")
    assert (coco_last["dataset"], coco_last["eval_folds"]) == ("coco", 5)
    assert flickr_last["dataset"] == "f30k"  # the last dataset config named wins
    assert config_of("demo", "multisea", "flickr")["demo_recipe"]  # the demo's models on Flickr30K


def test_recorded_precision_is_what_runs():
    from hat.checks import resolve_precision

    on_cuda = torch.cuda.is_available()
    assert config_of()["precision"] == ("fp16" if on_cuda else "fp32")
    assert config_of("multisea")["precision"] == "fp32"
    assert config_of(device="cpu")["precision"] == "fp32"
    for precision in ("bf16", "fp16", "fp32"):
        c = config_of(precision=precision)
        assert c["precision"] == resolve_precision(c) == precision  # asked for: runs as asked


def test_batch_keys_mean_the_same_for_every_model():
    hat, multisea = config_of(), config_of("multisea")
    assert (hat["per_gpu_batchsize"], hat["batch_size"]) == (58, None)  # the paper's 58, no accumulation
    assert (multisea["per_gpu_batchsize"], multisea["batch_size"]) == (20, 500)  # 25 micro-batches a step
