"""The opt-in search shortlist (hat/search/shortlist.py): FAISS's top-k, the flat / HNSW
choice, and that the shortlist's scores are HAT's exact scores of those pictures."""
import numpy as np
import pytest
import torch

import faiss  # noqa: E402  (faiss-cpu, in requirements.txt)

from hat.search import shortlist as S  # noqa: E402
from hat.models.hat.evaluation import level_similarities  # noqa: E402
from hat.models.hat.model import HAT, summed_levels  # noqa: E402


class Scorer:
    """HAT's scoring (HAT.score: the summed SCAN levels) without the encoders."""

    score = HAT.score

    def __init__(self, direction):
        self.direction, self.lambda_softmax, self.recompute_scores = direction, 9.0, True


def features(n_images=120, n_captions=12, regions=(12, 6, 2), dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 15, (n_captions,), generator=g)
    pad = torch.arange(16)[None, :, None] >= lengths[:, None, None]
    images = [torch.randn(n_images, r, dim, generator=g) for r in regions]
    captions = [torch.randn(n_captions, 16, dim, generator=g).masked_fill(pad, 0.0) for _ in regions]
    return images, {"captions": captions, "lengths": lengths}


def exact_matrix(model, images, captions):
    """The literal reference: the whole [N_images, N_captions] exact matrix."""
    return summed_levels(level_similarities(model, {"images": images, **captions}))


def test_flat_top_k_is_torch_top_k_of_the_inner_products():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 24), dtype=np.float32)
    queries = rng.standard_normal((7, 24), dtype=np.float32)
    index, kind = S.build_faiss(vectors, "flat")
    scores, ids = S.faiss_top(index, queries, 10)
    expected = (torch.from_numpy(queries) @ torch.from_numpy(vectors).t()).topk(10, dim=1)
    assert kind == "flat"
    assert torch.equal(torch.from_numpy(ids), expected.indices)
    torch.testing.assert_close(torch.from_numpy(scores), expected.values, rtol=1e-5, atol=1e-5)
    assert S.faiss_top(index, queries, 10_000)[1].shape == (7, 500)  # m beyond N: all of them


