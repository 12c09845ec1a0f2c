"""Multi-SEA backbones through timm and transformers.

* Image: a timm CLIP ViT (default OpenAI ViT-B/16, QuickGELU) built with the first 11
  blocks; ``forward_features`` gives all tokens through the final norm (CLIP's ln_post),
  [B, 1 + patches, width]. CLIP's visual projection is not built (num_classes=0).
* Text: any transformers BERT-like model with a pooler (RoBERTa-base by default);
  ``last_hidden_state`` [B, L, width] and ``pooler_output`` [B, width].

With ``pretrained=False`` nothing is read from disk or network: the architecture alone
is built (weights from a checkpoint). RoBERTa-base's architecture is known offline.
"""
from __future__ import annotations

import os

import timm
from torch import nn

from hat.backbones import (check_image_weights, from_hub_or_cache, pretrained_timm_state, resolve_text_backbone,
                           text_weights_error)
from hat.backbones import text_config as backbone_text_config

CLIP_VIT_B16 = "vit_base_patch16_clip_quickgelu_224.openai"
ROBERTA_BASE_NAMES = {"roberta-base", "FacebookAI/roberta-base"}


def roberta_base_config():
    """RoBERTa-base's configuration (its hub config.json), built offline."""
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                         pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)


def build_clip_vision(model_name: str = CLIP_VIT_B16, depth: int = 11, pretrained: bool = False,
                      weights: str | None = None, image_size: int = 224, **timm_kwargs) -> nn.Module:
    """A timm CLIP ViT with ``depth`` blocks and no head. Pretrained weights (timm hub
    tag, or ``weights``: a local timm checkpoint file) are those of the full-depth model
    with the blocks beyond ``depth`` dropped. timm_kwargs override the architecture
    (patch_size, embed_dim, num_heads, ...: a tiny ViT for the demo)."""
    if pretrained or weights:  # offline without the weights: fail before building anything
        check_image_weights(model_name, weights)
    vit = timm.create_model(model_name, pretrained=False, num_classes=0, depth=depth,
                            img_size=image_size, **timm_kwargs)
    if pretrained or weights:
        full = pretrained_timm_state(model_name, weights, image_size, **timm_kwargs)
        own = vit.state_dict()
        vit.load_state_dict({k: v for k, v in full.items() if k in own}, strict=True)
    return vit


def freeze_clip_vision(vit: nn.Module, num_frozen_blocks: int = 7, stem: bool = True) -> None:
    """Freeze the patch embedding (CLIP conv1), class and positional embeddings, the
    pre-norm (ln_pre) and the first ``num_frozen_blocks`` blocks; the rest trains."""
    if stem:
        for module in (vit.patch_embed, vit.norm_pre):
            module.requires_grad_(False)
        vit.cls_token.requires_grad_(False)
        vit.pos_embed.requires_grad_(False)
    for block in vit.blocks[:num_frozen_blocks]:
        block.requires_grad_(False)


def text_config(text_backbone: str):
    """The text backbone's configuration without weights (offline for roberta-base and
    bert-base-uncased, else a local folder or the hub)."""
    if text_backbone in ROBERTA_BASE_NAMES:
        return roberta_base_config()
    return backbone_text_config(text_backbone)


def build_text_encoder(text_backbone: str = "roberta-base", pretrained: bool = True) -> nn.Module:
    """A transformers AutoModel with a pooler: a hub name, a local folder or
    ``packaged-minilm``. pretrained=False builds the architecture only."""
    from transformers import AutoModel

    if pretrained:
        path = resolve_text_backbone(text_backbone)
        try:
            model = (AutoModel.from_pretrained(path) if os.path.isdir(path)
                     else from_hub_or_cache(AutoModel.from_pretrained, path))
        except OSError as error:  # offline: one line with every way out
            raise text_weights_error(text_backbone, error) from error
    else:
        model = AutoModel.from_config(text_config(text_backbone))
    if getattr(model, "pooler", None) is None:
        raise ValueError(f"text_backbone={text_backbone} has no pooler; Multi-SEA needs p_T = "
                         f"tanh(W h_0) from a BERT-like model with a pooler")
    return model
