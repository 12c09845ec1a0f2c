"""Multi-SEA ranks beyond the ITM shortlist: the shortlist first by its re-rank score (ITM +
ITC), then every other candidate by its ITC score; R@K for K <= top_k as the authors' protocol.

The model here is a table: image i and caption j are encoded as [i] and [j], ``pair_scores``
looks the ITC matrix up and ``itm_logits`` the ITM scores, so every expected rank is a
literal computation on hand-built numbers (multiples of 1/8: exact sums in float32 and in
Python floats)."""
import math
import statistics

import pytest
import torch

from hat.evaluation import NonFiniteScores, check_finite, recall
from hat.models.multisea.plugin import MultiSEAPlugin
from hat.models.multisea.rerank import evaluate, rerank_recall, rerank_scores
from hat.retrieval import Retriever


class TableModel(torch.nn.Module):
    """ITC scores itc[i, j]; ITM class-1 logits itm[direction][i, j]."""

    def __init__(self, itc, itm_i2t, itm_t2i):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # rerank reads the parameters' dtype
        self.itc, self.itm = itc.float(), {"i2t": itm_i2t.float(), "t2i": itm_t2i.float()}

    def pair_scores(self, image_feats, text_feats):
        return self.itc[image_feats[:, 0].long()][:, text_feats[:, 0].long()]

    def itm_logits(self, image_states, text_states, text_mask, direction):
        one = self.itm[direction][image_states[:, 0, 0].long(), text_states[:, 0, 0].long()]
        return [torch.stack([-one, one], dim=1)]

    def encode_images(self, images):  # images: their indices
        feats = images.float()[:, None]
        return feats, feats[:, None, :]

    def encode_captions(self, input_ids, attention_mask):  # input_ids[:, 0]: the caption index
        feats = input_ids[:, :1].float()
        return feats, feats[:, None, :]


def features(n_images, n_captions):
    image_feats = torch.arange(n_images, dtype=torch.float32)[:, None]
    text_feats = torch.arange(n_captions, dtype=torch.float32)[:, None]
    return image_feats, image_feats[:, None, :], text_feats, text_feats[:, None, :], torch.ones(n_captions, 1)


def grid(generator, shape, low, high):
    return torch.randint(low, high, shape, generator=generator).float() / 8


# ------------------------------------------------------------------ the literal protocol
def literal_ranks(itc, itm, k, caption_to_image, direction):
    """0-based ranks, in plain Python: each query's candidates keyed (1, ITC + ITM) inside
    its top-k by ITC and (0, ITC) outside; the rank is the number of negatives whose key
    is at least the best positive's (ties never favour the positive)."""
    itc, itm, owner = itc.tolist(), itm.tolist(), caption_to_image.tolist()
    n_images, n_captions = len(itc), len(itc[0])
    ranks = []
    for query in range(n_images if direction == "i2t" else n_captions):
        if direction == "i2t":
            pairs = [(query, c) for c in range(n_captions)]
            positive = [owner[c] == query for c in range(n_captions)]
        else:
            pairs = [(i, query) for i in range(n_images)]
            positive = [i == owner[query] for i in range(n_images)]
        coarse = [itc[i][j] for i, j in pairs]
        by_itc = sorted(coarse, reverse=True)
        assert len(coarse) <= k or by_itc[k - 1] != by_itc[k], "no tie at the shortlist's edge here"
        keys = [(1, coarse[c] + itm[i][j]) if coarse[c] >= by_itc[min(k, len(coarse)) - 1] else (0, coarse[c])
                for c, (i, j) in enumerate(pairs)]
        best = max(key for key, pos in zip(keys, positive) if pos)
        ranks.append(sum(1 for key, pos in zip(keys, positive) if not pos and key >= best))
    return ranks


def literal_summary(ranks, prefix):
    out = {f"{prefix}_r{k}": 100.0 * sum(r < k for r in ranks) / len(ranks) for k in (1, 5, 10)}
    out[f"{prefix}_medr"] = float(math.floor(statistics.median(ranks)) + 1)
    out[f"{prefix}_meanr"] = sum(ranks) / len(ranks) + 1
    return out


