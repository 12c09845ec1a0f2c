"""The authors' released HAT checkpoints (PyTorch-Lightning ``.ckpt``).

Key layout: tests/data/hat_state_dict.txt (every key with its shape and dtype). ``state_dict`` holds
``vit_model.*`` (a timm-0.4 Swin plus per-stage norms), ``text_transformer.*`` (a BERT
with transformers' names) and six ``cross_modal_{image,text}_transform{,_1,_2}``
projections. This module maps those names onto the project's HAT module and back.
"""
from __future__ import annotations

import re

import torch

from hat.checkpoint import load_mapped_state_dict

# level suffix of the authors' projections, by Swin stage (1-based): high, low, mid
RELEASED_SUFFIX_BY_STAGE = {4: "", 2: "_1", 3: "_2"}
# buffers the authors' Swin stores and timm recomputes
SKIPPED_BUFFERS = re.compile(r"\.attn\.relative_position_index$|\.attn_mask$")


def is_released_hat(state_dict: dict) -> bool:
    return any(k.startswith("vit_model.") for k in state_dict) and any(
        k.startswith("cross_modal_image_transform") for k in state_dict)


is_released = is_released_hat  # the name hat.plugins.ModelPlugin looks for


def _suffixes(model) -> list[str]:
    stages = model.image_encoder.stages
    if sorted(stages) != [2, 3, 4]:
        raise ValueError(f"released HAT checkpoints use Swin stages 2, 3, 4; the model has {stages}")
    return [RELEASED_SUFFIX_BY_STAGE[stage] for stage in stages]


def _ours_to_released_name(name: str, suffixes: list[str], last_stage: int) -> str:
    """Project parameter name -> the authors' name (raises KeyError if it has none)."""
    match = re.match(r"(image|text)_proj\.(\d+)\.(weight|bias)$", name)
    if match:
        side, level, param = match.groups()
        return f"cross_modal_{side}_transform{suffixes[int(level)]}.{param}"
    if name.startswith("text_encoder.bert."):
        return "text_transformer." + name[len("text_encoder.bert."):]
    match = re.match(r"image_encoder\.stage_norms\.(\d+)\.(weight|bias)$", name)
    if match:
        stage, param = int(match.group(1)), match.group(2)
        return f"vit_model.norm.{param}" if stage == last_stage else f"vit_model.norm_{stage}.{param}"
    match = re.match(r"image_encoder\.body\.layers_(\d+)\.downsample\.(.+)$", name)
    if match:  # timm 1.x merges at the start of stage i; the authors' Swin at the end of i-1
        return f"vit_model.layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}"
    match = re.match(r"image_encoder\.body\.layers_(\d+)\.(.+)$", name)
    if match:
        return f"vit_model.layers.{match.group(1)}.{match.group(2)}"
    if name.startswith("image_encoder.body.patch_embed."):
        return "vit_model." + name[len("image_encoder.body."):]
    raise KeyError(name)


def name_map(model, with_buffers: bool = False) -> dict[str, str]:
    """Every entry of ``model.state_dict()`` (plus, with_buffers, the Swin buffers the
    authors store and timm recomputes) -> its name in the authors' checkpoints."""
    suffixes = _suffixes(model)
    last_stage = len(model.image_encoder.stage_norms) - 1
    names = list(model.state_dict())
    if with_buffers:
        names += [n for n, _ in model.named_buffers() if SKIPPED_BUFFERS.search(n)]
    mapping = {}
    for name in names:
        try:
            mapping[name] = _ours_to_released_name(name, suffixes, last_stage)
        except KeyError:
            raise ValueError(f"parameter {name} has no counterpart in the released layout") from None
    return mapping


def to_released_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights and Swin buffers under the authors' key names, as in their
    Lightning files."""
    state = {**dict(model.named_buffers()), **model.state_dict()}
    return {released: state[ours] for ours, released in name_map(model, with_buffers=True).items()}


def load_released_state_dict(model, released: dict) -> dict:
    """Load the authors' ``state_dict`` into ``model``; checks every key and shape.

    Returns {"loaded": n, "skipped": [buffer names]}; raises ValueError listing missing,
    unexpected and mis-shaped keys if anything does not match."""
    return load_mapped_state_dict(model, released, name_map(model), skipped=SKIPPED_BUFFERS.search)
