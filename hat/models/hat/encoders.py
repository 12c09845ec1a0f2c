"""HAT's backbones, used through their libraries' own APIs.

* Image: a timm Swin built with ``features_only=True``; HAT adds a LayerNorm after every
  stage (new norms for stages 1-3, the pretrained final norm for stage 4). Output: one
  token sequence [B, H*W, C] per requested stage.
* Text: a transformers BERT with ``output_hidden_states=True``; output: the hidden
  states after the requested encoder layers, [B, L, width] each.

With ``pretrained=False`` nothing is read from disk or network: the architecture alone
is built (the weights then come from a checkpoint).
"""
from __future__ import annotations

import os
import re

import timm
import torch
from torch import nn

from hat.backbones import (BackboneError, check_image_weights, from_hub_or_cache, pretrained_timm_state,
                           resolve_text_backbone, text_config, text_weights_error)


class SwinStages(nn.Module):
    """timm Swin features at the given stages (1-based), each through its own LayerNorm.

    One norm is kept for every stage of the backbone, used or not, so that the authors'
    checkpoints (norm_0..norm_2 and the final norm) load without loss."""

    def __init__(self, model_name: str, stages, pretrained: bool = False, weights: str | None = None,
                 image_size: int = 224, **model_kwargs):
        super().__init__()
        self.stages = [int(s) for s in stages]
        num_stages = len(model_kwargs.get("depths") or (0, 0, 0, 0))
        bad = [s for s in self.stages if not 1 <= s <= num_stages]
        if bad:
            raise ValueError(f"image stages {bad} outside 1..{num_stages} of {model_name}")
        if pretrained or weights:  # offline without the weights: fail before building anything
            check_image_weights(model_name, weights)
        self.body = timm.create_model(
            model_name, pretrained=False, features_only=True, img_size=image_size,
            out_indices=tuple(s - 1 for s in self.stages), **model_kwargs,
        )
        all_channels = [info["num_chs"] for info in self.body.feature_info.info]
        self.stage_norms = nn.ModuleList(nn.LayerNorm(c) for c in all_channels)
        self.channels = [all_channels[s - 1] for s in self.stages]
        if pretrained or weights:
            self._load_pretrained(model_name, weights, image_size, model_kwargs)

    def _load_pretrained(self, model_name, weights, image_size, model_kwargs):
        """Load timm's (hub or local file) weights; the final norm becomes the last stage norm."""
        state = pretrained_timm_state(model_name, weights, image_size, **model_kwargs)
        body_state = {re.sub(r"^layers\.(\d+)\.", r"layers_\1.", k): v for k, v in state.items()
                      if not k.startswith(("norm.", "head."))}
        missing, _ = self.body.load_state_dict(body_state, strict=False)
        if missing:
            raise BackboneError(f"image_backbone={model_name}: pretrained weights lack {missing[:5]}")
        self.stage_norms[-1].load_state_dict({"weight": state["norm.weight"], "bias": state["norm.bias"]})

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for feature, stage, channels in zip(self.body(images), self.stages, self.channels):
            if feature.shape[-1] != channels:  # NCHW -> NHWC
                feature = feature.permute(0, 2, 3, 1)
            features.append(self.stage_norms[stage - 1](feature.flatten(1, 2)))  # [B, H*W, C]
        return features


class BertLayers(nn.Module):
    """Hidden states of a transformers BERT after the given encoder layers (1-based)."""

    def __init__(self, model_name: str, layers, pretrained: bool = True, dropout: float | None = None):
        super().__init__()
        from functools import partial

        from transformers import BertModel

        overrides = {} if dropout is None else {"hidden_dropout_prob": dropout,
                                                 "attention_probs_dropout_prob": dropout}
        if pretrained:
            path = resolve_text_backbone(model_name)
            load = partial(BertModel.from_pretrained, **overrides)
            try:
                self.bert = load(path) if os.path.isdir(path) else from_hub_or_cache(load, path)
            except OSError as error:  # offline: one line with every way out (HAT: level_pairs too)
                raise text_weights_error(model_name, error, level_pairs=True) from error
        else:
            config = text_config(model_name)
            for key, value in overrides.items():
                setattr(config, key, value)
            self.bert = BertModel(config)
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