def authors_matrices(itc, itm_i2t, itm_t2i, k):
    """The authors' protocol (today's code before this change): ITM + ITC inside the top-k,
    -100 outside."""
    i2t, t2i = torch.full_like(itc, -100.0), torch.full_like(itc, -100.0)
    rows = itc.topk(min(k, itc.shape[1]), dim=1).indices
    i2t.scatter_(1, rows, (itc + itm_i2t).gather(1, rows))
    columns = itc.topk(min(k, itc.shape[0]), dim=0).indices
    t2i.scatter_(0, columns, (itc + itm_t2i).gather(0, columns))
    return i2t, t2i


def protocol_ranks(sims, caption_to_image, direction):
    from hat.evaluation import retrieval_ranks

    return retrieval_ranks(sims, caption_to_image)[0 if direction == "i2t" else 1].tolist()


# 14 images with 2 captions each, top_k 10: every ITC score distinct, ITM up to +-10
N_IMAGES, PER_IMAGE, TOP_K = 14, 2, 10
CAPTION_TO_IMAGE = torch.arange(N_IMAGES * PER_IMAGE) // PER_IMAGE


@pytest.fixture
def table():
    generator = torch.Generator().manual_seed(3)
    n_captions = N_IMAGES * PER_IMAGE
    itc = torch.randperm(N_IMAGES * n_captions, generator=generator).view(N_IMAGES, n_captions).float() / 8
    itm_i2t = grid(generator, (N_IMAGES, n_captions), -80, 81)
    itm_t2i = grid(generator, (N_IMAGES, n_captions), -80, 81)
    return itc, itm_i2t, itm_t2i


def test_ranks_beyond_the_shortlist_follow_itc_and_recalls_stay_the_authors(table):
    itc, itm_i2t, itm_t2i = table
    model = TableModel(itc, itm_i2t, itm_t2i)
    i2t, t2i = rerank_scores(model, *features(*itc.shape), k=TOP_K, pair_batch_size=7)
    metrics = rerank_recall(i2t, t2i, CAPTION_TO_IMAGE)

    expected = {}
    for direction, itm, sims in (("i2t", itm_i2t, i2t), ("t2i", itm_t2i, t2i)):
        ranks = literal_ranks(itc, itm, TOP_K, CAPTION_TO_IMAGE, direction)
        assert sum(r >= TOP_K for r in ranks) >= 4  # ground truths outside the shortlist
        assert protocol_ranks(sims, CAPTION_TO_IMAGE, direction) == ranks
        expected.update(literal_summary(ranks, direction))
    for key in expected:
        assert metrics[key] == pytest.approx(expected[key], abs=1e-9), key

    # R@1/5/10 (K <= top_k): bit-for-bit the authors' protocol; medr/meanr differ from it
    authors = rerank_recall(*authors_matrices(itc, itm_i2t, itm_t2i, TOP_K), CAPTION_TO_IMAGE)
    recalls = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
    assert {key: metrics[key] for key in recalls} == {key: authors[key] for key in recalls}
    assert metrics["rsum"] == authors["rsum"]
    assert metrics["i2t_meanr"] < authors["i2t_meanr"] and metrics["t2i_meanr"] < authors["t2i_meanr"]


def test_each_query_orders_its_shortlist_by_rerank_then_the_rest_by_itc(table):
    itc, itm_i2t, itm_t2i = table
    i2t, t2i = rerank_scores(TableModel(itc, itm_i2t, itm_t2i), *features(*itc.shape), k=TOP_K)
    for sims, itm, queries in ((i2t, itm_i2t, itc), (t2i.t(), itm_t2i.t(), itc.t())):
        rerank = queries + itm
        for q in range(len(queries)):
            inside = torch.zeros(queries.shape[1], dtype=torch.bool)
            inside[queries[q].topk(TOP_K).indices] = True
            assert torch.equal(sims[q][inside], rerank[q][inside])  # the shortlist as today
            assert sims[q][~inside].max() < sims[q][inside].min()  # the rest strictly below it
            rest_itc, rest = queries[q][~inside], sims[q][~inside]
            assert torch.equal(torch.sign(rest_itc[:, None] - rest_itc[None, :]),
                               torch.sign(rest[:, None] - rest[None, :]))  # in ITC order, ties kept


