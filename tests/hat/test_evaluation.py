"""Tests for hat.evaluation.recall, following the
retrieval evaluation protocol of the HAT and Multi-SEA papers.

rank = number of negatives scoring >= the query's best positive (ties never favour
the positive); R@K = 100 * count(rank < K) / n; medr = floor(median(rank)) + 1;
meanr = mean(rank) + 1; rsum = sum of the six recalls.
"""
import math
import os
import statistics

import numpy as np
import pytest
import torch

from hat.evaluation import recall

KEYS = [
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
    "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr",
]


# --------------------------------------------------------------------------------------
# Literal reference (the recall protocol)
# --------------------------------------------------------------------------------------
def reference_ranks(sims, caption_to_image=None):
    """Python loops over queries, per the protocol: rank = number of negatives that
    score at least as high as the query's best positive."""
    sims = np.asarray(sims, dtype=np.float64)
    n_images, n_captions = sims.shape
    if caption_to_image is None:
        caption_to_image = [j // 5 for j in range(n_captions)]
    c2i = [int(x) for x in caption_to_image]

    i2t = []
    for i in range(n_images):
        best_positive = max(sims[i, j] for j in range(n_captions) if c2i[j] == i)
        i2t.append(sum(1 for j in range(n_captions) if c2i[j] != i and sims[i, j] >= best_positive))

    t2i = []
    for j in range(n_captions):
        true = c2i[j]
        t2i.append(sum(1 for i in range(n_images) if i != true and sims[i, j] >= sims[true, j]))
    return i2t, t2i


def reference_recall(sims, caption_to_image=None):
    i2t, t2i = reference_ranks(sims, caption_to_image)
    out = {}
    for prefix, ranks in (("i2t", i2t), ("t2i", t2i)):
        n = len(ranks)
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * sum(1 for r in ranks if r < k) / n
        out[f"{prefix}_medr"] = float(math.floor(statistics.median(ranks)) + 1)
        out[f"{prefix}_meanr"] = sum(ranks) / n + 1.0
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def assert_metrics(result, expected):
    assert set(KEYS) <= set(result), f"missing keys: {set(KEYS) - set(result)}"
    for key in KEYS:
        assert isinstance(result[key], float), f"{key} is {type(result[key])}, not float"
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


# --------------------------------------------------------------------------------------
# Hand-built cases
# --------------------------------------------------------------------------------------
def test_hand_built_3x15():
    # default mapping: captions 0-4 -> image 0, 5-9 -> image 1, 10-14 -> image 2
    sims = np.array([
        # c0   c1   c2   c3   c4 | c5   c6   c7   c8   c9 | c10  c11  c12  c13  c14
        [0.9, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.6, 0.7, 0.1, 0.1, 0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.8, 0.0, 0.0, 0.0, 0.0],
        [0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.3, 0.2, 0.2, 0.2, 0.2],
    ])
    # i2t: image 0: best positive 0.9, all negatives 0            -> rank 0
    #      image 1: best positive 0.5, negatives >= 0.5: c0 .6, c1 .7, c10 .8 -> rank 3
    #      image 2: best positive 0.3, ten negatives at 0.4      -> rank 10
    # ranks [0, 3, 10]: R@1 1/3, R@5 2/3, R@10 2/3 (10 is not < 10)
    # medr = 3 + 1 = 4; meanr = 13/3 + 1
    # t2i: c0: true .9 vs .6, .4 -> 0;  c1: true .1 vs .7, .4 -> 2
    #      c2..c4: true .1 vs .1 (tie, counts), .4 -> 2 each
    #      c5..c9: true .5 vs 0, .4 -> 0;  c10: true .3 vs 0, .8 -> 1
    #      c11..c14: true .2 vs 0, 0 -> 0
    # ranks [0,2,2,2,2,0,0,0,0,0,1,0,0,0,0]: ten zeros -> R@1 10/15, R@5 = R@10 = 100
    # medr: 8th of 15 sorted = 0 -> 1; meanr = 9/15 + 1 = 1.6
    expected = {
        "i2t_r1": 100 / 3, "i2t_r5": 200 / 3, "i2t_r10": 200 / 3,
        "i2t_medr": 4.0, "i2t_meanr": 13 / 3 + 1,
        "t2i_r1": 200 / 3, "t2i_r5": 100.0, "t2i_r10": 100.0,
        "t2i_medr": 1.0, "t2i_meanr": 1.6,
        "rsum": 100 / 3 + 200 / 3 + 200 / 3 + 200 / 3 + 100 + 100,
    }
    assert_metrics(recall(sims), expected)
    assert_metrics(recall(sims), reference_recall(sims))


def _boundary_matrix_12x60():
    """12 images x 60 captions (default mapping) with i2t ranks hitting 4/5 and 9/10
    and t2i ranks hitting 4/5, 9/10 and 11; every rank is forced by construction.

    - image i's best positive is caption 5i with score P_i = 10 (i + 1); its other four
      captions 5i+1..5i+4 score 0; every other entry is -1.
    - i2t: row i gets score P_i (a tie, which counts) on the primary captions 5k of the
      next r_i images k = i+1 .. i+r_i. Column 5k's true score is P_k > P_i, so these
      entries never change a t2i rank.
    - t2i: secondary caption j of image k gets score 0 (a tie with its true score 0,
      which counts) from the first q_j images other than k. Every row's best positive
      is >= 10 > 0, so these entries never change an i2t rank.
    """
    n_images, n_captions = 12, 60
    sims = np.full((n_images, n_captions), -1.0)
    for i in range(n_images):
        sims[i, 5 * i] = 10.0 * (i + 1)
        sims[i, 5 * i + 1: 5 * i + 5] = 0.0
    i2t_ranks = [9, 10, 4, 5, 1, 0, 3, 2, 0, 0, 0, 0]
    for i, r in enumerate(i2t_ranks):
        assert r <= n_images - 1 - i
        for k in range(i + 1, i + 1 + r):
            sims[i, 5 * k] = 10.0 * (i + 1)
    t2i_ranks = [0] * n_captions
    for j, q in {1: 4, 2: 5, 3: 9, 4: 10, 6: 11, 7: 1}.items():
        k = j // 5
        others = [i for i in range(n_images) if i != k][:q]
        sims[others, j] = 0.0
        t2i_ranks[j] = q
    return sims, i2t_ranks, t2i_ranks


def test_boundaries_12x60():
    sims, i2t_ranks, t2i_ranks = _boundary_matrix_12x60()
    # the construction gives exactly the intended ranks (checked with the literal loops)
    assert reference_ranks(sims) == (i2t_ranks, t2i_ranks)
    # i2t ranks [9, 10, 4, 5, 1, 0, 3, 2, 0, 0, 0, 0]
    #   rank 0: images 5, 8, 9, 10, 11          -> R@1  = 5/12
    #   rank < 5: all but 9, 10, 5              -> R@5  = 9/12 = 75
    #   rank < 10: all but the 10               -> R@10 = 11/12
    #   sorted [0,0,0,0,0,1,2,3,4,5,9,10]: median 1.5 -> medr 2; sum 34 -> meanr 34/12 + 1
    # t2i ranks: 54 zeros, then 4, 5, 9, 10, 11, 1
    #   R@1 = 54/60 = 90; R@5 = 56/60 (+4, +1); R@10 = 58/60 (+4, +5, +9, +1)
    #   medr = 0 + 1 = 1; meanr = 40/60 + 1
    expected = {
        "i2t_r1": 500 / 12, "i2t_r5": 75.0, "i2t_r10": 1100 / 12,
        "i2t_medr": 2.0, "i2t_meanr": 34 / 12 + 1,
        "t2i_r1": 90.0, "t2i_r5": 5600 / 60, "t2i_r10": 5800 / 60,
        "t2i_medr": 1.0, "t2i_meanr": 40 / 60 + 1,
        "rsum": 500 / 12 + 75 + 1100 / 12 + 90 + 5600 / 60 + 5800 / 60,
    }
    assert_metrics(recall(sims), expected)


def test_ties_count_against_the_positive():
    sims = np.array([
        # c0   c1   c2   c3   c4 | c5   c6   c7   c8   c9
        [0.5, 0.2, 0.2, 0.2, 0.2, 0.5, 0.3, 0.0, 0.0, 0.0],
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.3, 0.3, 0.3, 0.3, 0.3],
    ])
    # i2t: image 0 best positive .5, negative c5 = .5 (tie) -> rank 1
    #      image 1 best positive .3, negatives .1          -> rank 0
    # t2i: c5: true .3 vs image 0 .5 -> 1; c6: true .3 vs image 0 .3 (tie) -> 1; rest 0
    expected = {
        "i2t_r1": 50.0, "i2t_r5": 100.0, "i2t_r10": 100.0,
        "i2t_medr": 1.0, "i2t_meanr": 1.5,  # median of [0, 1] = 0.5 -> floor 0 + 1
        "t2i_r1": 80.0, "t2i_r5": 100.0, "t2i_r10": 100.0,
        "t2i_medr": 1.0, "t2i_meanr": 1.2,
        "rsum": 530.0,
    }
    assert_metrics(recall(sims), expected)


