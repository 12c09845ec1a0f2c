"""Retrieval evaluation: encode once, score every pair, apply the recall protocol.

The protocol (spec evaluation.md): for each query the rank is the number of negatives
scoring at least as high as its best positive (ties never favour the positive).
Ranks are computed in chunks of queries on the device holding the score matrix.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from hat.alignment import scan_similarity

METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
    "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr",
)
RANK_CHUNK = 1024


def _as_tensor(values) -> torch.Tensor:
    return values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))


def retrieval_ranks(sims, caption_to_image=None) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks: (i2t ranks [N_images], t2i ranks [N_captions])."""
    sims = _as_tensor(sims)
    n_images, n_captions = sims.shape
    device = sims.device
    if caption_to_image is None:
        caption_to_image = torch.arange(n_captions, device=device) // 5
    caption_to_image = _as_tensor(caption_to_image).to(device=device, dtype=torch.long)
    if caption_to_image.shape != (n_captions,):
        raise ValueError(
            f"caption_to_image has {tuple(caption_to_image.shape)} entries for {n_captions} captions"
        )
    if caption_to_image.min() < 0 or caption_to_image.max() >= n_images:
        raise ValueError(f"caption_to_image refers to images outside 0..{n_images - 1}")
    if torch.bincount(caption_to_image, minlength=n_images).min() == 0:
        raise ValueError("every image needs at least one caption for image->text ranks")

    i2t = torch.empty(n_images, dtype=torch.long, device=device)
    for start in range(0, n_images, RANK_CHUNK):
        rows = sims[start:start + RANK_CHUNK]  # [Q, N_captions]
        query = torch.arange(start, start + rows.shape[0], device=device)
        positive = caption_to_image[None, :] == query[:, None]  # [Q, N_captions]
        best = rows.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
        i2t[start:start + rows.shape[0]] = ((rows >= best) & ~positive).sum(dim=1)

    t2i = torch.empty(n_captions, dtype=torch.long, device=device)
    images = torch.arange(n_images, device=device)
    for start in range(0, n_captions, RANK_CHUNK):
        cols = sims[:, start:start + RANK_CHUNK]  # [N_images, Q]
        owner = caption_to_image[start:start + cols.shape[1]]
        positive = images[:, None] == owner[None, :]
        score = cols.gather(0, owner[None, :])  # [1, Q]
        t2i[start:start + cols.shape[1]] = ((cols >= score) & ~positive).sum(dim=0)
    return i2t, t2i


def _summarise(ranks: torch.Tensor, prefix: str) -> dict:
    ranks = ranks.cpu().numpy()
    out = {f"{prefix}_r{k}": 100.0 * float((ranks < k).sum()) / len(ranks) for k in (1, 5, 10)}
    out[f"{prefix}_medr"] = float(math.floor(np.median(ranks)) + 1)
    out[f"{prefix}_meanr"] = float(ranks.mean() + 1)
    return out


def recall(sims, caption_to_image=None) -> dict:
    """Recall@1/5/10, medr, meanr in both directions and rsum for sims [N_images, N_captions].

    caption_to_image [N_captions] gives each caption's image (default: j // 5).
    """
    i2t, t2i = retrieval_ranks(sims, caption_to_image)
    metrics = {**_summarise(i2t, "i2t"), **_summarise(t2i, "t2i")}
    metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return {key: metrics[key] for key in METRIC_KEYS}


def format_table(metrics: dict, title: str = "") -> str:
    """A small fixed-width table of a metrics dict from `recall`."""
    lines = [title] if title else []
    lines.append(f"{'':>6} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'medr':>6} {'meanr':>8}")
    for direction, label in (("i2t", "i2t"), ("t2i", "t2i")):
        lines.append(
            f"{label:>6} {metrics[f'{direction}_r1']:7.2f} {metrics[f'{direction}_r5']:7.2f} "
            f"{metrics[f'{direction}_r10']:7.2f} {metrics[f'{direction}_medr']:6.0f} "
            f"{metrics[f'{direction}_meanr']:8.2f}"
        )
    lines.append(f"{'rsum':>6} {metrics['rsum']:7.2f}")
    return "\n".join(lines)


@torch.no_grad()
def encode_images(model, loader, device) -> list[torch.Tensor]:
    """Encode every image once -> per level [N_images, R_level, D]."""
    levels = None
    for images in loader:
        features = model.encode_images(images.to(device, non_blocking=True))
        if levels is None:
            levels = [[] for _ in features]
        for store, feature in zip(levels, features):
            store.append(feature.float())
    return [torch.cat(store) for store in levels]


@torch.no_grad()
def encode_captions(model, loader, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Encode every caption once -> (per level [N_captions, L_max, D], lengths [N_captions])."""
    levels, lengths = None, []
    for batch in loader:
        mask = batch["attention_mask"].to(device)
        features = model.encode_captions(batch["input_ids"].to(device), mask)
        if levels is None:
            levels = [[] for _ in features]
        for store, feature in zip(levels, features):
            store.append(feature.float())
        lengths.append(mask.sum(dim=1))
    longest = max(f.shape[1] for f in levels[0])
    padded = [torch.cat([torch.nn.functional.pad(f, (0, 0, 0, longest - f.shape[1])) for f in store])
              for store in levels]
    return padded, torch.cat(lengths)


def evaluate(model, image_loader, caption_loader, caption_to_image, device,
             image_tile=None, caption_tile=None) -> tuple[dict, torch.Tensor]:
    """Encode once, score all pairs (sum of the level scores), apply the protocol."""
    was_training = model.training
    model.eval()
    try:
        image_features = encode_images(model, image_loader, device)
        caption_features, lengths = encode_captions(model, caption_loader, device)
        with torch.no_grad():
            sims = model.score(image_features, caption_features, lengths,
                               image_tile=image_tile, caption_tile=caption_tile)
    finally:
        model.train(was_training)
    return recall(sims, caption_to_image), sims
