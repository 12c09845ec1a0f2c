"""An opt-in shortlist for searching a large picture collection (issue 25).

HAT's exact score of a query against N pictures costs N x regions x words per level
(`hat.models.hat.alignment.scan_similarity`); bench/search_cost.py measures it on one CPU
core: with the paper's dimensions (R 784/196/49, D 768) one query against 10,000 pictures
takes ~15 s (i2t) / ~3 min (t2i), against 0.24 s / 0.64 s with the demo's. The shortlist
cuts that to a cost that grows little with N, in three stages per query:

1. FAISS: one pooled vector per picture and per query (`pooled_image_vectors`,
   `pooled_text_vectors`), searched by inner product (`build_faiss`: exact IndexFlatIP,
   or IndexHNSWFlat from HNSW_MIN_SCALARS = N x D on; `faiss_top`): the top ``m_first``;
2. the last level's SCAN score alone (about 5% of the exact cost) of those: the top ``m``;
3. exact HAT scores (`level_similarities` summed, what `score_sets` ranks) of the ``m``,
   ranked by them (`shortlisted_scores`; m_first=None skips stage 2).

Exact scoring of the whole collection stays the default; this is what a search does
when asked for a shortlist. HAT's pooled vector (POOLING, chosen on the demo's test
split by bench/search_cost.py's agreement table): per level the plain mean of the
tokens (a picture's regions; a caption's words, [CLS] and [SEP] left out), the levels
concatenated, not normalised: the inner product is the sum over the levels of the mean
raw token score v_r . t_w, the quantity SCAN's attention starts from. (Normalised
variants, POOLINGS, agree less with the exact top-10.) A pooled first stage alone agrees
poorly with HAT's exact ranking at small M / N (the demo, 10,000 pictures, M 200:
overlap@10 0.49); with stage 2 (m_first 2,000) 0.90.

Multi-SEA's ITC stage is an inner product already (S = f_I f_T^T / tau, tau > 0): its
vectors are f_I and f_T as encoded (`itc_image_vectors`, `itc_text_vectors`) and the
same index serves its shortlist (`multisea_shortlisted_scores`: ITC + final-layer ITM
of each query's top k, as `hat.models.multisea.rerank` scores them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# bench/search_cost.py faiss (one core, clustered synthetic unit vectors of D 768, N 10k /
# 30k / 100k): exact search costs ~0.24 ms per 1,000 vectors of D 768 per query, i.e. in
# proportion to N x D; HNSW at the cascade's depth (top 2,000, efSearch 2,000) ~8-14 ms
# whatever N, and builds in ~0.45 ms per vector. HNSW is at least twice as fast from
# N x D ~ 7e7 on (~90k vectors of D 768, ~30k of the paper's pooled D' 2,304); below that
# the exact index is used (no build time, no lost recall).
HNSW_MIN_SCALARS = 70_000_000
HNSW_M = 32  # links per node
HNSW_EF_CONSTRUCTION = 40  # faiss's default
HNSW_EF_SEARCH = 64  # candidates kept per query (raised to m when a query asks for more): recall@10 >= 0.98
DEFAULT_M = 200  # pictures per query scored exactly
DEFAULT_M_FIRST = 2000  # pictures per query the first stage passes to the last level's SCAN score
POOLING = "mean-words"  # HAT's first-stage vector (see POOLINGS)
CHUNK = 1024  # pictures / captions pooled at a time (bounds the fp32 copies)
GATHER_BYTES = 64 * 2**20  # shortlisted pictures' features gathered at a time for exact scoring


# -- first-stage vectors -----------------------------------------------------------

# name -> (levels used, tokens L2-normalised first, the caption's [CLS]/[SEP] left out,
# each level's mean L2-normalised): the inner product of a picture's and a caption's
# vectors is the sum over the levels of
#   mean          the mean raw token score v_r . t_w over the regions and the real tokens
#   mean-words    the same over the words only ([CLS] and [SEP] left out)
#   unit-mean     the mean token cosine cos(v_r, t_w)
#   cosine        the cosine of the mean unit tokens (divided by sqrt(levels))
#   last-cosine   that of the last level alone
POOLINGS = {"mean": ("all", False, False, False), "mean-words": ("all", False, True, False),
            "unit-mean": ("all", True, False, False), "cosine": ("all", True, False, True),
            "last-cosine": ("last", True, False, True)}


def _token_mean(tokens: torch.Tensor, lengths: torch.Tensor | None, unit_tokens: bool, words_only: bool,
                unit_mean: bool) -> torch.Tensor:
    """[B, T, D] -> [B, D] in fp32: the mean over the real tokens (the first ``lengths``
    of each row; all when None; ``words_only``: without the first and the last, [CLS] and
    [SEP], where a caption has more than those), of the L2-normalised tokens when
    ``unit_tokens``; L2-normalised when ``unit_mean``."""
    tokens = tokens.float()
    if unit_tokens:
        tokens = F.normalize(tokens, dim=-1)  # padding (zero) stays zero
    if lengths is None:
        mean = tokens.mean(dim=1)
    else:
        lengths = lengths.to(tokens.device)
        position = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        mask = position < lengths[:, None]
        if words_only:
            inner = (position > 0) & (position < lengths[:, None] - 1)
            mask = torch.where((lengths > 2)[:, None], inner, mask)
        mean = (tokens * mask[:, :, None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).to(tokens.dtype)
    return F.normalize(mean, dim=-1) if unit_mean else mean


def _pooled(levels: list, lengths, pooling: str) -> np.ndarray:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}; allowed: {', '.join(POOLINGS)}")
    which, unit_tokens, words_only, unit_mean = POOLINGS[pooling]
    chosen = levels[-1:] if which == "last" else levels
    scale = 1 / math.sqrt(len(chosen)) if unit_mean else 1.0
    out = []
    for start in range(0, len(chosen[0]), CHUNK):
        rows = slice(start, start + CHUNK)
        parts = [_token_mean(level[rows], None if lengths is None else lengths[rows], unit_tokens,
                             words_only and lengths is not None, unit_mean) for level in chosen]
        out.append(torch.cat(parts, dim=1).mul_(scale).cpu())
    return np.ascontiguousarray(torch.cat(out).numpy(), dtype=np.float32)


def _is_multisea_images(image_features) -> bool:
    return isinstance(image_features, (list, tuple)) and len(image_features) == 2 and image_features[0].dim() == 2


def itc_image_vectors(image_features) -> np.ndarray:
    """Multi-SEA: f_I [N, D] (what its ITC scores are the inner products of), float32."""
    return np.ascontiguousarray(image_features[0].float().cpu().numpy(), dtype=np.float32)


def itc_text_vectors(caption_features) -> np.ndarray:
    """Multi-SEA: f_T [Q, D], float32."""
    return np.ascontiguousarray(caption_features[0].float().cpu().numpy(), dtype=np.float32)


def pooled_image_vectors(image_features, pooling: str = POOLING) -> np.ndarray:
    """The first-stage vector of every picture, float32 [N, D'] (C-contiguous, for FAISS).

    HAT (``image_features``: per level [N, R, D], `encode_image_set`): the ``pooling``
    of the levels (POOLINGS; D' = levels x D, D for last-cosine). Multi-SEA
    ((f_I, F_I)): f_I."""
    if _is_multisea_images(image_features):
        return itc_image_vectors(image_features)
    return _pooled(list(image_features), None, pooling)


def pooled_text_vectors(caption_features, pooling: str = POOLING) -> np.ndarray:
    """The first-stage vector of every query, float32 [Q, D'], to search the vectors of
    `pooled_image_vectors` by inner product. HAT (``{"captions": per level [Q, L, D],
    "lengths": [Q]}``): the same pooling over each caption's real tokens. Multi-SEA
    ((f_T, F_T, mask)): f_T."""
    if isinstance(caption_features, (list, tuple)):
        return itc_text_vectors(caption_features)
    return _pooled(list(caption_features["captions"]), caption_features["lengths"], pooling)


# -- FAISS -------------------------------------------------------------------------

def faiss_kind(n: int, dim: int, kind: str = "auto") -> str:
    """"flat" or "hnsw": what ``kind`` means for ``n`` vectors of ``dim`` (auto: hnsw from
    n x dim >= HNSW_MIN_SCALARS on)."""
    if kind not in ("auto", "flat", "hnsw"):
        raise ValueError(f"kind={kind!r}; allowed: auto, flat, hnsw")
    if kind == "auto":
        return "hnsw" if n * dim >= HNSW_MIN_SCALARS else "flat"
    return kind


def equal_norms(vectors: np.ndarray) -> np.ndarray:
    """[N, D] -> [N, D+1]: one more coordinate, sqrt(max |x|^2 - |x|^2), so that every
    vector has the largest norm. Inner products with a query whose extra coordinate is 0
    are unchanged, and a top-k by inner product among vectors of equal norm is a nearest-
    neighbour search, which HNSW's graph is built for (pooled vectors of unequal norms
    would otherwise make hubs of the longest ones)."""
    square = np.einsum("nd,nd->n", vectors, vectors)
    extra = np.sqrt(np.maximum(square.max(initial=0.0) - square, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([vectors, extra[:, None]], axis=1))


def build_faiss(vectors: np.ndarray, kind: str = "auto", hnsw_m: int = HNSW_M,
                ef_construction: int = HNSW_EF_CONSTRUCTION):
    """(index, kind) over ``vectors`` [N, D] by inner product: IndexFlatIP (exact) or
    IndexHNSWFlat (M ``hnsw_m``, approximate; over `equal_norms` of the vectors, D+1
    wide: `faiss_top` pads the queries), as `faiss_kind` decides."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [N, D], got shape {vectors.shape}")
    kind = faiss_kind(len(vectors), vectors.shape[1], kind)
    if kind == "flat":
        index = faiss.IndexFlatIP(vectors.shape[1])
    else:
        vectors = equal_norms(vectors)
        index = faiss.IndexHNSWFlat(vectors.shape[1], hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = HNSW_EF_SEARCH
    index.add(vectors)
    return index, kind


def faiss_top(index, queries: np.ndarray, m: int, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each [Q, min(m, N)], best first: the inner products and the
    indices of each query's top m vectors of an index from `build_faiss`. An HNSW index
    searches with efSearch = max(``ef_search`` or HNSW_EF_SEARCH, m); an id HNSW could not
    fill is -1."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None]
    if index.d == queries.shape[1] + 1:  # an equal_norms index: the extra coordinate is 0
        queries = np.ascontiguousarray(np.pad(queries, ((0, 0), (0, 1))))
    if index.d != queries.shape[1]:
        raise ValueError(f"queries of {queries.shape[1]} dimensions for an index of {index.d}")
    m = min(int(m), index.ntotal)
    if m < 1:
        raise ValueError(f"m={m}: the index holds {index.ntotal} vectors; ask for at least one")
    params = None
    if hasattr(index, "hnsw"):
        params = faiss.SearchParametersHNSW(efSearch=max(ef_search or HNSW_EF_SEARCH, m))
    return index.search(queries, m, params=params)


# -- exact scores of the shortlist ---------------------------------------------------

@dataclass
class Shortlisted:
    """Top-k results like ``torch.topk`` of the exact [Q, N] scores (``values``,
    ``indices``: [Q, k], best first, indices into the N pictures), from the exact
    scores of each query's shortlist (``candidates`` [Q, M], in the first stage's order;
    ``candidate_scores`` [Q, M], their exact scores)."""

    values: torch.Tensor
    indices: torch.Tensor
    candidates: torch.Tensor
    candidate_scores: torch.Tensor


def _top_k(candidates: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    return top.values, candidates.gather(1, top.indices)


def _candidates(index, image_vectors, queries, m):
    if index is None:
        index, _ = build_faiss(image_vectors)
    _, ids = faiss_top(index, queries, m)
    if (ids < 0).any():
        raise RuntimeError(f"the first stage found fewer than {ids.shape[1]} pictures for a query; "
                           f"search with a larger ef_search or a flat index")
    return torch.from_numpy(ids.astype(np.int64))


def _scores_of(model, image_features: list, caption_features: dict, q: int, ids: torch.Tensor, levels: slice,
               image_tile, caption_tile, buffers: dict) -> torch.Tensor:
    """[len(ids)]: caption ``q``'s summed scores of the ``levels`` against pictures ``ids``
    (level_similarities: the model's direction and lambda), fp32 on the CPU. The
    pictures are gathered GATHER_BYTES at a time into ``buffers`` (reused from call to
    call: gathering into fresh memory cost more than scoring, at the paper's shapes)."""
    from hat.models.hat.evaluation import level_similarities
    from hat.models.hat.model import summed_levels

    images = image_features[levels]
    captions, lengths = caption_features["captions"][levels], caption_features["lengths"]
    chosen = {"captions": [level[q:q + 1, :int(lengths[q])] for level in captions], "lengths": lengths[q:q + 1]}
    ids = ids.to(images[0].device)
    per_picture = sum(level[0].numel() * level.element_size() for level in images)
    step = max(1, GATHER_BYTES // max(per_picture, 1))
    out = []
    for start in range(0, len(ids), step):
        chunk = ids[start:start + step]
        gathered = []
        for k, level in enumerate(images):
            key = (levels.start, k)
            shape = (min(step, len(ids)), *level.shape[1:])
            if key not in buffers or buffers[key].shape != shape or buffers[key].dtype != level.dtype:
                buffers[key] = level.new_empty(shape)
            gathered.append(torch.index_select(level, 0, chunk, out=buffers[key][:len(chunk)]))
        out.append(summed_levels(level_similarities(model, {"images": gathered, **chosen}, image_tile,
                                                    caption_tile))[:, 0].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def shortlisted_scores(model, image_features: list, caption_features: dict, m: int = DEFAULT_M, k: int = 10,
                       index=None, pooling: str = POOLING, m_first: int | None = DEFAULT_M_FIRST,
                       image_tile=None, caption_tile=None) -> Shortlisted:
    """HAT: each query's shortlist of ``m`` pictures, scored exactly (the summed level
    scores of `level_similarities`, in the model's direction: what `score_sets` gives
    those pictures), and their top ``k`` by the exact score.

    The shortlist: the top ``m_first`` pictures by the first stage (``index`` over
    `pooled_image_vectors`, built here when None), of those the top ``m`` by the last
    level's SCAN score alone (about 5% of the exact cost: R 49 of 1,029 regions in the
    paper's shapes, 4 of 84 in the demo's); ``m_first`` None or <= m: the first stage's
    top ``m`` directly. image_features: per level [N, R, D]; caption_features:
    {"captions": per level [Q, L, D], "lengths": [Q]} (`encode_image_set`,
    `encode_caption_set`). With m >= N the result is the exact top k."""
    queries = pooled_text_vectors(caption_features, pooling)
    vectors = None if index is not None else pooled_image_vectors(image_features, pooling)
    middle = m_first is not None and m_first > m
    buffers = {}
    first = _candidates(index, vectors, queries, m_first if middle else m)  # [Q, M1]
    if middle and first.shape[1] > m:
        last = slice(len(image_features) - 1, None)
        coarse = torch.stack([_scores_of(model, image_features, caption_features, q, ids, last, image_tile,
                                         caption_tile, buffers) for q, ids in enumerate(first)])
        top = coarse.topk(m, dim=1).indices.sort(dim=1).values  # the first stage's order kept
        first = first.gather(1, top)
    everything = slice(None)
    scores = torch.stack([_scores_of(model, image_features, caption_features, q, ids, everything, image_tile,
                                     caption_tile, buffers) for q, ids in enumerate(first)])
    return Shortlisted(*_top_k(first, scores, k), first, scores)


@torch.no_grad()
def multisea_shortlisted_scores(model, image_features, caption_features, k: int = 64, index=None,
                                pair_batch_size: int = 128) -> Shortlisted:
    """Multi-SEA: each query's top ``k`` pictures by ITC (``index`` over f_I, built here
    when None), re-ranked by ITC + final-layer t2i ITM, as `rerank_scores` scores a
    caption's shortlist (``values``/``indices``: all k, best first)."""
    from hat.evaluation import eval_mode
    from hat.models.multisea.rerank import _itm_scores

    image_feats, image_states = image_features
    text_feats, text_states, text_mask = caption_features
    candidates = _candidates(index, None if index is not None else itc_image_vectors(image_features),
                             itc_text_vectors(caption_features), k)  # [Q, k]
    n_queries, k = candidates.shape
    image_rows = candidates.reshape(-1)
    text_rows = torch.arange(n_queries).repeat_interleave(k)
    with eval_mode(model):  # the ITC scores as itc_scores computes them (pair_scores, fp32)
        itc = torch.cat([model.pair_scores(image_feats[ids.to(image_feats.device)].float(),
                                           text_feats[q:q + 1].float())[:, 0].cpu()
                         for q, ids in enumerate(candidates)])
        scores = itc + _itm_scores(model, "t2i", image_rows, text_rows, image_states, text_states, text_mask,
                                   pair_batch_size)
    scores = scores.view(n_queries, k)
    return Shortlisted(*_top_k(candidates, scores, k), candidates, scores)


def plan(model_name: str, pictures: int, layout: dict) -> dict:
    """What the manifest records of the shortlist an index of ``pictures`` gets when a query
    asks for one (``--shortlist M``; exact scoring of every picture is the default): the
    first stage's vectors and their width (from the feature ``layout``), the FAISS index
    kind for that size and its settings."""
    shapes = [tensor["shape"] for tensor in layout["tensors"]]
    if layout["container"] == "tuple":  # Multi-SEA: (f_I [D], F_I [R, D]): ITC's vectors
        vector, dim = "itc f_I", shapes[0][-1]
    else:  # HAT: per level [R, D], the pooled levels concatenated
        vector, dim = POOLING, sum(shape[-1] for shape in shapes)
    kind = faiss_kind(max(pictures, 1), dim)
    return {"first_stage": "faiss", "vector": vector, "dim": dim, "faiss_index": kind,
            "hnsw": {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
            if kind == "hnsw" else None, "hnsw_from_scalars": HNSW_MIN_SCALARS, "default_m": DEFAULT_M,
            "m_first": DEFAULT_M_FIRST if layout["container"] != "tuple" else None}
