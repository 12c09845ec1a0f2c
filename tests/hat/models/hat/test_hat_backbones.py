"""Backbone weights from local files, and one-line errors when offline."""
import os
import subprocess
import sys

import pytest
import timm
import torch

from hat.models.hat.encoders import SwinStages
from tests.conftest import ROOT

TINY_SWIN = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_swin_weights_from_a_local_timm_file(tmp_path, suffix):
    torch.manual_seed(0)
    source = timm.create_model("swin_base_patch4_window7_224", img_size=64, num_classes=7, **TINY_SWIN)
    path = str(tmp_path / f"swin{suffix}")
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), path)
    stages = SwinStages("swin_base_patch4_window7_224", [2, 3, 4], pretrained=True, weights=path,
                        image_size=64, **TINY_SWIN)
    expected = source.state_dict()
    got = stages.body.state_dict()
    for name, value in got.items():
        timm_name = name.replace("layers_", "layers.", 1)
        assert torch.equal(value, expected[timm_name]), name
    assert torch.equal(stages.stage_norms[3].weight, expected["norm.weight"])
    assert torch.equal(stages.stage_norms[0].weight, torch.ones(16))  # new norms for stages 1-3
    images = torch.randn(2, 3, 64, 64)
    stages.eval(), source.eval()
    with torch.no_grad():
        last = stages(images)[-1]  # stage 4 through the pretrained final norm
        reference = source.forward_features(images).flatten(1, 2)  # timm applies that norm too
    assert torch.allclose(last, reference, atol=1e-5)


def test_offline_without_weights_names_the_config_key(tmp_path):
    script = (
        "from hat.backbones import BackboneError\nfrom hat.models.hat.encoders import SwinStages, BertLayers\n"
        "for make in (lambda: SwinStages('swin_base_patch4_window7_224.ms_in22k', [2, 3, 4], pretrained=True),\n"
        "             lambda: SwinStages('swin_base_patch4_window7_224', [2, 3, 4], weights='/nope/swin.pth'),\n"
        "             lambda: BertLayers('bert-base-uncased', [4], pretrained=True)):\n"
        "    try:\n        make()\n    except BackboneError as error:\n        print(error)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 3, proc.stdout + proc.stderr
    assert lines[0].startswith("image_backbone=swin_base_patch4_window7_224.ms_in22k") and "image_weights=" in lines[0]
    assert lines[1].startswith("image_weights=/nope/swin.pth does not exist")
    assert lines[2].startswith("text_backbone=bert-base-uncased") and "text_backbone=DIR" in lines[2]
