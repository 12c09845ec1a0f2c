"""Bad configurations are refused before any work, in one line naming the key.

Every row of the README's table "Bad input and what you get" is checked here."""
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, resolved_config


def config_with(tmp_path, named=(), **updates):
    updates.setdefault("data_root", str(tmp_path))
    return resolved_config(*named, **updates)


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
    # runs that cannot learn (the hinge loss would be 0 on every step), refused before any work
    ({"margin": 0}, "margin=0 is not valid; allowed: a number > 0 (the triplet hinge needs a margin"),
    ({"margin": -0.2}, "margin=-0.2 is not valid; allowed: a number > 0"),
    ({"lambda_softmax": 0.0}, "lambda_softmax=0.0 is not valid; allowed: a number > 0 (the SCAN softmax temperature)"),
    ({"per_gpu_batchsize": 1}, "per_gpu_batchsize=1 is not valid; allowed: a batch of at least 2 pairs over all processes"),
    ({"batch_size": 1}, "batch_size=1 is not valid; allowed: a batch of at least 2 pairs over all processes"),
    ({"max_text_len": 513}, "max_text_len=513 is not valid; allowed: at most 512: bert-base-uncased has 512 token positions"),
    ({"device": "tpu"}, "device='tpu' is not valid; allowed: auto, cpu, cuda or cuda:N"),
    ({"checkpoint": "/"}, "checkpoint=/ is a directory; pass the path of a file in it (e.g. /best.ckpt)"),
    ({"n_queries": -1}, "n_queries=-1 is not valid; allowed: a non-negative integer (the gallery's sample captions"),
    ({"tensorboard": 3}, "tensorboard=3 is not valid; allowed: False, True (the run's folder/tensorboard) or a directory"),
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
        validate_config(config_with(f30k_root, batch_size=58, accumulation="split"))
    validate_config(config_with(f30k_root))  # per_gpu_batchsize x 4 is always divisible
    validate_config(config_with(f30k_root, batch_size=58))  # exact (HAT's default): 15 + 15 + 14 + 14
    with pytest.raises(UsageError, match="batch_size=3 is not valid; allowed: None or at least the world size 4"):
        validate_config(config_with(f30k_root, batch_size=3))


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


def test_multisea_caption_length_within_roberta_positions(tmp_path):
    from run import UsageError, validate_config

    with pytest.raises(UsageError) as error:
        validate_config(config_with(tmp_path, named=["multisea"], max_text_len=1000, test_only=True,
                                    checkpoint=__file__))
    assert str(error.value) == ("max_text_len=1000 is not valid; allowed: at most 512: roberta-base has 512 "
                                "token positions")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line(f30k_root, device):
    from run import UsageError, validate_config

    with pytest.raises(UsageError) as error:
        validate_config(config_with(f30k_root, device=device))
    assert str(error.value) == (f"device={device}: this machine has no usable CUDA device "
                                f"(torch.cuda.is_available() is False); use device=cpu or device=auto")


def test_captions_per_image_against_the_fewest_captions(tmp_path):
    from datamodules.writer import write_arrow
    from run import UsageError, validate_config

    jpeg = b"not decoded by the check"
    rows = {"train": [(jpeg, ["a"] * 2, "t0.jpg", "train")],
            "val": [(jpeg, ["a"] * 5, "v0.jpg", "val"), (jpeg, ["a"] * 4, "v1.jpg", "val")],
            "test": [(jpeg, ["a"] * 5, "s0.jpg", "test"), (jpeg, ["a"] * 3, "s1.jpg", "test")]}
    for split, split_rows in rows.items():
        write_arrow(str(tmp_path / f"f30k_caption_karpathy_{split}.arrow"), split_rows)
    with pytest.raises(UsageError) as error:  # training: val and test are evaluated
        validate_config(config_with(tmp_path, captions_per_image=4))
    assert str(error.value) == (f"captions_per_image=4 is not valid: image s1.jpg in "
                                f"{tmp_path}/f30k_caption_karpathy_test.arrow has 3 caption(s); set "
                                f"captions_per_image=3 or None (every caption)")
    validate_config(config_with(tmp_path, captions_per_image=3))  # training captions are not counted
    validate_config(config_with(tmp_path, captions_per_image=None))
    with pytest.raises(UsageError, match="captions_per_image=6 is not valid: every demo image has 5 caption"):
        validate_config(config_with(tmp_path, named=["demo"], captions_per_image=6))


@pytest.mark.parametrize("key", ["checkpoint_dir", "observer_dir"])
def test_folders_that_cannot_be_written_are_refused_before_any_work(f30k_root, tmp_path, key):
    from run import UsageError, validate_config

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UsageError) as error:
        validate_config(config_with(f30k_root, **{key: str(blocker / "runs")}))
    assert str(error.value).startswith(f"{key}={blocker}/runs is not writable (NotADirectoryError: ")
    assert str(error.value).endswith("; pass a folder you can write to")
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(UsageError, match=f"{key}=.*locked is not writable .*PermissionError"):
            validate_config(config_with(f30k_root, **{key: str(locked)}))


def test_batch_size_is_the_global_batch_of_accumulated_micro_batches(f30k_root, monkeypatch):
    from run import UsageError, validate_config

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UsageError) as error:  # a multiple of 4, not of 58 x 4: split accumulation refuses it
        validate_config(config_with(f30k_root, batch_size=116, accumulation="split"))
    assert str(error.value) == ("batch_size=116 is not valid; allowed: a multiple of per_gpu_batchsize x world "
                                "size (58 x 4 = 232): one optimizer step accumulates batch_size / 232 micro-batches"
                                " (or accumulation=exact: its last micro-batch may be smaller)")
    validate_config(config_with(f30k_root, batch_size=464))  # two micro-batches of 58 per process
    validate_config(config_with(f30k_root, batch_size=348))  # exact (HAT's default): 58 + 29 per process


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("named", [(), ("multisea",)])
def test_mixed_precision_needs_cuda(tmp_path, named):
    from run import UsageError, validate_config

    model = named[0] if named else "hat"
    with pytest.raises(UsageError) as error:
        validate_config(config_with(tmp_path, named=[*named, "demo"], precision="bf16"))
    assert str(error.value) == (f"precision='bf16' is not valid; allowed: ['fp32'] with model={model} on the "
                                f"CPU (fp16/bf16 autocast is for CUDA; precision=auto runs fp32 here)")
    validate_config(config_with(tmp_path, named=[*named, "demo"], precision="fp32"))
