"""Multi-SEA inference: encode once, ITC shortlist, ITM re-rank.

1. f, F for every image and caption (once).
2. S = f_I f_T^T / tau for all pairs.
3. Each image's top-k captions by S get an i2t AFormer pass, each caption's top-k images
   a t2i pass; score = final-layer ITM class-1 logit + S inside the top-k (the shortlist).
4. Outside the shortlist each query keeps its ITC order, strictly below its shortlist
   (`below_shortlist`): the query's lowest shortlisted score - 1 - the dense rank of S.
The (query, candidate) pairs are scored in chunks of ``pair_batch_size``; the two score
matrices [N_images, N_captions] go to the recall protocol of hat.evaluation (i2t ranks
from the i2t matrix, t2i ranks from the t2i matrix). Ranks inside the shortlist, hence
R@K for K <= k, are those of the authors' protocol (which scores the rest -100, i.e.
last); the ranks beyond it (medr, meanr, the gallery's) are the ITC order after the
shortlist instead of "last".
"""
from __future__ import annotations

import torch

from hat.evaluation import METRIC_KEYS, encode_images, encode_loader, eval_mode, fold_metrics, recall, recall_sum

SORT_CHUNK = 1 << 24  # ITC scores sorted at a time by below_shortlist (rows x candidates)


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


def below_shortlist(itc: torch.Tensor, shortlist: torch.Tensor, shortlist_scores: torch.Tensor) -> torch.Tensor:
    """One row per query: the re-ranked scores [Q, N] of its N candidates.

    itc [Q, N]: the ITC scores; shortlist [Q, k]: the candidates re-ranked (distinct
    indices into N); shortlist_scores [Q, k]: their re-rank scores. The shortlisted
    candidates get their re-rank score; every other one ``floor - 1 - d``, ``floor`` the
    query's lowest re-rank score and ``d`` the dense rank of its ITC score in the row (0 =
    the highest ITC score, equal scores one rank). So the rest follows the shortlist in ITC
    order, strictly below it, equal ITC scores stay equal (a tie still never favours the
    positive), and nothing changes inside the shortlist. Finite where the inputs are: a
    non-finite re-rank score or ITC score stays non-finite for the protocol to refuse."""
    n_queries, n_candidates = itc.shape
    out = torch.empty(n_queries, n_candidates, dtype=shortlist_scores.dtype, device=itc.device)
    step = max(1, SORT_CHUNK // max(n_candidates, 1))
    for start in range(0, n_queries, step):
        rows = slice(start, start + step)
        chunk, top, scores = itc[rows], shortlist[rows], shortlist_scores[rows]
        if top.shape[1] < n_candidates:  # else every candidate is shortlisted
            floor = scores.min(dim=1, keepdim=True).values  # [C, 1]
            # strictly below the floor even where floor - 1 rounds back to it (|floor| >= 2^24);
            # at a floor of -FLT_MAX, the floor itself (finite; a tie there never favours the positive)
            ceiling = torch.minimum(floor - 1, floor.nextafter(torch.full_like(floor, float("-inf"))))
            ceiling = torch.where(torch.isinf(ceiling) & torch.isfinite(floor), floor, ceiling)
            values, order = chunk.sort(dim=1, descending=True)
            dense = torch.zeros_like(order)
            dense[:, 1:] = (values[:, 1:] != values[:, :-1]).cumsum(dim=1)
            d = torch.empty_like(order).scatter_(1, order, dense).to(out.dtype)
            rest = ceiling - d
            out[rows] = torch.where(torch.isfinite(chunk), rest, chunk.to(out.dtype) + floor)
        out[rows].scatter_(1, top, scores)
    return out


@torch.no_grad()
def rerank_scores(model, image_feats: torch.Tensor, image_states: torch.Tensor, text_feats: torch.Tensor,
                  text_states: torch.Tensor, text_mask: torch.Tensor, k: int = 64,
                  pair_batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t, t2i) score matrices [N_images, N_captions] on the CPU: per query its top-k
    ITC candidates by ITM + ITC, then the others in ITC order (`below_shortlist`).

    image_feats [N_I, D], image_states [N_I, R, D], text_feats [N_T, D],
    text_states [N_T, L, D], text_mask [N_T, L]: the encoded sets (any device)."""
    with eval_mode(model):
        coarse = itc_scores(model, image_feats, text_feats)  # S [N_I, N_T]
        n_images, n_captions = coarse.shape

        k_captions = min(k, n_captions)
        top_captions = coarse.topk(k_captions, dim=1).indices  # [N_I, k]
        image_rows = torch.arange(n_images).repeat_interleave(k_captions)  # [N_I * k]
        text_rows = top_captions.reshape(-1)
        scores = coarse[image_rows, text_rows] + _itm_scores(
            model, "i2t", image_rows, text_rows, image_states, text_states, text_mask, pair_batch_size)
        i2t = below_shortlist(coarse, top_captions, scores.view(n_images, k_captions))
        t2i = _t2i_from_itc(model, coarse, image_states, text_states, text_mask, k, pair_batch_size)
    return i2t, t2i


@torch.no_grad()
def t2i_rerank_scores(model, image_feats: torch.Tensor, image_states: torch.Tensor, text_feats: torch.Tensor,
                      text_states: torch.Tensor, text_mask: torch.Tensor, k: int = 64,
                      pair_batch_size: int = 128) -> torch.Tensor:
    """The t2i matrix of `rerank_scores` alone (the same values, bit for bit), without the
    i2t half: k ITM passes per caption instead of k per caption and k per image (a
    search over many pictures re-ranks its few queries only)."""
    with eval_mode(model):
        coarse = itc_scores(model, image_feats, text_feats)
        return _t2i_from_itc(model, coarse, image_states, text_states, text_mask, k, pair_batch_size)


def _t2i_from_itc(model, coarse, image_states, text_states, text_mask, k: int, pair_batch_size: int):
    """Each caption's top-k images of the ITC matrix ``coarse`` [N_I, N_T] re-ranked by
    t2i ITM + ITC, the rest below (`below_shortlist`) -> [N_images, N_captions]."""
    n_images, n_captions = coarse.shape
    k_images = min(k, n_images)
    top_images = coarse.topk(k_images, dim=0).indices.t()  # [N_T, k]
    text_rows = torch.arange(n_captions).repeat_interleave(k_images)  # [N_T * k]
    image_rows = top_images.reshape(-1)
    scores = coarse[image_rows, text_rows] + _itm_scores(
        model, "t2i", image_rows, text_rows, image_states, text_states, text_mask, pair_batch_size)
    return below_shortlist(coarse.t(), top_images, scores.view(n_captions, k_images)).t().contiguous()


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
