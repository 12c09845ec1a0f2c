"""The authors' released HAT checkpoints: key layout, round trip at full size, safety."""
import io
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from hat.checkpoint import CheckpointError, load_model_weights, read_checkpoint_file
from hat.models.hat.model import build_hat
from hat.models.hat.released import SKIPPED_BUFFERS, to_released_state_dict
from tests.conftest import ROOT, only_run_folder, read_key_list

FULL = dict(image_backbone="swin_base_patch4_window7_224", text_backbone="bert-base-uncased",
            level_pairs=[[2, 4], [3, 10], [4, 12]], image_pretrained=False, text_pretrained=False)


def released_layout() -> dict:
    """key -> shape, from the list of the authors' checkpoint keys."""
    return {key: shape for key, (shape, _) in read_key_list("hat_state_dict.txt").items()}


@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    return build_hat(**FULL).eval()


@pytest.fixture(scope="module")
def lightning_file(full_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("released") / "hat_released.ckpt"
    torch.save({"state_dict": to_released_state_dict(full_model), "epoch": 21, "global_step": 1234,
                "hyper_parameters": {"config": {"exp_name": "finetune_irtr_coco", "lambda": 9}}}, path)
    return path


def test_converter_produces_every_listed_key_and_shape(full_model):
    produced = {k: tuple(v.shape) for k, v in to_released_state_dict(full_model).items()}
    assert produced == released_layout()


def test_lightning_file_round_trip_gives_identical_scores(full_model, lightning_file):
    torch.manual_seed(1)
    fresh = build_hat(**FULL).eval()
    images = torch.randn(2, 3, 224, 224)
    input_ids = torch.randint(1000, 5000, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    with torch.no_grad():
        before = fresh(images, input_ids, attention_mask)
        info = load_model_weights(fresh, str(lightning_file))
        after = fresh(images, input_ids, attention_mask)
        expected = full_model(images, input_ids, attention_mask)
    assert info["format"] == "released-hat" and info["epoch"] == 21
    assert info["loaded"] == len(released_layout()) - len(info["skipped"])
    assert all(SKIPPED_BUFFERS.search(k) for k in info["skipped"]) and len(info["skipped"]) > 0
    assert not torch.equal(before, expected)
    assert torch.equal(after, expected)


def test_mismatched_released_checkpoint_lists_keys(full_model, tmp_path):
    state = to_released_state_dict(full_model)
    state.pop("cross_modal_text_transform_2.bias")
    state["vit_model.extra.weight"] = torch.zeros(1)
    state["cross_modal_image_transform_1.weight"] = torch.zeros(768, 255)
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError) as error:
        load_model_weights(full_model, str(path))
    message = str(error.value)
    assert "missing 1 ['cross_modal_text_transform_2.bias']" in message
    assert "unexpected 1 ['vit_model.extra.weight']" in message
    assert "cross_modal_image_transform_1.weight (768, 255) vs (768, 256)" in message


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    exploit = _Exploit()
    exploit.marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": exploit}, path)
    with pytest.raises(CheckpointError, match="refers to code .*system.* refused"):
        read_checkpoint_file(str(path))
    assert not (tmp_path / "pwned").exists()


def test_lightning_containers_are_read_as_plain_dicts(tmp_path):
    """A pickled Lightning AttributeDict (module faked here) loads as a dict, safely."""
    import types

    module = types.ModuleType("pytorch_lightning.utilities.parsing")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = module.__name__, "AttributeDict"
    module.AttributeDict = AttributeDict
    names = ["pytorch_lightning", "pytorch_lightning.utilities", module.__name__]
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules[module.__name__] = module
    try:
        torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": AttributeDict(lr=0.1)},
                   tmp_path / "lightning.ckpt")
    finally:
        for name in names:
            sys.modules.pop(name, None)
    state = read_checkpoint_file(str(tmp_path / "lightning.ckpt"))
    assert state["hyper_parameters"] == {"lr": 0.1} and type(state["hyper_parameters"]) is dict
    assert torch.equal(state["state_dict"]["w"], torch.ones(2))


def test_truncated_checkpoint_is_refused(lightning_file, tmp_path):
    data = lightning_file.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt cannot be read"):
        read_checkpoint_file(str(tmp_path / "cut.ckpt"))


def _mini_coco(root):
    from datamodules.writer import write_arrow

    rows = []
    for i in range(6):
        buffer = io.BytesIO()
        Image.new("RGB", (64 + 8 * i, 48), (40 * i, 255 - 40 * i, 90)).save(buffer, format="JPEG")
        rows.append((buffer.getvalue(), [f"a picture number {i} variant {k}" for k in range(5)],
                     f"COCO_val2014_{i:012d}.jpg", "test"))
    write_arrow(os.path.join(root, "coco_caption_karpathy_test.arrow"), rows)


def test_run_test_only_on_released_checkpoint_offline(lightning_file, tmp_path):
    _mini_coco(str(tmp_path))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HAT_CACHE=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "run.py", "with", "coco_config", "test_only=True",
         f"checkpoint={lightning_file}", f"data_root={tmp_path}", f"observer_dir={tmp_path}/runs",
         "num_workers=0", "eval_batch_size=3", "progress=False"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    run_dir = only_run_folder(tmp_path / "runs")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "COMPLETED"
    assert set(record["result"]) >= {"i2t_r1", "t2i_r1", "rsum", "t2i_meanr"}
    assert 0 <= record["result"]["rsum"] <= 600
    info = json.loads((run_dir / "info.json").read_text())
    assert info["checkpoint_format"] == "released-hat"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test.i2t_r1"]["values"] == [record["result"]["i2t_r1"]]
