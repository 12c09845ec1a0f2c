"""Bad configurations are refused before any work, in one line naming the key.

Every row of the README's table "Bad input and what you get" is checked here."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def config_with(tmp_path, named=(), **updates):
    from run import ex

    updates.setdefault("data_root", str(tmp_path))
    run = ex._create_run(command_name="print_config", config_updates=updates, named_configs=list(named))
    return dict(run.config)


@pytest.fixture
def f30k_root(tmp_path):
    for split in ("train", "val", "test"):
        (tmp_path / f"f30k_caption_karpathy_{split}.arrow").write_bytes(b"")
    return tmp_path


CASES = [
    ({"dataset": "imagenet"}, "dataset='imagenet' is not valid; allowed: ['coco', 'demo', 'f30k']"),
    ({"direction": "both"}, "direction='both' is not valid; allowed: ['i2t', 't2i']"),
    ({"precision": "fp8"}, "precision='fp8' is not valid; allowed: ['fp16', 'bf16', 'fp32']"),
    ({"image_transform": "random"}, "image_transform='random' is not valid; allowed: ['hat', 'plain'"),
    ({"level_pairs": [[5, 4]]}, "level_pairs=[[5, 4]] is not valid; allowed: [image stage 1..4, text layer] pairs"),
    ({"level_pairs": [[2, 13]]}, "level_pairs=[[2, 13]] is not valid; allowed: text layers 1..12 of bert-base-uncased"),
    ({"per_gpu_batchsize": 0}, "per_gpu_batchsize=0 is not valid; allowed: a positive integer"),
    ({"select_metric": ["r1"]}, "select_metric=['r1'] is not valid; allowed: a list of ["),
    ({"test_only": True}, "test_only=True needs checkpoint=PATH"),
    ({"checkpoint": "/nope/best.ckpt"}, "checkpoint=/nope/best.ckpt does not exist"),
    ({"resume_from": "/nope/last.ckpt"}, "resume_from=/nope/last.ckpt does not exist"),
    ({"ensemble": ["/nope/a.ckpt"]}, "ensemble=[...] evaluates existing checkpoints: use it with test_only=True"),
    ({"ensemble": ["/nope/a.ckpt"], "test_only": True}, "ensemble: /nope/a.ckpt does not exist"),
    ({"ensemble_directions": ["up"]}, "ensemble_directions=['up'] is not valid; allowed: []"),
    ({"eval_folds": 0}, "eval_folds=0 is not valid; allowed: None or a positive integer"),
    ({"feature_dtype": "fp8"}, "feature_dtype='fp8' is not valid; allowed: [None, 'fp32', 'fp16', 'bf16']"),
    ({"data_root": None}, "data_root is not set: pass data_root=/path/to/arrow/files"),
    ({"data_root": "/nonexistent/arrows"}, "data_root=/nonexistent/arrows does not exist"),
]


@pytest.mark.parametrize("updates, message", CASES, ids=[next(iter(c[0])) + str(i) for i, c in enumerate(CASES)])
def test_bad_config_names_key_and_value(f30k_root, updates, message):
    from run import UsageError, validate_config

    with pytest.raises(UsageError) as error:
        validate_config(config_with(f30k_root, **updates))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_empty_or_incomplete_data_root(tmp_path):
    from run import UsageError, validate_config

    with pytest.raises(UsageError, match=r"data_root=.* is empty: write the arrow files .*prepare_data"):
        validate_config(config_with(tmp_path))
    (tmp_path / "f30k_caption_karpathy_test.arrow").write_bytes(b"")
    with pytest.raises(UsageError, match=r"missing arrow file .*f30k_caption_karpathy_train.arrow"):
        validate_config(config_with(tmp_path))
    validate_config(config_with(tmp_path, test_only=True, checkpoint=__file__))  # test split suffices


def test_batch_not_divisible_by_world_size(f30k_root, monkeypatch):
    from run import UsageError, validate_config

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UsageError, match="batch_size=58 is not valid; allowed: None or a positive multiple of the world size 4"):
        validate_config(config_with(f30k_root, batch_size=58))
    validate_config(config_with(f30k_root))  # per_gpu_batchsize x 4 is always divisible


def test_demo_text_layers_checked_against_minilm(tmp_path):
    from run import UsageError, validate_config

    with pytest.raises(UsageError, match="text layers 1..6 of packaged-minilm"):
        validate_config(config_with(tmp_path, named=["demo"], level_pairs=[[2, 2], [3, 7]]))


def test_command_line_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "with", "direction=sideways",
                           f"observer_dir={tmp_path}/runs"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "ConfigError: direction='sideways' is not valid; allowed: ['i2t', 't2i']")
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "runs")
