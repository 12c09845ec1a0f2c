"""Multi-SEA: multi-stage semantic enhancement and aggregation.

1. Encoding: V0 = CLIP ViT tokens [B, R, Wv], T0 = text tokens [B, L, Wt], p_T = text
   pooler; g_I = P_vf(tanh(W V0[:, 0])), E_I = P_ve(V0); g_T = P_tf(p_T), E_T = P_te(T0).
2. Enhancement: H = AFormer(E, mode=image|text); with one learnable alpha,
   f = alpha * pool(H) + (1 - alpha) * g  [B, D] (the retrieval embedding, not normalised)
   F = alpha * H + (1 - alpha) * E        [B, R or L, D].
3. Aggregation: AFormer(F_I, ctx F_T, i2t) / AFormer(F_T, ctx F_I, t2i), then the ITM
   head on token 0.

Attribute names follow the authors' checkpoints (temp, alpha, queues, vision_proj_f/e,
vision_pooler, text_proj_f/e, aformer, itm_head; text_encoder is the transformers model
itself); only the timm ViT's names differ (see hat/multisea/released.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hat.models.multisea.aformer import AFormer, Pooler
from hat.models.multisea.losses import build_itm_pairs, enqueue_, itc_loss, itm_loss, sample_hard_negatives


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class MultiSEA(nn.Module):
    def __init__(self, visual_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int = 768,
                 num_layers: int = 4, num_heads: int = 12, mlp_ratio: int = 4, dropout: float = 0.1,
                 num_agents: int = 40, activation: str = "hard_swish_clip1", queue_size: int = 1000,
                 itm_layers=(2, 4), alpha_init: float = 0.7, temp_init: float = 1.0,
                 alpha_range=(0.2, 0.8), temp_range=(0.1, 3.0)):
        super().__init__()
        vision_width = visual_encoder.embed_dim
        text_width = text_encoder.config.hidden_size
        self.itm_layers = tuple(int(layer) for layer in itm_layers)
        if not all(1 <= layer <= num_layers for layer in self.itm_layers):
            raise ValueError(f"itm_layers {self.itm_layers} outside 1..{num_layers}")
        self.alpha_range = tuple(alpha_range)
        self.temp_range = tuple(temp_range)

        self.temp = nn.Parameter(torch.tensor(float(temp_init)))  # tau
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))  # enhancement gate
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        self.vision_pooler = Pooler(vision_width)
        self.vision_proj_f = nn.Linear(vision_width, embed_dim)
        self.vision_proj_e = nn.Linear(vision_width, embed_dim)
        self.text_proj_f = nn.Linear(text_width, embed_dim)
        self.text_proj_e = nn.Linear(text_width, embed_dim)
        self.aformer = AFormer(embed_dim, num_layers, num_heads, mlp_ratio, dropout, num_agents, activation)
        self.itm_head = nn.Linear(embed_dim, 2)
        for name, param in self.aformer.named_parameters():  # kept only so checkpoints load
            if name.startswith("encoder.norm.") or ".dwc." in name:
                param.requires_grad_(False)

        # the ITC negative queue: detached features of the current model, FIFO
        self.register_buffer("image_queue", F.normalize(torch.rand(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.rand(embed_dim, queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, queue_size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # ---------------------------------------------------------------- encoding
    def _enhance(self, pooled, tokens, mask, mode):
        """(g [B, D], E [B, L, D]) -> (f [B, D], F [B, L, D]) through the AFormer."""
        hidden = self.aformer(tokens, mask, mode=mode)[-1]  # H [B, L, D]
        alpha = self.alpha
        return (alpha * self.aformer.pooler(hidden) + (1 - alpha) * pooled,
                alpha * hidden + (1 - alpha) * tokens)

    def encode_images(self, images: torch.Tensor):
        """images [B, 3, H, W] -> (f_I [B, D], F_I [B, R, D]); R = 197 for ViT-B/16 at 224."""
        tokens = self.visual_encoder.forward_features(images)  # V0 [B, R, Wv], ln_post applied
        pooled = self.vision_proj_f(self.vision_pooler(tokens))  # g_I [B, D]
        return self._enhance(pooled, self.vision_proj_e(tokens), None, "image")

    def encode_captions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """input_ids, attention_mask [B, L] -> (f_T [B, D], F_T [B, L, D]). Pad captions
        to the training length (40): the agent tokens depend on L."""
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        pooled = self.text_proj_f(out.pooler_output)  # g_T [B, D]
        return self._enhance(pooled, self.text_proj_e(out.last_hidden_state), attention_mask, "text")

    # ---------------------------------------------------------------- matching
    def itm_logits(self, image_states: torch.Tensor, text_states: torch.Tensor,
                   text_mask: torch.Tensor | None, direction: str, layers=None) -> list[torch.Tensor]:
        """ITM logits [B, 2] of pairs (image_states [B, R, D], text_states [B, L, D]) after
        each of ``layers`` (1-based; default: the last layer only).
        i2t: the image expert attends to the text; t2i: the text expert to the image."""
        layers = tuple(layers) if layers is not None else (self.aformer.num_layers,)
        if direction == "i2t":
            states = self.aformer(image_states, None, mode="i2t", context=text_states,
                                  context_mask=text_mask, num_layers=max(layers))
        elif direction == "t2i":
            states = self.aformer(text_states, text_mask, mode="t2i", context=image_states,
                                  context_mask=None, num_layers=max(layers))
        else:
            raise ValueError(f"direction={direction!r}; allowed: i2t, t2i")
        return [self.itm_head(states[layer - 1][:, 0]) for layer in layers]

    def pair_scores(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Coarse ITC scores S = f_I f_T^T / tau: [N_images, D] x [N_captions, D] -> [N_images, N_captions]."""
        return image_feats @ text_feats.t() / self.temp.to(image_feats.dtype)

    # ---------------------------------------------------------------- training
    @torch.no_grad()
    def clamp_scalars_(self) -> None:
        """alpha to [0.2, 0.8], tau to [0.1, 3.0] (before every training forward)."""
        self.alpha.clamp_(*self.alpha_range)
        self.temp.clamp_(*self.temp_range)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_index: torch.Tensor | None = None, gather=_identity, generator: torch.Generator | None = None,
                update_queue: bool = True, encode_only: bool = False) -> dict:
        """One training forward: L = L_itc + L_itm. Returns {"loss", "loss_itc", "loss_itm"}.

        images [B, 3, H, W]; input_ids, attention_mask [B, L]; image_index [B] (dataset
        index of each pair's image). ``gather`` concatenates a tensor over ranks along
        dim 0 (identity on one process; under DDP it must carry gradients, e.g. an
        all_gather_with_grad): used for the queue write and the hard-negative pool.
        The queue is written after the ITC loss (update_queue=False leaves it alone).
        ``encode_only``: the encoders' outputs alone (`encode_pairs`; exact accumulation
        encodes through the forward and takes the losses of all micro-batches at once
        with `pair_losses`)."""
        if self.training:
            self.clamp_scalars_()
        features = self.encode_pairs(images, input_ids, attention_mask)
        if encode_only:
            return features
        return self.pair_losses(features, attention_mask, image_index, gather, generator, update_queue)

    def encode_pairs(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """{"image_feats" f_I [B, D], "image_states" F_I [B, R, D], "text_feats" f_T [B, D],
        "text_states" F_T [B, L, D]} of a batch of pairs (images first, then captions)."""
        image_feats, image_states = self.encode_images(images)
        text_feats, text_states = self.encode_captions(input_ids, attention_mask)
        return {"image_feats": image_feats, "image_states": image_states, "text_feats": text_feats,
                "text_states": text_states}

    def pair_losses(self, features: dict, attention_mask: torch.Tensor, image_index: torch.Tensor,
                    gather=_identity, generator: torch.Generator | None = None, update_queue: bool = True) -> dict:
        """ITC over [batch; queue], the queue write, the hard negatives and ITM of
        `encode_pairs`' features of a batch (see `forward`)."""
        image_feats, image_states = features["image_feats"], features["image_states"]
        text_feats, text_states = features["text_feats"], features["text_states"]
        image_index = image_index.view(-1).to(self.idx_queue.device)
        loss_itc = itc_loss(image_feats, text_feats, image_index, self.image_queue, self.text_queue,
                            self.idx_queue, self.temp)
        all_index = gather(image_index)  # [N] over ranks
        all_image_feats, all_text_feats = gather(image_feats), gather(text_feats)  # [N, D]
        if update_queue:
            enqueue_(self.image_queue, self.text_queue, self.idx_queue, self.queue_ptr,
                     all_image_feats.detach(), all_text_feats.detach(), all_index)

        negative_image = sample_hard_negatives(text_feats.detach(), all_image_feats.detach(), image_index,
                                               all_index, self.temp.detach(), generator)  # [B]
        negative_text = sample_hard_negatives(image_feats.detach(), all_text_feats.detach(), image_index,
                                              all_index, self.temp.detach(), generator)
        pair_images, pair_texts, pair_mask, labels = build_itm_pairs(
            image_states, text_states, attention_mask, gather(image_states), gather(text_states),
            gather(attention_mask), negative_image, negative_text)
        logits_i2t = self.itm_logits(pair_images, pair_texts, pair_mask, "i2t", self.itm_layers)
        logits_t2i = self.itm_logits(pair_images, pair_texts, pair_mask, "t2i", self.itm_layers)
        loss_itm = itm_loss(logits_i2t, logits_t2i, labels)
        return {"loss": loss_itc + loss_itm, "loss_itc": loss_itc, "loss_itm": loss_itm}

    def parameter_groups(self, lr: float = 1e-5, encoder_lr: float = 1e-6, alpha_lr: float = 1e-4,
                         temp_lr: float = 5e-4, weight_decay: float = 0.05) -> list[dict]:
        """AdamW groups of the recipe: AFormer, projections, poolers, ITM head at ``lr``;
        text and visual encoders at ``encoder_lr``; alpha; tau. Weight decay on every
        group; frozen parameters are left out."""
        groups = {"default": [], "encoder": [], "alpha": [], "temp": []}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name in ("alpha", "temp"):
                groups[name].append(param)
            elif name.startswith(("visual_encoder.", "text_encoder.")):
                groups["encoder"].append(param)
            else:
                groups["default"].append(param)
        rates = {"default": lr, "encoder": encoder_lr, "alpha": alpha_lr, "temp": temp_lr}
        return [{"name": name, "params": params, "lr": rates[name], "weight_decay": weight_decay}
                for name, params in groups.items() if params]


def build_multisea(image_backbone: str = "vit_base_patch16_clip_quickgelu_224.openai",
                   text_backbone: str = "roberta-base", vision_depth: int = 11, image_size: int = 224,
                   image_pretrained: bool = True, text_pretrained: bool = True,
                   image_weights: str | None = None, image_backbone_kwargs: dict | None = None,
                   frozen_vision_blocks: int = 7, freeze_vision_stem: bool = True,
                   **model_kwargs) -> MultiSEA:
    """Factory: a timm CLIP ViT with ``vision_depth`` blocks (first ``frozen_vision_blocks``
    and, freeze_vision_stem, conv1/cls/pos/ln_pre frozen) + a transformers text model with
    a pooler; model_kwargs go to MultiSEA (embed_dim, num_layers, num_heads, mlp_ratio,
    dropout, num_agents, activation, queue_size, itm_layers, ...).

    With image_pretrained/text_pretrained False nothing is downloaded or read: the
    architecture is built and the weights are expected from a checkpoint."""
    from hat.models.multisea.encoders import build_clip_vision, build_text_encoder, freeze_clip_vision

    vit = build_clip_vision(image_backbone, depth=vision_depth, pretrained=image_pretrained,
                            weights=image_weights if image_pretrained else None, image_size=image_size,
                            **(image_backbone_kwargs or {}))
    freeze_clip_vision(vit, frozen_vision_blocks, stem=freeze_vision_stem)
    text = build_text_encoder(text_backbone, pretrained=text_pretrained)
    return MultiSEA(vit, text, **model_kwargs)
