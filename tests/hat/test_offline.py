"""Training offline: a backbone that would be downloaded fails at once, in one line that
names the config key and every way out, with no retry noise; the offline keys build.

The hub is made unreachable for certain, also on a machine with internet: HF_ENDPOINT
points at a closed local port (one refused connection, the probe's case) and the HF and
torch caches are empty folders."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

RETRY_NOISE = re.compile(r"Retrying in|thrown while requesting|Retry \d+/\d+")
DEMO = "demo_recipe=True"
MINILM_PAIRS = "level_pairs=[[2,2],[3,4],[4,6]]"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def offline_env(tmp_path) -> dict:
    """No answer from the hub (a refused connection, no HF_HUB_OFFLINE), empty caches."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"),
               TORCH_HOME=str(tmp_path / "torch"), HAT_CACHE=str(tmp_path / "hat-cache"))
    return env


BUILD_SCRIPT = r'''
import json, time
import transformers.models.bert.modeling_bert, transformers.models.roberta.modeling_roberta  # imports: not timed
from hat.backbones import BackboneError
from hat.checks import check_offline_backbones
from hat.defaults import default_config
from hat.models.hat.encoders import BertLayers, SwinStages
from hat.models.multisea.encoders import CLIP_VIT_B16, build_clip_vision, build_text_encoder
from hat.plugins import get_plugin

failing = {
    "hat image": lambda: SwinStages("swin_base_patch4_window7_224.ms_in22k", [2, 3, 4], pretrained=True),
    "hat text": lambda: BertLayers("bert-base-uncased", [4, 10, 12], pretrained=True),
    "multisea image": lambda: build_clip_vision(CLIP_VIT_B16, pretrained=True),
    "multisea text": lambda: build_text_encoder("roberta-base", pretrained=True),
}
for name, make in failing.items():
    start = time.time()
    try:
        make()
        message = None
    except BackboneError as error:
        message = str(error)
    print(json.dumps({"case": name, "seconds": time.time() - start, "message": message}), flush=True)
small_swin = dict(swin_embed_dim=16, swin_depths=[1, 1, 1, 1], swin_num_heads=[1, 1, 2, 2], image_size=64,
                  swin_window_size=4)  # the keys' combination is what counts, not the size
small_vit = dict(image_backbone_kwargs={"patch_size": 16, "embed_dim": 64, "num_heads": 2}, vision_depth=2,
                 image_size=64, frozen_vision_blocks=1, embed_dim=64, fusion_layers=1, fusion_heads=2,
                 itm_layers=[1], num_agents=4, queue_size=8)
offline_keys = {
    "hat keys": ("hat", dict(image_pretrained=False, text_backbone="packaged-minilm",
                             level_pairs=[[2, 2], [3, 4], [4, 6]], **small_swin)),
    "hat demo_recipe": ("hat", dict(demo_recipe=True)),
    "multisea keys": ("multisea", dict(image_pretrained=False, text_backbone="packaged-minilm", **small_vit)),
    "multisea demo_recipe": ("multisea", dict(demo_recipe=True)),
}
for name, (model, keys) in offline_keys.items():
    config = default_config(model, "f30k", **keys)
    start = time.time()
    check_offline_backbones(config)
    built = get_plugin(model)(config).build(pretrained=True)
    print(json.dumps({"case": name, "seconds": time.time() - start,
                      "parameters": sum(p.numel() for p in built.parameters())}), flush=True)
'''


def test_backbones_fail_at_once_in_one_line_and_the_offline_keys_build(tmp_path):
    proc = subprocess.run([sys.executable, "-c", BUILD_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          env=offline_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = {row["case"]: row for row in map(json.loads, proc.stdout.splitlines())}
    assert not [line for line in proc.stderr.splitlines() if RETRY_NOISE.search(line)], proc.stderr[-3000:]
    expected = {
        "hat image": ["image_backbone=swin_base_patch4_window7_224.ms_in22k: ", "image_weights=/path/to/swin.pth",
                      "image_pretrained=False", DEMO],
        "hat text": ["text_backbone=bert-base-uncased: ", "text_backbone=DIR", "text_backbone=packaged-minilm",
                     MINILM_PAIRS, "text_pretrained=False", DEMO],
        "multisea image": ["image_backbone=vit_base_patch16_clip_quickgelu_224.openai: ",
                           "image_weights=/path/to/clip-vit.pth", "image_pretrained=False", DEMO],
        "multisea text": ["text_backbone=roberta-base: ", "text_backbone=DIR", "text_backbone=packaged-minilm", DEMO],
    }
    for case, parts in expected.items():
        message = cases[case]["message"]
        assert message is not None, f"{case}: built without the hub"
        assert "\n" not in message and message.startswith(parts[0]), message
        assert "cannot be downloaded (offline: no connection to the model hub" in message, message
        assert all(part in message for part in parts), (case, message)
        assert cases[case]["seconds"] < 10, (case, cases[case]["seconds"])  # no retries (they take ~25 s)
    for case in ("hat keys", "hat demo_recipe", "multisea keys", "multisea demo_recipe"):
        assert cases[case]["parameters"] > 0, case


def tiny_f30k(tmp_path) -> str:
    from datamodules.demo import ensure_demo_data

    root = ensure_demo_data(str(tmp_path / "demo"), 8, 4)
    data = tmp_path / "f30k"
    data.mkdir()
    for split in ("train", "val", "test"):
        shutil.copy(os.path.join(root, f"demo_caption_{split}.arrow"), data / f"f30k_caption_karpathy_{split}.arrow")
    return str(data)


def test_training_offline_fails_fast_in_one_error_line(tmp_path):
    command = [sys.executable, "run.py", "with", "flickr", f"data_root={tiny_f30k(tmp_path)}", "max_epoch=1",
               f"observer_dir={tmp_path}/runs", "num_workers=0", "-u"]
    start = time.time()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=offline_env(tmp_path), timeout=120)
    seconds = time.time() - start
    assert proc.returncode in (1, 2), proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("UsageError:", "ConfigError:"))]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert not [line for line in proc.stderr.splitlines() if RETRY_NOISE.search(line)], proc.stderr[-3000:]
    for part in ("image_backbone=swin_base_patch4_window7_224.ms_in22k", "image_weights=", "image_pretrained=False",
                 DEMO):
        assert part in errors[0], errors[0]
    failed_after = re.search(r"Failed after (\d+):(\d+):(\d+)", proc.stderr)  # the run's own time (no imports)
    if failed_after:
        assert int(failed_after[1]) * 3600 + int(failed_after[2]) * 60 + int(failed_after[3]) < 10, proc.stderr
    # with the imports of a busy 2-core machine (~10 s); the retries alone took ~50 s
    assert seconds < 40, seconds


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """In process: empty HF and torch caches, a hub that does not answer (requests are
    recorded), offline mode off, restored afterwards."""
    import huggingface_hub.constants
    import huggingface_hub.utils
    import torch.hub

    requests = []

    class Unreachable:
        def head(self, url, **kwargs):
            requests.append(url)
            raise ConnectionError("[Errno 111] Connection refused")

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", Unreachable)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    return requests


