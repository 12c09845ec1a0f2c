"""VSE++ triplet ranking loss over a batch score matrix (HAT)."""
from __future__ import annotations

import torch


def vse_loss(
    scores: torch.Tensor,
    margin: float = 0.2,
    hardest_negative: bool = True,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional hinge loss, summed over the batch.

    scores [B, B]: rows images, columns captions, the diagonal holds the positive pairs.
    hardest_negative=True is VSE++ (max over negatives); False sums over all negatives
    (the VSE-infinity style warm-up that keeps a randomly initialised encoder from
    collapsing). positive_mask [B, B] (bool, optional) marks further pairs that are not
    negatives, e.g. two captions of the same image; the diagonal is always excluded.
    """
    batch = scores.shape[0]
    positives = scores.diagonal()  # [B]
    not_negative = torch.eye(batch, dtype=torch.bool, device=scores.device)
    if positive_mask is not None:
        not_negative = not_negative | positive_mask.to(device=scores.device, dtype=torch.bool)
    cost_caption = (margin + scores - positives[:, None]).clamp_min(0)  # image i vs caption j
    cost_image = (margin + scores - positives[None, :]).clamp_min(0)  # caption j vs image i
    cost_caption = cost_caption.masked_fill(not_negative, 0.0)
    cost_image = cost_image.masked_fill(not_negative, 0.0)
    if hardest_negative:
        return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    return cost_caption.sum() + cost_image.sum()