def test_ties_never_favour_the_positive_beyond_the_shortlist():
    # 6 images, one caption each (caption j belongs to image j), top_k 2
    itc = torch.tensor([[4.0, 9.0, 8.0, 1.0, 1.0, 0.5],  # image 0: the best outside the shortlist
                        [7.0, 2.0, 6.0, 2.0, 3.0, 5.5],  # image 1: caption 1 ties caption 3 outside
                        [3.0, 3.0, 9.5, 3.25, 9.0, 3.0],  # image 2: shortlisted, first
                        [6.0, 6.5, 5.0, 1.5, 1.5, 2.0],  # image 3: caption 3 ties caption 4
                        [0.0, 4.0, 4.5, 3.0, 0.0, 8.0],  # image 4: caption 4 ties caption 0
                        [2.0, 1.0, 2.0, 7.0, 7.5, 2.0]])  # image 5: caption 5 ties 0 and 2
    # ITM -5: every shortlist's lowest score falls below ITC scores outside it
    itm = torch.full_like(itc, -5.0)
    itm[1, 0], itm[1, 2] = -4.0, -4.0  # image 1's floor 6 - 4 = 2: equal to caption 1's ITC
    caption_to_image = torch.arange(6)
    i2t, t2i = rerank_scores(TableModel(itc, itm, itm), *features(6, 6), k=2)
    for sims in (i2t, t2i):
        check_finite(sims)
    assert protocol_ranks(i2t, caption_to_image, "i2t") == literal_ranks(itc, itm, 2, caption_to_image, "i2t")
    assert protocol_ranks(t2i, caption_to_image, "t2i") == literal_ranks(itc, itm, 2, caption_to_image, "t2i")
    # the same ranks written out (0-based; the authors' protocol: 5 for every one outside)
    assert protocol_ranks(i2t, caption_to_image, "i2t") == [2, 5, 0, 5, 5, 4]
    assert protocol_ranks(t2i, caption_to_image, "t2i") == [2, 4, 0, 4, 5, 4]
    # image 1: shortlist {0, 2} (floor 2.0), then caption 5 (5.5), 4 (3.0), then 1 and 3 tied at 2.0
    assert i2t[1, 1] == i2t[1, 3] < i2t[1, 4] < i2t[1, 5] < min(i2t[1, 0], i2t[1, 2]) == 2.0
    assert i2t[3, 3] == i2t[3, 4] < i2t[3, 5] and i2t[5, 5] == i2t[5, 0] == i2t[5, 2] > i2t[5, 1]
    assert t2i[5, 5] == t2i[3, 5]  # caption 5: its image tied with image 3 outside the shortlist
    # R@1 (K <= top_k) as the authors'
    authors = rerank_recall(*authors_matrices(itc, itm, itm, 2), caption_to_image)
    metrics = rerank_recall(i2t, t2i, caption_to_image)
    assert metrics["i2t_r1"] == authors["i2t_r1"] and metrics["t2i_r1"] == authors["t2i_r1"]


def test_scores_stay_finite_and_below_the_shortlist_at_extreme_magnitudes():
    generator = torch.Generator().manual_seed(0)
    itc = torch.randn(5, 9, generator=generator) * 1e4
    itm = torch.randn(5, 9, generator=generator)
    itm[0] = -1e30  # floor - 1 == floor in float32
    itm[1] = -3.4028234e38 - itc[1]  # a floor of about -FLT_MAX: still finite
    itm[2] = 200.0
    i2t, t2i = rerank_scores(TableModel(itc, itm, itm), *features(5, 9), k=3)
    for sims, n_queries in ((i2t, 5), (t2i.t(), 9)):
        check_finite(sims)
        recall(sims if n_queries == 5 else sims.t(), torch.arange(9) % 5)  # the protocol accepts it
        for q in range(n_queries):
            coarse = itc[q] if n_queries == 5 else itc[:, q]
            inside = torch.zeros(len(coarse), dtype=torch.bool)
            inside[coarse.topk(3).indices] = True
            floor = sims[q][inside].min()
            assert (sims[q][~inside] <= floor).all()
            if floor > -3.4e38:
                assert (sims[q][~inside] < floor).all()