def test_constant_matrix_all_ties():
    # every score equal: every negative ties with the positive and counts
    # i2t rank = 10 negatives per image; t2i rank = 2 other images per caption
    sims = np.zeros((3, 15))
    expected = {
        "i2t_r1": 0.0, "i2t_r5": 0.0, "i2t_r10": 0.0, "i2t_medr": 11.0, "i2t_meanr": 11.0,
        "t2i_r1": 0.0, "t2i_r5": 100.0, "t2i_r10": 100.0, "t2i_medr": 3.0, "t2i_meanr": 3.0,
        "rsum": 200.0,
    }
    assert_metrics(recall(sims), expected)
    assert_metrics(recall(torch.zeros(3, 15)), expected)


UNEVEN_SIMS = np.array([
    # c0   c1   c2   c3   c4   c5   c6   c7   c8   c9
    [0.8, 0.4, 0.7, 0.1, 0.9, 0.0, 0.7, 0.0, 0.0, 0.0],
    [0.2, 0.5, 0.3, 0.6, 0.1, 0.6, 0.1, 0.2, 0.2, 0.2],
    [0.1, 0.2, 0.3, 0.5, 0.4, 0.5, 0.6, 0.0, 0.0, 0.9],
])
# image 0 has 2 captions (c1, c6), image 1 has 7 (c0 c2 c4 c5 c7 c8 c9), image 2 has 1 (c3)
UNEVEN_C2I = [1, 0, 1, 2, 1, 1, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "c2i",
    [UNEVEN_C2I, np.array(UNEVEN_C2I), torch.tensor(UNEVEN_C2I)],
    ids=["list", "numpy", "torch"],
)
def test_explicit_uneven_caption_to_image(c2i):
    # i2t: image 0: positives c1 .4, c6 .7 -> best .7; negatives >= .7: c0 .8, c2 .7 (tie),
    #               c4 .9 -> rank 3
    #      image 1: best positive max(.2,.3,.1,.6,.2,.2,.2) = .6; negatives c1 .5,
    #               c3 .6 (tie), c6 .1 -> rank 1
    #      image 2: positive c3 .5; negatives >= .5: c5 .5 (tie), c6 .6, c9 .9 -> rank 3
    #   ranks [3, 1, 3]: R@1 0, R@5 100, R@10 100; medr 4; meanr 7/3 + 1
    # t2i (true image in brackets):
    #   c0 [1] .2 vs .8, .1 -> 1     c1 [0] .4 vs .5, .2 -> 1     c2 [1] .3 vs .7, .3 -> 2
    #   c3 [2] .5 vs .1, .6 -> 1     c4 [1] .1 vs .9, .4 -> 2     c5 [1] .6 vs 0, .5 -> 0
    #   c6 [0] .7 vs .1, .6 -> 0     c7 [1] .2 vs 0, 0 -> 0      c8 [1] .2 vs 0, 0 -> 0
    #   c9 [1] .2 vs 0, .9 -> 1
    #   ranks [1,1,2,1,2,0,0,0,0,1]: R@1 40, R@5 100, R@10 100;
    #   sorted [0,0,0,0,1,1,1,1,2,2]: median 1 -> medr 2; meanr 8/10 + 1 = 1.8
    expected = {
        "i2t_r1": 0.0, "i2t_r5": 100.0, "i2t_r10": 100.0,
        "i2t_medr": 4.0, "i2t_meanr": 7 / 3 + 1,
        "t2i_r1": 40.0, "t2i_r5": 100.0, "t2i_r10": 100.0,
        "t2i_medr": 2.0, "t2i_meanr": 1.8,
        "rsum": 440.0,
    }
    assert_metrics(recall(UNEVEN_SIMS, caption_to_image=c2i), expected)
    assert_metrics(recall(torch.from_numpy(UNEVEN_SIMS), caption_to_image=c2i), expected)


