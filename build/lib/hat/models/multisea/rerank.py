"""Multi-SEA inference: encode once, ITC shortlist, ITM re-rank.

1. f, F for every image and caption (once).
2. S = f_I f_T^T / tau for all pairs.
3. Each image's top-k captions by S get an i2t AFormer pass, each caption's top-k images
   a t2i pass; score = final-layer ITM class-1 logit + S inside the top-k, -100 outside.
The (query, candidate) pairs are scored in chunks of ``pair_batch_size``; the two score
matrices [N_images, N_captions] go to the recall protocol of hat.evaluation (i2t ranks
from the i2t matrix, t2i ranks from the t2i matrix).
"""
from __future__ import annotations

import torch

from hat.evaluation import METRIC_KEYS, encode_images, encode_loader, eval_mode, fold_metrics, recall, recall_sum

OUTSIDE_TOP_K = -100.0


@torch.no_grad()
def _itm_scores(model, direction: str, image_rows: torch.Tensor, text_rows: torch.Tensor,
                image_states, text_states, text_mask, pair_batch_size: int) -> torch.Tensor:
    """Final-layer ITM class-1 logits of the pairs (image_rows[p], text_rows[p]) -> [P]."""
    param = next(model.parameters())  # features stored in another dtype are cast per chunk
    scores = torch.empty(len(image_rows), dtype=torch.float32)
    for start in range(0, len(image_rows), pair_batch_size):
        images = image_rows[start:start + pair_batch_size]
        texts = text_rows[start:start + pair_batch_size]
        logits = model.itm_logits(image_states[images].to(param.device, param.dtype),
                                  text_states[texts].to(param.device, param.dtype),
                                  text_mask[texts].to(param.device), direction)[-1]  # [P, 2]
        scores[start:start + len(images)] = logits[:, 1].float().cpu()
    return scores


@torch.no_grad()
def itc_scores(model, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """The ITC scores S [N_images, N_captions] (on the CPU) of the encoded sets: the
    shortlist's scores, and Multi-SEA's score without the re-rank."""
    with eval_mode(model):
        return model.pair_scores(image_feats.float(), text_feats.float()).cpu()


@torch.no_grad()
def rerank_scores(model, image_feats: torch.Tensor, image_states: torch.Tensor, text_feats: torch.Tensor,
                  text_states: torch.Tensor, text_mask: torch.Tensor, k: int = 64,
                  pair_batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t, t2i) score matrices [N_images, N_captions] on the CPU.

    image_feats [N_I, D], image_states [N_I, R, D], text_feats [N_T, D],
    text_states [N_T, L, D], text_mask [N_T, L]: the encoded sets (any device)."""
    with eval_mode(model):
        coarse = itc_scores(model, image_feats, text_feats)  # S [N_I, N_T]
        n_images, n_captions = coarse.shape

        k_captions = min(k, n_captions)
        top_captions = coarse.topk(k_captions, dim=1).indices  # [N_I, k]
        image_rows = torch.arange(n_images).repeat_interleave(k_captions)  # [N_I * k]
        text_rows = top_captions.reshape(-1)
        i2t = torch.full_like(coarse, OUTSIDE_TOP_K)
        i2t[image_rows, text_rows] = coarse[image_rows, text_rows] + _itm_scores(
            model, "i2t", image_rows, text_rows, image_states, text_states, text_mask, pair_batch_size)

        k_images = min(k, n_images)
        top_images = coarse.topk(k_images, dim=0).indices.t()  # [N_T, k]
        text_rows = torch.arange(n_captions).repeat_interleave(k_images)  # [N_T * k]
        image_rows = top_images.reshape(-1)
        t2i = torch.full_like(coarse, OUTSIDE_TOP_K)
        t2i[image_rows, text_rows] = coarse[image_rows, text_rows] + _itm_scores(
            model, "t2i", image_rows, text_rows, image_states, text_states, text_mask, pair_batch_size)
    return i2t, t2i


def rerank_recall(i2t: torch.Tensor, t2i: torch.Tensor, caption_to_image=None) -> dict:
    """hat.evaluation.recall with image->text ranks from ``i2t`` and text->image ranks
    from ``t2i`` (both [N_images, N_captions]); rsum over the six recalls."""
    from_i2t, from_t2i = recall(i2t, caption_to_image), recall(t2i, caption_to_image)
    metrics = {key: (from_i2t if key.startswith("i2t") else from_t2i)[key]
               for key in METRIC_KEYS if key != "rsum"}
    metrics["rsum"] = recall_sum(metrics)
    return {key: metrics[key] for key in METRIC_KEYS}


def encode_caption_set(model, loader, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode every caption once -> (f_T [N, D], F_T [N, L, D], mask [N, L]), padded to the
    longest batch (the loader should pad to max_text_len already)."""
    def encode(batch):
        mask = batch["attention_mask"].to(device)
        caption_feats, caption_states = model.encode_captions(batch["input_ids"].to(device), mask)
        return caption_feats.float(), caption_states.float(), mask

    feats, states, mask = encode_loader(loader, encode, pad_dims=(1, 2))
    return feats, states, mask


def evaluate(model, image_loader, caption_loader, caption_to_image, device, k: int = 64,
             pair_batch_size: int = 128, n_folds: int | None = None, keep: dict | None = None
             ) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """Encode once, ITC shortlist, ITM re-rank, recall protocol.
    Returns (metrics, (i2t, t2i) score matrices). With ``n_folds`` the metrics also hold
    ``folds_*``: the mean over consecutive folds of the images (MSCOCO 1K), each fold
    shortlisted and re-ranked within itself; left out when the images do not divide.
    ``keep`` (a dict) receives the ITC matrix as ``keep["itc"]``."""
    with eval_mode(model):
        image_feats, image_states = encode_images(model, image_loader, device)  # [N_I, D], [N_I, R, D]
        text_feats, text_states, text_mask = encode_caption_set(model, caption_loader, device)
        i2t, t2i = rerank_scores(model, image_feats, image_states, text_feats, text_states, text_mask,
                                 k=k, pair_batch_size=pair_batch_size)
        metrics = rerank_recall(i2t, t2i, caption_to_image)
        if keep is not None:
            keep["itc"] = itc_scores(model, image_feats, text_feats)
        if n_folds:  # each fold shortlisted and re-ranked within itself
            metrics.update(fold_metrics(
                lambda rows, columns, fold_to_image: rerank_recall(*rerank_scores(
                    model, image_feats[rows], image_states[rows], text_feats[columns], text_states[columns],
                    text_mask[columns], k=k, pair_batch_size=pair_batch_size), fold_to_image),
                n_folds, len(image_feats), caption_to_image, len(text_feats)))
    return metrics, (i2t, t2i)
