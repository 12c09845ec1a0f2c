"""HAT: hierarchical alignment of Swin stages and BERT layers."""
from __future__ import annotations

import torch
from torch import nn

from hat.distributed import pad_dim_to
from hat.models.hat.alignment import scan_similarity


def _projection(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, mean=0.0, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer


def summed_scores(image_features, caption_features, caption_lengths, direction: str = "i2t",
                  lambda_softmax: float = 9.0, image_tile=None, caption_tile=None,
                  recompute: bool = True) -> torch.Tensor:
    """HAT's score of encoded images and captions: the SCAN similarities of the levels
    (per level [N_images, R, D] and [N_captions, L, D]) added up -> [N_images, N_captions].
    ``recompute``: memory-bounded scoring under autograd (see scan_similarity)."""
    return summed_levels(
        scan_similarity(images, captions, caption_lengths, direction=direction, lambda_softmax=lambda_softmax,
                        image_tile=image_tile, caption_tile=caption_tile, recompute=recompute)
        for images, captions in zip(image_features, caption_features))


def join_features(features: list[dict]) -> dict:
    """The features of several micro-batches (`HAT.forward` with encode_only) as one batch's:
    concatenated in order, the word features zero-padded to the longest caption first (the
    lengths mask the padding)."""
    longest = max(part["captions"][0].shape[1] for part in features)
    levels = range(len(features[0]["images"]))
    return {"images": [torch.cat([part["images"][k] for part in features]) for k in levels],
            "captions": [torch.cat([pad_dim_to(part["captions"][k], 1, longest) for part in features])
                         for k in levels],
            "lengths": torch.cat([part["lengths"] for part in features])}


def summed_levels(levels) -> torch.Tensor:
    """HAT's score from its level matrices (an iterable of [N_images, N_captions]): their
    sum, added in level order (training, evaluation and search add them alike)."""
    total = None
    for level in levels:
        total = level if total is None else total + level
    return total


class HAT(nn.Module):
    """Two-stream encoder scored by SCAN cross attention at several levels.

    Level k pairs image stage ``image_encoder.stages[k]`` with text layer
    ``text_encoder.layers[k]``; each side gets its own linear projection to
    ``embed_dim`` (no activation, no normalisation). A pair's score is the unweighted
    sum of the level scores.
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int = 768,
                 lambda_softmax: float = 9.0, direction: str = "i2t", recompute_scores: bool = True):
        super().__init__()
        if len(image_encoder.channels) != len(text_encoder.layers):
            raise ValueError("image stages and text layers must pair up one to one")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_proj = nn.ModuleList(_projection(c, embed_dim) for c in image_encoder.channels)
        self.text_proj = nn.ModuleList(
            _projection(text_encoder.width, embed_dim) for _ in text_encoder.layers
        )
        self.lambda_softmax = float(lambda_softmax)
        self.direction = direction
        self.recompute_scores = recompute_scores  # training: scoring memory bounded by one tile

    @property
    def num_levels(self) -> int:
        return len(self.image_proj)

    def encode_images(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, 3, H, W] -> per level [B, R_level, embed_dim]."""
        stages = self.image_encoder(images)
        return [proj(stage) for proj, stage in zip(self.image_proj, stages)]

    def encode_captions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, text_layers=None):
        """input_ids, attention_mask [B, L] -> per level [B, L, embed_dim]. ``text_layers``:
        the text encoder's output for them, if already computed."""
        layers = self.text_encoder(input_ids, attention_mask) if text_layers is None else text_layers
        return [proj(layer) for proj, layer in zip(self.text_proj, layers)]

    def score(self, image_features, caption_features, caption_lengths, image_tile=None,
              caption_tile=None) -> torch.Tensor:
        """Summed level scores [N_images, N_captions] of encoded images and captions."""
        return summed_scores(image_features, caption_features, caption_lengths, self.direction,
                             self.lambda_softmax, image_tile, caption_tile, self.recompute_scores)

    def forward(self, images, input_ids, attention_mask, gather=None, encode_only: bool = False,
                keep_text_layers: bool = False, text_layers=None):
        """Batch score matrix [B_images, B_captions] for training. ``gather(tensor,
        pad_dim)`` (optional) collects every process's features, so that the batch's
        negatives are global under DistributedDataParallel. ``encode_only``: the features
        alone, {"images", "captions": per level, "lengths"} (exact accumulation encodes
        through the forward and scores all micro-batches at once with `batch_scores`);
        ``keep_text_layers`` adds the text encoder's layers (``"text_layers"``), and
        ``text_layers`` given are used instead of running the text encoder."""
        images = self.encode_images(images)
        if keep_text_layers and text_layers is None:
            text_layers = self.text_encoder(input_ids, attention_mask)
        features = {"images": images, "captions": self.encode_captions(input_ids, attention_mask, text_layers),
                    "lengths": attention_mask.sum(dim=1)}
        if keep_text_layers:
            features["text_layers"] = [layer.detach() for layer in text_layers]
        return features if encode_only else self.batch_scores(features, gather)

    def batch_scores(self, features: dict, gather=None) -> torch.Tensor:
        """The training score matrix of `forward`'s features (``gather``: as in forward)."""
        image_features, caption_features, lengths = features["images"], features["captions"], features["lengths"]
        if gather is not None:
            image_features = [gather(f) for f in image_features]
            caption_features = [gather(f, pad_dim=1) for f in caption_features]
            lengths = gather(lengths)
        return self.score(image_features, caption_features, lengths)

    def set_backbones_trainable(self, image: bool, text: bool) -> None:
        """HAT trains only the projections while the backbones are frozen (they stay in
        train mode, as in the released code); the BERT pooler is never trained."""
        self.image_encoder.requires_grad_(image)
        for stage, norm in enumerate(self.image_encoder.stage_norms, start=1):
            if stage not in self.image_encoder.stages:  # kept for checkpoints, never used
                norm.requires_grad_(False)
        for param in self.text_encoder.encoder_parameters():
            param.requires_grad_(text)

    def trainable_names(self) -> tuple[str, ...]:
        return tuple(name for name, param in self.named_parameters() if param.requires_grad)


def build_hat(image_backbone: str, text_backbone: str, level_pairs, embed_dim: int = 768,
              lambda_softmax: float = 9.0, direction: str = "i2t", image_size: int = 224,
              image_pretrained: bool = True, text_pretrained: bool = True,
              image_weights: str | None = None, image_backbone_kwargs: dict | None = None,
              text_dropout: float | None = None, recompute_scores: bool = True) -> HAT:
    """Factory: ``level_pairs`` is a list of (image stage, text layer), both 1-based.

    With image_pretrained/text_pretrained False nothing is downloaded or read: the
    architecture is built and the weights are expected from a checkpoint. ``text_dropout``
    overrides the text backbone's dropout probabilities (None keeps its own)."""
    from hat.models.hat.encoders import BertLayers, SwinStages

    stages = [int(pair[0]) for pair in level_pairs]
    layers = [int(pair[1]) for pair in level_pairs]
    image_encoder = SwinStages(image_backbone, stages, pretrained=image_pretrained,
                               weights=image_weights if image_pretrained else None,
                               image_size=image_size, **(image_backbone_kwargs or {}))
    text_encoder = BertLayers(text_backbone, layers, pretrained=text_pretrained, dropout=text_dropout)
    return HAT(image_encoder, text_encoder, embed_dim, lambda_softmax, direction, recompute_scores)