def test_even_count_medr():
    # 4 images, one caption each (caption j -> image j); diagonal 1, strictly lower
    # triangle 2, upper triangle 0.
    sims = np.tril(np.full((4, 4), 2.0), k=-1) + np.eye(4)
    # i2t: row i has i entries (columns < i) scoring 2 >= 1 -> ranks [0, 1, 2, 3]
    # t2i: column j has 3 - j entries (rows > j) scoring 2 -> ranks [3, 2, 1, 0]
    # median of [0, 1, 2, 3] = 1.5 -> floor 1 + 1 = 2; meanr = 1.5 + 1 = 2.5
    expected = {
        "i2t_r1": 25.0, "i2t_r5": 100.0, "i2t_r10": 100.0, "i2t_medr": 2.0, "i2t_meanr": 2.5,
        "t2i_r1": 25.0, "t2i_r5": 100.0, "t2i_r10": 100.0, "t2i_medr": 2.0, "t2i_meanr": 2.5,
        "rsum": 450.0,
    }
    assert_metrics(recall(sims, caption_to_image=[0, 1, 2, 3]), expected)


def test_default_mapping_is_j_div_5():
    sims, _, _ = _boundary_matrix_12x60()
    default = recall(sims)
    explicit = recall(sims, caption_to_image=np.arange(60) // 5)
    assert_metrics(default, explicit)


# --------------------------------------------------------------------------------------
# Input types and the literal reference on random data
# --------------------------------------------------------------------------------------
def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(0)
    sims = rng.standard_normal((20, 100))
    from_numpy = recall(sims)
    assert_metrics(from_numpy, recall(torch.from_numpy(sims)))
    assert_metrics(from_numpy, recall(torch.from_numpy(sims).float()))
    assert_metrics(from_numpy, recall(sims.astype(np.float32)))


@pytest.mark.parametrize("rounded", [False, True], ids=["continuous", "many-ties"])
@pytest.mark.parametrize("mapping", ["default", "random"])
def test_matches_literal_reference_random_20x100(rounded, mapping):
    rng = np.random.default_rng(1)
    sims = rng.standard_normal((20, 100))
    if rounded:
        sims = np.round(sims, 1)  # lots of exact ties
    if mapping == "default":
        c2i = None
    else:
        # uneven: every image gets at least one caption, the rest assigned at random
        c2i = np.concatenate([np.arange(20), rng.integers(0, 20, size=80)])
        rng.shuffle(c2i)
    result = recall(sims, caption_to_image=c2i)
    expected = reference_recall(sims, c2i)
    assert_metrics(result, expected)
    # torch input gives the same numbers
    c2i_t = None if c2i is None else torch.from_numpy(c2i)
    assert_metrics(recall(torch.from_numpy(sims), caption_to_image=c2i_t), expected)


# --------------------------------------------------------------------------------------
# MSCOCO 1K protocol, per-level metrics, ensembles
# --------------------------------------------------------------------------------------
from hat.evaluation import fold_recall  # noqa: E402
from hat.models.hat.evaluation import (cached_features, ensemble_similarities, feature_cache_path,  # noqa: E402
                                       level_metrics, level_similarities, load_features, protocol_metrics,
                                       save_features)


def evaluate(model, image_loader, caption_loader, caption_to_image, device, image_tile=None, caption_tile=None, *,
             feature_dtype=None, cache_path=None, per_level=False):
    """HAT's evaluation of one model, as its plug-in composes it: encode once (or read the
    cache), one matrix per level, the summed protocol."""
    features = cached_features(model, image_loader, caption_loader, device, feature_dtype, cache_path)
    return protocol_metrics(level_similarities(model, features, image_tile, caption_tile), caption_to_image,
                            per_level)


def test_fold_recall_is_the_average_of_five_separate_folds():
    rng = np.random.default_rng(3)
    sims = np.round(rng.standard_normal((50, 250)), 1)  # 5 folds of 10 images / 50 captions
    folds = [recall(sims[10 * k:10 * (k + 1), 50 * k:50 * (k + 1)]) for k in range(5)]
    expected = {key: sum(f[key] for f in folds) / 5 for key in KEYS}
    result = fold_recall(sims, n_folds=5)
    assert_metrics(result, expected)
    # rsum is the sum of the averaged recalls (here also the mean of the fold rsums)
    assert result["rsum"] == pytest.approx(
        sum(result[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)), abs=1e-9)
    assert_metrics(fold_recall(torch.from_numpy(sims), n_folds=5), expected)


def test_fold_recall_with_explicit_mapping_uses_each_folds_captions():
    # captions shuffled: fold k holds the captions of images 2k, 2k+1, wherever they are
    rng = np.random.default_rng(4)
    c2i = rng.permutation(np.arange(30) // 3)  # 10 images x 3 captions, shuffled
    sims = rng.standard_normal((10, 30))
    expected_folds = []
    for k in range(5):
        cols = [j for j in range(30) if 2 * k <= c2i[j] < 2 * k + 2]
        expected_folds.append(recall(sims[2 * k:2 * k + 2][:, cols], c2i[cols] - 2 * k))
    expected = {key: sum(f[key] for f in expected_folds) / 5 for key in KEYS}
    assert_metrics(fold_recall(sims, n_folds=5, caption_to_image=c2i), expected)


def test_fold_recall_one_fold_is_recall_and_uneven_folds_fail():
    rng = np.random.default_rng(5)
    sims = rng.standard_normal((12, 60))
    assert_metrics(fold_recall(sims, n_folds=1), recall(sims))
    with pytest.raises(ValueError, match="folds"):
        fold_recall(sims, n_folds=5)


def test_level_metrics_and_ensemble():
    rng = np.random.default_rng(6)
    a = [torch.from_numpy(rng.standard_normal((4, 20))) for _ in range(3)]
    b = [torch.from_numpy(rng.standard_normal((4, 20))) for _ in range(3)]
    mean = ensemble_similarities([a, b])
    for level in range(3):
        torch.testing.assert_close(mean[level], (a[level] + b[level]) / 2)
    metrics = level_metrics(a)
    for k in range(3):
        expected = recall(a[k])
        assert all(metrics[f"level{k + 1}_{key}"] == expected[key] for key in KEYS)
    folded = level_metrics(a, n_folds=2)
    assert folded["level2_rsum"] == pytest.approx(fold_recall(a[1], n_folds=2)["rsum"])


# --------------------------------------------------------------------------------------
# evaluate() end to end with a stub model, feature cache
# --------------------------------------------------------------------------------------
class StubModel(torch.nn.Module):
    """Two levels of fixed random 'features'; score = dot product of mean tokens."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.image_table = torch.randn(6, 2, 3, 4, generator=g)  # image, level, R, D
        self.word_table = torch.randn(50, 2, 4, generator=g)  # token id, level, D
        self.calls = {"images": 0, "captions": 0}

    def encode_images(self, images):  # images: [B] ids
        self.calls["images"] += 1
        return [self.image_table[images.long(), k] for k in range(2)]

    def encode_captions(self, input_ids, attention_mask):
        self.calls["captions"] += 1
        return [self.word_table[input_ids, k] * attention_mask[..., None] for k in range(2)]

    def score(self, image_features, caption_features, caption_lengths, image_tile=None,
              caption_tile=None):
        total = None
        for images, captions in zip(image_features, caption_features):
            level = images.float().mean(1) @ (captions.float().sum(1)
                                              / caption_lengths[:, None]).t()
            total = level if total is None else total + level
        return total


def stub_loaders():
    images = [torch.arange(0, 4), torch.arange(4, 6)]  # two batches of image ids
    g = torch.Generator().manual_seed(1)
    batches = []
    for start in (0, 15):  # 30 captions, 5 per image, two batches of different widths
        width = 5 if start == 0 else 7
        ids = torch.randint(1, 50, (15, width), generator=g)
        mask = (torch.arange(width)[None, :] < torch.randint(2, width + 1, (15, 1), generator=g))
        batches.append({"input_ids": ids * mask, "attention_mask": mask.long()})
    return images, batches


def test_evaluate_scores_levels_and_reports_them(tmp_path):
    model = StubModel()
    image_batches, caption_batches = stub_loaders()
    metrics, sims = evaluate(model, image_batches, caption_batches, None, "cpu")
    assert sims.shape == (6, 30)
    assert_metrics(metrics, recall(sims))
    metrics_levels, sims_levels = evaluate(model, image_batches, caption_batches, None, "cpu",
                                           per_level=True)
    torch.testing.assert_close(sims_levels, sims)
    assert all(metrics_levels[key] == metrics[key] for key in KEYS)
    assert {f"level{k}_{key}" for k in (1, 2) for key in KEYS} <= set(metrics_levels)


def test_feature_cache_skips_encoding(tmp_path):
    model = StubModel()
    image_batches, caption_batches = stub_loaders()
    checkpoint = tmp_path / "best.ckpt"
    checkpoint.write_bytes(b"weights")
    path = feature_cache_path(str(tmp_path / "cache"), str(checkpoint), "test", extra=("f30k",))
    first, sims = evaluate(model, image_batches, caption_batches, None, "cpu", cache_path=path)
    assert model.calls == {"images": 2, "captions": 2}
    second, cached_sims = evaluate(model, image_batches, caption_batches, None, "cpu",
                                   cache_path=path)
    assert model.calls == {"images": 2, "captions": 2}  # read back, not re-encoded
    torch.testing.assert_close(cached_sims, sims, rtol=0, atol=0)
    features = load_features(path, "cpu")
    assert features["captions"][0].shape == (30, 7, 4) and features["lengths"].shape == (30,)
    # the key changes with the split, the extra key and the checkpoint file
    assert feature_cache_path(str(tmp_path), str(checkpoint), "val") != \
        feature_cache_path(str(tmp_path), str(checkpoint), "test")
    before = feature_cache_path(str(tmp_path), str(checkpoint), "test")
    checkpoint.write_bytes(b"new weights")
    assert feature_cache_path(str(tmp_path), str(checkpoint), "test") != before
    with pytest.raises(ValueError, match="hat-features"):
        torch.save({"x": 1}, tmp_path / "bad.pt")
        load_features(str(tmp_path / "bad.pt"), "cpu")


def test_save_and_load_features_keep_dtype(tmp_path):
    features = {"images": [torch.randn(2, 3, 4).half()], "captions": [torch.randn(5, 6, 4).half()],
                "lengths": torch.tensor([6, 2, 3, 4, 5])}
    path = save_features(str(tmp_path / "f.pt"), features)
    back = load_features(path, "cpu")
    assert back["images"][0].dtype == torch.float16
    torch.testing.assert_close(back["captions"][0], features["captions"][0], rtol=0, atol=0)
    assert load_features(path, "cpu", torch.float32)["images"][0].dtype == torch.float32


# --------------------------------------------------------------------------------------
# Non-finite scores and the feature cache key
# --------------------------------------------------------------------------------------
from hat.evaluation import NonFiniteScores  # noqa: E402
from hat.models.hat.evaluation import file_identity  # noqa: E402


def test_all_nan_scores_are_refused_not_ranked_first():
    # a NaN compares false with everything: before the check every rank was 0 (rsum 600)
    with pytest.raises(NonFiniteScores) as error:
        recall(torch.full((4, 20), float("nan")))
    assert (error.value.n_nan, error.value.n_inf, error.value.total) == (80, 0, 80)
    assert str(error.value) == "80 NaN and 0 infinite scores of 80"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_score_is_refused_everywhere(bad):
    sims = torch.randn(10, 50, dtype=torch.float64)
    sims[3, 17] = bad
    for score in (lambda: recall(sims), lambda: fold_recall(sims, n_folds=5),
                  lambda: level_metrics([sims, sims])):
        with pytest.raises(NonFiniteScores, match="infinite scores of") as error:
            score()
        assert error.value.n_nan + error.value.n_inf == 1
    sims[3, 17] = 0.0
    assert recall(sims)["rsum"] <= 600  # finite again: a recall


def test_feature_cache_key_follows_data_files_and_dtype(tmp_path):
    checkpoint, data = tmp_path / "best.ckpt", tmp_path / "test.arrow"
    checkpoint.write_bytes(b"weights")
    data.write_bytes(b"0123456789")
    key = lambda dtype="fp32": feature_cache_path(str(tmp_path), str(checkpoint), "test", extra=(dtype,),
                                                  data_files=[str(data)])
    first = key()
    assert key() == first  # stable
    assert key("fp16") != first  # the feature dtype is part of the key
    data.write_bytes(b"another file, another size")
    assert key() != first
    before = file_identity(str(data))
    os.utime(data, ns=(1, 1))  # same size, another modification time (a replaced file)
    assert file_identity(str(data)) != before


def test_cached_features_of_another_set_are_encoded_again(tmp_path):
    torch.manual_seed(0)
    model = _TinyLevels()
    images = torch.utils.data.DataLoader(torch.randn(6, 4), batch_size=4)
    tokens = [{"input_ids": torch.ones(3, 5, dtype=torch.long), "attention_mask": torch.ones(3, 5)}]
    cache = str(tmp_path / "features.pt")
    save_features(cache, {"images": [torch.zeros(9, 2, 3)], "captions": [torch.zeros(3, 5, 3)],
                          "lengths": torch.full((3,), 5)})
    features = cached_features(model, images, tokens, torch.device("cpu"), torch.float32, cache)
    assert features["images"][0].shape[0] == 6  # 9 cached images != 6 in the split: re-encoded
    assert load_features(cache, "cpu")["images"][0].shape[0] == 6  # and the cache rewritten


class _TinyLevels(torch.nn.Module):
    """encode_images / encode_captions with one level, for the cache tests."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)

    def encode_images(self, images):
        return [self.proj(images)[:, None, :].expand(-1, 2, -1)]  # [B, 2, 3]

    def encode_captions(self, input_ids, attention_mask):
        return [torch.ones(*input_ids.shape, 3)]  # [B, L, 3]