def test_config_check_names_every_missing_backbone_in_one_line(unreachable_hub):
    from hat.checks import check_offline_backbones
    from hat.defaults import default_config
    from hat.plugins import ConfigProblem

    with pytest.raises(ConfigProblem) as error:
        check_offline_backbones(default_config("hat", "f30k"))
    message = str(error.value)
    assert message.startswith("image_backbone=swin_base_patch4_window7_224.ms_in22k and text_backbone="
                              "bert-base-uncased: their pretrained weights are not in the local cache and cannot "
                              "be downloaded (offline: no connection to the model hub at https://huggingface.co); "
                              "pass image_weights=/path/to/swin.pth"), message
    for part in ("image_pretrained=False", "text_backbone=DIR", "text_backbone=packaged-minilm", MINILM_PAIRS,
                 DEMO):
        assert part in message and "\n" not in message, message
    assert len(unreachable_hub) == 1  # one request, no retries

    with pytest.raises(ConfigProblem) as error:  # already offline: no second request
        check_offline_backbones(default_config("multisea", "f30k"))
    message = str(error.value)
    assert message.startswith("image_backbone=vit_base_patch16_clip_quickgelu_224.openai and text_backbone="
                              "roberta-base: their pretrained weights"), message
    for part in ("image_weights=/path/to/clip-vit.pth", "image_pretrained=False", "text_backbone=DIR",
                 "text_backbone=packaged-minilm", DEMO):
        assert part in message, message
    assert len(unreachable_hub) == 1

    with pytest.raises(ConfigProblem) as error:  # evaluation needs roberta-base's tokenizer only
        check_offline_backbones(default_config("multisea", "f30k", test_only=True))
    assert str(error.value).startswith("text_backbone=roberta-base: the tokenizer is not in the local cache"), error
    assert DEMO not in str(error.value) and "packaged-minilm" not in str(error.value)


@pytest.mark.parametrize("model, keys", [
    ("hat", dict(demo_recipe=True)),
    ("hat", dict(image_pretrained=False, text_backbone="packaged-minilm", level_pairs=[[2, 2], [3, 4], [4, 6]])),
    ("hat", dict(image_pretrained=False, text_pretrained=False)),
    ("hat", dict(test_only=True)),
    ("multisea", dict(demo_recipe=True)),
    ("multisea", dict(image_pretrained=False, text_backbone="packaged-minilm")),
])
def test_offline_keys_pass_the_check_without_asking_the_hub(unreachable_hub, model, keys):
    from hat.checks import check_offline_backbones
    from hat.defaults import default_config

    check_offline_backbones(default_config(model, "f30k", **keys))
    assert unreachable_hub == []


def test_offline_by_environment_is_known_without_a_request(unreachable_hub, monkeypatch):
    import huggingface_hub.constants

    from hat.backbones import hub_unreachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert hub_unreachable("bert-base-uncased") == "offline: HF_HUB_OFFLINE=1"
    assert unreachable_hub == []


def test_a_failed_request_turns_the_hubs_offline_mode_on(unreachable_hub):
    import huggingface_hub.constants

    from hat.backbones import hub_unreachable

    assert hub_unreachable("bert-base-uncased") == "offline: no connection to the model hub at https://huggingface.co"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True  # timm/transformers: the cache only, no retries
    assert hub_unreachable("roberta-base") is not None and len(unreachable_hub) == 1


def test_library_messages_are_cut_at_a_word():
    from hat.backbones import clip_message

    text = ("An error happened while trying to locate the file on the Hub and we cannot find the requested files "
            "in the local cache. Please check your connection and try again or make sure your Internet connection "
            "is on.")
    clipped = clip_message(text, 160)
    assert clipped.endswith(" ...") and text.startswith(clipped[:-4]) and text[len(clipped) - 4] == " "
    assert clip_message("short\nsecond line") == "short"
