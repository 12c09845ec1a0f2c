"""SCAN-style cross attention between image regions and caption words (HAT, spec section 2).

One score per (image, caption) pair and level. Both directions use the Gram-matrix
identities of the spec, so the attended context vectors are never materialised:

* i2t (regions are queries):  cos(v_r, c_r) = (sum_w a_rw s_wr) / (|v_r| sqrt(a_r^T G a_r)),
  G = T T^T the caption's word Gram matrix [L, L].
* t2i (words are queries):    cos(t_w, c_w) = (sum_r a_wr s_rw) / (|t_w| sqrt(a_w^T H a_w)),
  H = V V^T the image's region Gram matrix [R, R].

The work is done in tiles of images x captions so that peak memory is bounded by the
tile sizes, not by N_images x N_captions. The same code path serves training (autograd)
and evaluation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LEAKY_SLOPE = 0.1
NORM_EPS = 1e-8  # added to the L2 norm of the attention logits
COS_EPS = 1e-8  # cos(x, y) = x.y / max(|x||y|, COS_EPS)

# Default tile sizes: a tile holds about tile_images * R * tile_captions * L scores.
DEFAULT_TILE_ELEMENTS = 2**24


def _pick_tiles(n_images, n_captions, regions, words, image_tile, caption_tile):
    if caption_tile is None:
        caption_tile = min(n_captions, 512)
    if image_tile is None:
        per_image = regions * words * caption_tile
        image_tile = max(1, min(n_images, DEFAULT_TILE_ELEMENTS // max(per_image, 1)))
    return int(image_tile), int(caption_tile)


def _safe_norm(values: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 norm over ``dim`` (kept) whose gradient is 0, not NaN, where all values are 0
    (padding words)."""
    square_sum = values.square().sum(dim=dim, keepdim=True)
    nonzero = square_sum > 0
    return torch.where(nonzero, torch.where(nonzero, square_sum, 1.0).sqrt(), 0.0)


def _i2t_tile(images, image_norms, captions, word_mask, caption_gram, lambda_softmax):
    """images [I, R, D], image_norms [I, R], captions [C, L, D] (padding zeroed),
    word_mask [C, L] bool, caption_gram [C, L, L] -> scores [I, C]."""
    n_images, regions, dim = images.shape
    n_captions, words, _ = captions.shape
    flat_regions = images.reshape(n_images * regions, dim)
    raw = torch.matmul(captions, flat_regions.t())  # [C, L, I*R]  s_wr = t_w . v_r
    attn = F.leaky_relu(raw, LEAKY_SLOPE).view(n_captions, words, n_images, regions)
    norm = _safe_norm(attn, dim=3) + NORM_EPS  # over regions, per word
    logits = (lambda_softmax * attn / norm).view(n_captions, words, n_images * regions)
    logits = logits.masked_fill(~word_mask[:, :, None], float("-inf"))
    weights = torch.softmax(logits, dim=1)  # over the caption's words: a_rw [C, L, I*R]
    numerator = (weights * raw).sum(dim=1)  # v_r . c_r  [C, I*R]
    context_sq = (torch.matmul(caption_gram, weights) * weights).sum(dim=1)  # |c_r|^2
    denom_sq = image_norms.reshape(1, -1).square() * context_sq
    cosine = numerator / denom_sq.clamp_min(COS_EPS**2).sqrt()  # [C, I*R]
    return cosine.view(n_captions, n_images, regions).mean(dim=2).t()  # [I, C]


def _t2i_tile(images, image_gram, captions, word_mask, word_norms, lambda_softmax):
    """images [I, R, D], image_gram [I, R, R], captions [C, L, D] (padding zeroed),
    word_mask [C, L] bool, word_norms [C, L] -> scores [I, C]."""
    n_images, regions, dim = images.shape
    n_captions, words, _ = captions.shape
    flat_words = captions.reshape(n_captions * words, dim)
    raw = torch.matmul(flat_words, images.transpose(1, 2))  # [I, C*L, R]  s_rw = v_r . t_w
    mask = word_mask.reshape(1, n_captions, words, 1)
    attn = F.leaky_relu(raw, LEAKY_SLOPE).view(n_images, n_captions, words, regions)
    attn = attn.masked_fill(~mask, 0.0)
    norm = _safe_norm(attn, dim=2) + NORM_EPS  # over words, per region
    logits = (lambda_softmax * attn / norm).view(n_images, n_captions * words, regions)
    weights = torch.softmax(logits, dim=2)  # over regions: a_wr [I, C*L, R]
    numerator = (weights * raw).sum(dim=2)  # t_w . c_w  [I, C*L]
    context_sq = (torch.matmul(weights, image_gram) * weights).sum(dim=2)  # |c_w|^2
    denom_sq = word_norms.reshape(1, -1).square() * context_sq
    cosine = numerator / denom_sq.clamp_min(COS_EPS**2).sqrt()
    cosine = cosine.view(n_images, n_captions, words).masked_fill(~word_mask[None], 0.0)
    return cosine.sum(dim=2) / word_mask.sum(dim=1).to(cosine.dtype)[None]  # [I, C]


def scan_similarity(
    images: torch.Tensor,
    captions: torch.Tensor,
    caption_lengths: torch.Tensor,
    direction: str = "i2t",
    lambda_softmax: float = 9.0,
    image_tile: int | None = None,
    caption_tile: int | None = None,
) -> torch.Tensor:
    """Score every image against every caption at one level.

    images [N_images, R, D]; captions [N_captions, L, D]; caption_lengths [N_captions]
    counts the real tokens ([CLS] and [SEP] included); later positions are padding and
    do not influence the result. Returns [N_images, N_captions] in the inputs' dtype.
    """
    if direction not in ("i2t", "t2i"):
        raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")
    if images.dim() != 3 or captions.dim() != 3 or images.shape[2] != captions.shape[2]:
        raise ValueError(
            f"expected images [N, R, D] and captions [M, L, D], got {tuple(images.shape)} "
            f"and {tuple(captions.shape)}"
        )
    n_images, regions, _ = images.shape
    n_captions, words, _ = captions.shape
    caption_lengths = torch.as_tensor(caption_lengths, device=captions.device)
    positions = torch.arange(words, device=captions.device)
    word_mask = positions[None, :] < caption_lengths[:, None]  # [C, L]
    captions = captions.masked_fill(~word_mask[:, :, None], 0.0)  # padding -> exact zeros
    image_tile, caption_tile = _pick_tiles(
        n_images, n_captions, regions, words, image_tile, caption_tile
    )

    if direction == "i2t":
        image_side = images.norm(dim=2)  # |v_r|  [N, R]
        caption_side = torch.matmul(captions, captions.transpose(1, 2))  # G  [M, L, L]
        tile_fn = _i2t_tile
    else:
        image_side = torch.matmul(images, images.transpose(1, 2))  # H  [N, R, R]
        caption_side = captions.norm(dim=2)  # |t_w|  [M, L]
        tile_fn = _t2i_tile

    rows = []
    for i0 in range(0, n_images, image_tile):
        i1 = min(i0 + image_tile, n_images)
        cols = []
        for c0 in range(0, n_captions, caption_tile):
            c1 = min(c0 + caption_tile, n_captions)
            block = tile_fn(images[i0:i1], image_side[i0:i1], captions[c0:c1],
                            word_mask[c0:c1], caption_side[c0:c1], lambda_softmax)
            cols.append(block)
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)