def test_hnsw_from_the_threshold_on_and_flat_below(monkeypatch):
    threshold = S.HNSW_MIN_SCALARS
    assert S.faiss_kind(threshold // 768 - 1, 768) == "flat" and S.faiss_kind(threshold // 768 + 1, 768) == "hnsw"
    assert S.faiss_kind(10, 8, "hnsw") == "hnsw" and S.faiss_kind(10**7, 768, "flat") == "flat"
    with pytest.raises(ValueError, match="auto, flat, hnsw"):
        S.faiss_kind(10, 8, "ivf")
    monkeypatch.setattr(S, "HNSW_MIN_SCALARS", 300 * 8)
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((300, 8), dtype=np.float32) * rng.uniform(0.5, 2, (300, 1)).astype(np.float32)
    below, kind_below = S.build_faiss(vectors[:299])
    above, kind_above = S.build_faiss(vectors)
    assert (kind_below, kind_above) == ("flat", "hnsw")
    assert isinstance(below, faiss.IndexFlatIP) and isinstance(above, faiss.IndexHNSWFlat)
    # vectors of unequal norms: HNSW searches their equal_norms, the inner products stay the true ones
    queries = rng.standard_normal((5, 8), dtype=np.float32)
    scores, ids = S.faiss_top(above, queries, 10, ef_search=300)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, vectors[ids]), rtol=1e-5, atol=1e-5)
    exact = (queries @ vectors.T).argsort(axis=1)[:, ::-1][:, :10]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)]) >= 0.9


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
@pytest.mark.parametrize("m_first", [None, 60])
def test_shortlisted_scores_are_the_exact_scores_of_those_pictures(direction, m_first):
    model = Scorer(direction)
    images, captions = features()
    full = exact_matrix(model, images, captions).t()  # [Q, N]
    got = S.shortlisted_scores(model, images, captions, m=25, k=5, m_first=m_first)
    assert got.candidates.shape == (12, 25) and got.indices.shape == (12, 5)
    assert all(len(set(row.tolist())) == 25 for row in got.candidates)  # distinct pictures
    # tiles of other shapes than the full matrix's: equal to float32 rounding
    torch.testing.assert_close(got.candidate_scores, full.gather(1, got.candidates), rtol=1e-6, atol=1e-6)
    within = full.gather(1, got.candidates).topk(5, dim=1)
    assert torch.equal(got.indices, got.candidates.gather(1, within.indices))
    torch.testing.assert_close(got.values, within.values, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_a_shortlist_of_every_picture_is_the_exact_top_k(direction):
    model = Scorer(direction)
    images, captions = features(seed=2)
    exact = exact_matrix(model, images, captions).t().topk(10, dim=1)
    index, _ = S.build_faiss(S.pooled_image_vectors(images), "hnsw")  # whatever the first stage finds
    for m_first in (None, 500):
        got = S.shortlisted_scores(model, images, captions, m=120, k=10, index=index, m_first=m_first)
        assert torch.equal(got.indices, exact.indices)
        torch.testing.assert_close(got.values, exact.values, rtol=1e-6, atol=1e-6)


def test_pooled_vectors_and_the_multisea_itc_shortlist():
    from hat.models.multisea.aformer import AFormer
    from hat.models.multisea.model import MultiSEA
    from hat.models.multisea.rerank import rerank_scores

    images, captions = features(n_images=30, n_captions=4)
    for pooling in S.POOLINGS:
        vectors, queries = S.pooled_image_vectors(images, pooling), S.pooled_text_vectors(captions, pooling)
        assert vectors.dtype == queries.dtype == np.float32 and vectors.shape[0] == 30 and queries.shape[0] == 4
        assert vectors.shape[1] == queries.shape[1] == (16 if pooling == "last-cosine" else 48)

    class ITM(torch.nn.Module):  # what ITC and the ITM re-rank use of a MultiSEA
        itm_logits, pair_scores = MultiSEA.itm_logits, MultiSEA.pair_scores

        def __init__(self):
            super().__init__()
            self.aformer = AFormer(16, 1, 2, 2, 0.0, 4)
            self.itm_head = torch.nn.Linear(16, 2)
            self.temp = torch.nn.Parameter(torch.tensor(0.3))

    torch.manual_seed(0)
    model = ITM().eval()
    g = torch.Generator().manual_seed(3)
    image_features = (torch.randn(30, 16, generator=g), torch.randn(30, 5, 16, generator=g))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[:, 4:] = 0
    caption_features = (torch.randn(4, 16, generator=g), torch.randn(4, 6, 16, generator=g), mask)
    assert np.array_equal(S.pooled_image_vectors(image_features), image_features[0].numpy())
    got = S.multisea_shortlisted_scores(model, image_features, caption_features, k=8)
    t2i = rerank_scores(model, *image_features, *caption_features, k=8)[1].t()  # [captions, images]
    expected = t2i.topk(8, dim=1)
    assert torch.equal(got.indices, expected.indices)
    torch.testing.assert_close(got.values, expected.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["hat", "multisea"])
def test_an_index_searched_through_the_shortlist(model, demo_indexes, queries):
    """SearchIndex.search(shortlist=M): the manifest records the first stage (flat FAISS
    for 200 pictures); HAT with M = N is the exact top k (scores to 1e-6), with a small M
    the shortlist's scores are still exact ones; Multi-SEA's ITC top_k through FAISS
    re-ranked by ITM is its exact search's top k."""
    from hat.search import SearchIndex

    index = SearchIndex.open(demo_indexes[model])
    plan = index.manifest["shortlist"]
    assert (plan["first_stage"], plan["faiss_index"]) == ("faiss", "flat")
    assert plan["vector"] == ("itc f_I" if model == "multisea" else S.POOLING)
    exact = index.search(queries[:6], 10)
    full = index.search(queries[:6], 10, shortlist=len(index))
    shown = min(10, index.retriever.config["top_k"]) if model == "multisea" else 10  # Multi-SEA: its re-ranked
    for want, got in zip(exact, full):
        assert len(got.results) == shown
        assert [h.path for h in got.results] == [h.path for h in want.results[:shown]]
        assert [h.score for h in got.results] == pytest.approx([h.score for h in want.results[:shown]], abs=1e-5)
    if model == "hat":
        every = {h.path: h.score for h in index.search(queries[:6], 200)[0].results}
        small = index.search(queries[:6], 5, shortlist=20)[0].results
        assert len(small) == 5 and all(every[h.path] == pytest.approx(h.score, abs=1e-5) for h in small)
    from hat.search import SearchError

    with pytest.raises(SearchError, match=r"^shortlist=0 is not a positive integer; pass shortlist >= 1"):
        index.search(queries[:1], 5, shortlist=0)
