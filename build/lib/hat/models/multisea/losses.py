"""Multi-SEA training losses: ITC with a feature queue and
ITM with in-batch hard negatives, as plain functions of tensors.

Conventions: features f are [B, D] (not normalised); the queues are [D, Q] columns with
the image index of each column in idx_queue [1, Q] (-100 = empty). ``image_index`` [B]
is the dataset index of each pair's image: pairs with equal indices are positives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_targets(image_index: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
    """y_ij = 1[same image], normalised per row: image_index [B], key_index [K] -> [B, K]."""
    positive = (image_index[:, None] == key_index[None, :]).float()
    return positive / positive.sum(dim=1, keepdim=True)


def itc_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, image_index: torch.Tensor,
             image_queue: torch.Tensor, text_queue: torch.Tensor, idx_queue: torch.Tensor,
             temp: torch.Tensor) -> torch.Tensor:
    """InfoNCE with soft multi-positive targets over [in-batch keys; queue].

    In-batch keys are detached (gradient flows through the query side only); queue
    columns of the same image count as positives. Returns (CE_i2t + CE_t2i) / 2."""
    key_index = torch.cat([image_index.view(-1), idx_queue.view(-1)])  # [B + Q]
    targets = soft_targets(image_index.view(-1), key_index)  # [B, B + Q]
    text_keys = torch.cat([text_feats.detach(), text_queue.t()])  # [B + Q, D]
    image_keys = torch.cat([image_feats.detach(), image_queue.t()])
    sim_i2t = image_feats @ text_keys.t() / temp  # [B, B + Q]
    sim_t2i = text_feats @ image_keys.t() / temp
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


@torch.no_grad()
def enqueue_(image_queue: torch.Tensor, text_queue: torch.Tensor, idx_queue: torch.Tensor,
             queue_ptr: torch.Tensor, image_feats: torch.Tensor, text_feats: torch.Tensor,
             image_index: torch.Tensor) -> None:
    """FIFO write of a (gathered) batch at queue_ptr, wrapping around the end; in place,
    without a host synchronisation. A batch longer than the queue keeps its last Q rows."""
    size = image_queue.shape[1]
    batch = image_feats.shape[0]
    keep = min(batch, size)
    start = queue_ptr + (batch - keep)  # [1]
    columns = (start + torch.arange(keep, device=queue_ptr.device)) % size  # [keep]
    image_queue[:, columns] = image_feats[-keep:].t().to(image_queue.dtype)
    text_queue[:, columns] = text_feats[-keep:].t().to(text_queue.dtype)
    idx_queue[0, columns] = image_index.view(-1)[-keep:].to(idx_queue.dtype)
    queue_ptr.copy_((queue_ptr + batch) % size)


@torch.no_grad()
def sample_hard_negatives(query_feats: torch.Tensor, key_feats: torch.Tensor,
                          query_index: torch.Tensor, key_index: torch.Tensor, temp: torch.Tensor,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """One negative key per query, drawn from softmax(q k^T / tau) with same-image keys
    zeroed: query_feats [B, D], key_feats [N, D] (all ranks) -> key rows [B] (long).

    One ``torch.multinomial`` call for the whole batch (no per-sample host sync). A row
    whose weights all vanish (softmax underflow) draws uniformly among its negatives; a
    batch that holds one image only draws uniformly among all keys."""
    same = query_index.view(-1, 1) == key_index.view(1, -1)  # [B, N]
    weights = F.softmax(query_feats.float() @ key_feats.float().t() / temp.float(), dim=1)
    weights = weights.masked_fill(same, 0.0)
    negatives = (~same).float()
    negatives = torch.where(negatives.sum(1, keepdim=True) > 0, negatives, torch.ones_like(negatives))
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, negatives)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def build_itm_pairs(image_states: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor,
                    all_image_states: torch.Tensor, all_text_states: torch.Tensor,
                    all_text_mask: torch.Tensor, negative_image: torch.Tensor,
                    negative_text: torch.Tensor):
    """The 3B ITM pairs: (I_b, T_b) positive, (I_b, T_neg(b)), (I_neg(b), T_b) negative.

    image_states [B, R, D], text_states [B, L, D], text_mask [B, L]: this rank's batch;
    all_* the gathered batch that negative_image / negative_text [B] index into.
    Returns pair images [3B, R, D], pair texts [3B, L, D], pair text masks [3B, L] and
    labels [3B] (1 for the first B pairs, else 0)."""
    batch = image_states.shape[0]
    pair_images = torch.cat([image_states, image_states, all_image_states[negative_image]])
    pair_texts = torch.cat([text_states, all_text_states[negative_text], text_states])
    pair_mask = torch.cat([text_mask, all_text_mask[negative_text], text_mask])
    labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)])
    return pair_images, pair_texts, pair_mask, labels.to(image_states.device)


def itm_loss(logits_i2t: list[torch.Tensor], logits_t2i: list[torch.Tensor],
             labels: torch.Tensor) -> torch.Tensor:
    """Hierarchical ITM: the logits [3B, 2] of every supervised layer are concatenated per
    direction; L_itm = (CE_t2i + CE_i2t) / 2."""
    loss_i2t = F.cross_entropy(torch.cat(logits_i2t).float(), labels.repeat(len(logits_i2t)))
    loss_t2i = F.cross_entropy(torch.cat(logits_t2i).float(), labels.repeat(len(logits_t2i)))
    return (loss_t2i + loss_i2t) / 2