def test_non_finite_scores_are_still_refused():
    itc = torch.arange(12, dtype=torch.float32).view(3, 4)
    itm = torch.zeros(3, 4)
    itm[0, 3] = float("nan")  # shortlisted
    i2t, _ = rerank_scores(TableModel(itc, itm, torch.zeros(3, 4)), *features(3, 4), k=2)
    assert torch.isnan(i2t[0, :2]).all() and torch.isfinite(i2t[1:]).all()  # not hidden below the floor
    with pytest.raises(NonFiniteScores):
        recall(i2t, torch.tensor([0, 1, 2, 2]))


def test_folds_rerank_within_themselves_with_the_same_rule(table):
    itc, itm_i2t, itm_t2i = table
    model = TableModel(itc, itm_i2t, itm_t2i)
    n_images, n_captions = itc.shape
    image_loader = [torch.arange(7), torch.arange(7, n_images)]
    caption_loader = [{"input_ids": torch.arange(n_captions)[:, None], "attention_mask": torch.ones(n_captions, 1)}]
    metrics, (i2t, t2i) = evaluate(model, image_loader, caption_loader, CAPTION_TO_IMAGE, torch.device("cpu"),
                                   k=5, n_folds=2)
    assert metrics["i2t_r1"] == rerank_recall(i2t, t2i, CAPTION_TO_IMAGE)["i2t_r1"]
    folds = []
    for fold in range(2):
        rows, columns = slice(7 * fold, 7 * fold + 7), slice(14 * fold, 14 * fold + 14)
        owner = CAPTION_TO_IMAGE[columns] - 7 * fold
        summary = {}
        for direction, itm in (("i2t", itm_i2t), ("t2i", itm_t2i)):
            summary.update(literal_summary(literal_ranks(itc[rows, columns], itm[rows, columns], 5, owner,
                                                         direction), direction))
        folds.append(summary)
    for key in folds[0]:
        assert metrics[f"folds_{key}"] == pytest.approx((folds[0][key] + folds[1][key]) / 2, abs=1e-9), key


def test_score_sets_and_search_rank_like_evaluate(table):
    itc, itm_i2t, itm_t2i = table
    model = TableModel(itc, itm_i2t, itm_t2i)
    image_feats, image_states, text_feats, text_states, mask = features(*itc.shape)
    plugin = MultiSEAPlugin({"top_k": TOP_K})
    reranked = plugin.score_sets(model, (image_feats, image_states), (text_feats, text_states, mask), rerank=True)
    assert torch.equal(reranked, rerank_scores(model, *features(*itc.shape), k=TOP_K)[1])

    retriever = object.__new__(Retriever)  # no tokenizer: the queries come encoded
    retriever.plugin, retriever.model = plugin, model
    queries = [3, 20]
    retriever.encode_texts = lambda texts: (text_feats[queries], text_states[queries], mask[queries])
    results = retriever.search(["three", "twenty"], [image_feats, image_states], k=N_IMAGES, rerank=True)
    for hits, caption in zip(results, queries):
        order = [image for image, _ in hits]
        shortlist = set(itc[:, caption].topk(TOP_K).indices.tolist())
        assert set(order[:TOP_K]) == shortlist
        by_rerank = sorted(shortlist, key=lambda i: -(itc[i, caption] + itm_t2i[i, caption]).item())
        rest = sorted(set(range(N_IMAGES)) - shortlist, key=lambda i: -itc[i, caption].item())
        assert [(itc[i, caption] + itm_t2i[i, caption]).item() for i in order[:TOP_K]] == \
            [(itc[i, caption] + itm_t2i[i, caption]).item() for i in by_rerank]
        assert order[TOP_K:] == rest
