"""The authors' released Multi-SEA checkpoints (PyTorch-Lightning ``.ckpt``).

Key layout: tests/data/multisea_state_dict.txt (every key with its shape and dtype). Everything but the
visual encoder carries the project's names already (temp, alpha, the queues,
text_encoder.* = transformers names, vision_pooler, *_proj_*, aformer.*, itm_head). The
authors' CLIP ViT (``visual_encoder.visual.*``, OpenAI names) maps onto timm's
VisionTransformer; class and positional embeddings are reshaped ((768,) <-> (1, 1, 768),
(197, 768) <-> (1, 197, 768)). The unused CLIP text-side leftovers are dropped on load
and written as zeros; ``text_encoder.embeddings.position_ids`` (transformers 4.27) is
skipped on load.
"""
from __future__ import annotations

import re

import torch

from hat.checkpoint import load_mapped_state_dict

# keys of the authors' files that the model does not use
CLIP_TEXT_LEFTOVERS = {
    "visual_encoder.positional_embedding": (77, 512),
    "visual_encoder.token_embedding.weight": (49408, 512),
    "visual_encoder.ln_final.weight": (512,),
    "visual_encoder.ln_final.bias": (512,),
}
SKIPPED_KEYS = re.compile(r"^text_encoder\.embeddings\.position_ids$")
# timm ViT name (under visual_encoder.) -> the authors' name (under visual_encoder.visual.)
_VISUAL_NAMES = [
    (r"cls_token", "class_embedding"),
    (r"pos_embed", "positional_embedding"),
    (r"patch_embed\.proj\.weight", "conv1.weight"),
    (r"norm_pre\.(weight|bias)", r"ln_pre.\1"),
    (r"norm\.(weight|bias)", r"ln_post.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"transformer.resblocks.\1.ln_1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"transformer.resblocks.\1.ln_2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"transformer.resblocks.\1.attn.in_proj_\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"transformer.resblocks.\1.attn.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
]
# leading singleton dimensions timm has and the authors' tensors do not
_LEADING_ONES = {"visual_encoder.cls_token": 2, "visual_encoder.pos_embed": 1}


def is_released_multisea(state_dict: dict) -> bool:
    return any(k.startswith("visual_encoder.visual.") for k in state_dict) and any(
        k.startswith("aformer.encoder.layers.") for k in state_dict)


is_released = is_released_multisea  # the name hat.plugins.ModelPlugin looks for


def _ours_to_released_name(name: str) -> str:
    """Project state_dict name -> the authors' name (raises KeyError if it has none)."""
    if not name.startswith("visual_encoder."):
        return name
    timm_name = name[len("visual_encoder."):]
    for pattern, template in _VISUAL_NAMES:
        if re.fullmatch(pattern, timm_name):
            return "visual_encoder.visual." + re.sub(pattern, template, timm_name)
    raise KeyError(name)


def name_map(model) -> dict[str, str]:
    """Every entry of ``model.state_dict()`` -> its name in the authors' checkpoints."""
    mapping = {}
    for name in model.state_dict():
        try:
            mapping[name] = _ours_to_released_name(name)
        except KeyError:
            raise ValueError(f"parameter {name} has no counterpart in the released layout") from None
    return mapping


def _released_shape(name: str, shape) -> tuple:
    return tuple(shape)[_LEADING_ONES.get(name, 0):]


def _unused(key: str) -> bool:
    """A key of the authors' files that the model does not use."""
    return bool(SKIPPED_KEYS.search(key)) or key in CLIP_TEXT_LEFTOVERS


def to_released_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state under the authors' key names and shapes, plus the unused CLIP
    text-side entries as zeros (stride-0 views: no memory), as in their Lightning files."""
    state = model.state_dict()
    released = {}
    for ours, name in name_map(model).items():
        value = state[ours]
        released[name] = value.reshape(_released_shape(ours, value.shape))
    for name, shape in CLIP_TEXT_LEFTOVERS.items():
        released[name] = torch.zeros(()).expand(shape)
    return released


def load_released_state_dict(model, released: dict) -> dict:
    """Load the authors' ``state_dict`` into ``model``; checks every key and shape.

    Returns {"loaded": n, "skipped": [keys not used]}; raises ValueError listing missing,
    unexpected and mis-shaped keys if anything does not match."""
    return load_mapped_state_dict(model, released, name_map(model), skipped=_unused, source_shape=_released_shape)
