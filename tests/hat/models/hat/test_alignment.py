"""Tests for hat.models.hat.alignment.scan_similarity against a literal reference.

The reference below follows HAT's SCAN-style cross attention as the paper states it,
step by step, one (image, caption) pair at a time, in
float64, materialising c_r / c_w explicitly.
"""
import pytest
import torch

from hat.models.hat.alignment import scan_similarity

LEAKY_SLOPE = 0.1
NORM_EPS = 1e-8
COS_EPS = 1e-8


# --------------------------------------------------------------------------------------
# Literal reference (SCAN as the paper states it)
# --------------------------------------------------------------------------------------
def _leaky_relu(x):
    return torch.where(x > 0, x, LEAKY_SLOPE * x)


def _cos(x, y):
    """cos(x, y) = x.y / max(|x||y|, 1e-8)  (the cosine of SCAN)."""
    return (x * y).sum() / torch.clamp(x.norm() * y.norm(), min=COS_EPS)


def _reference_pair_i2t(v, t, lam):
    """SCAN, direction i2t, for one image v [R, D] and one unpadded caption
    t [n, D]. Regions are the queries."""
    n_regions = v.shape[0]
    # 1. s_wr = t_w . v_r                                              -> s[w, r]
    s = t @ v.T
    # 2. LeakyReLU_0.1, then L2 norm over regions (for each word), + 1e-8
    s = _leaky_relu(s)
    s = s / (torch.sqrt((s * s).sum(dim=1, keepdim=True)) + NORM_EPS)
    total = v.new_zeros(())
    for r in range(n_regions):
        # 3. a_rw = softmax over the caption's words of lambda * s'_wr
        a = torch.softmax(lam * s[:, r], dim=0)  # [n]
        # 4. c_r = sum_w a_rw t_w
        c_r = (a[:, None] * t).sum(dim=0)
        # 5. cos(v_r, c_r)
        total = total + _cos(v[r], c_r)
    # 5. mean over regions
    return total / n_regions


def _reference_pair_t2i(v, t, lam):
    """SCAN, direction t2i, for one image v [R, D] and one unpadded caption
    t [n, D]. Words are the queries."""
    n_words = t.shape[0]
    # 1. s_rw = v_r . t_w, LeakyReLU_0.1                               -> s[r, w]
    s = _leaky_relu(v @ t.T)
    # 2. L2-normalise over the caption's words, for each region, + 1e-8
    s = s / (torch.sqrt((s * s).sum(dim=1, keepdim=True)) + NORM_EPS)
    total = v.new_zeros(())
    for w in range(n_words):
        # 3. a_wr = softmax over regions of lambda * s'_rw
        a = torch.softmax(lam * s[:, w], dim=0)  # [R]
        # 4. c_w = sum_r a_wr v_r
        c_w = (a[:, None] * v).sum(dim=0)
        # 5. cos(t_w, c_w)
        total = total + _cos(t[w], c_w)
    # 5. mean over the real words
    return total / n_words


def reference_similarity(images, captions, caption_lengths, direction="i2t", lam=9.0):
    """Python loop over every image and every caption; each caption is sliced to its
    real length, so padding cannot play any part. Computed in float64."""
    images = images.double()
    captions = captions.double()
    pair = _reference_pair_i2t if direction == "i2t" else _reference_pair_t2i
    rows = []
    for i in range(images.shape[0]):
        row = []
        for j in range(captions.shape[0]):
            n = int(caption_lengths[j])
            row.append(pair(images[i], captions[j, :n], lam))
        rows.append(torch.stack(row))
    return torch.stack(rows)


# --------------------------------------------------------------------------------------
# Input helpers
# --------------------------------------------------------------------------------------
REGIONS, MAX_LEN, DIM = 5, 7, 16


def make_inputs(n_images, n_captions, seed, dtype=torch.float64, lengths=None, pad_scale=1e3):
    """Random images / captions; padding positions hold large random values."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, REGIONS, DIM, generator=g, dtype=torch.float64)
    captions = torch.randn(n_captions, MAX_LEN, DIM, generator=g, dtype=torch.float64)
    if lengths is None:
        lengths = torch.randint(2, MAX_LEN + 1, (n_captions,), generator=g)
        # always include the extremes: a full-length caption and a length-2 caption
        lengths[0] = MAX_LEN
        if n_captions > 1:
            lengths[1] = 2
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    for j in range(n_captions):
        n = int(lengths[j])
        captions[j, n:] = pad_scale * torch.randn(MAX_LEN - n, DIM, generator=g, dtype=torch.float64)
    return images.to(dtype), captions.to(dtype), lengths


def pad_mask(lengths, max_len=MAX_LEN):
    return torch.arange(max_len)[None, :] >= lengths[:, None]  # True on padding


DIRECTIONS = ["i2t", "t2i"]


# --------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("lam", [9.0, 4.0])
def test_matches_reference_fp64(direction, lam):
    images, captions, lengths = make_inputs(7, 11, seed=0)
    assert lengths.max() == MAX_LEN and lengths.min() == 2
    out = scan_similarity(images, captions, lengths, direction=direction, lambda_softmax=lam)
    ref = reference_similarity(images, captions, lengths, direction, lam)
    assert out.shape == (7, 11)
    assert out.dtype.is_floating_point
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-9)


def test_default_direction_is_i2t_and_default_lambda_is_9():
    images, captions, lengths = make_inputs(4, 6, seed=1)
    out = scan_similarity(images, captions, lengths)
    ref = reference_similarity(images, captions, lengths, "i2t", 9.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_directions_differ(direction):
    # sanity: the two directions are different functions (guards against one
    # direction silently computing the other)
    images, captions, lengths = make_inputs(3, 4, seed=2)
    i2t = scan_similarity(images, captions, lengths, direction="i2t")
    t2i = scan_similarity(images, captions, lengths, direction="t2i")
    assert not torch.allclose(i2t, t2i, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_padding_values_do_not_matter(direction):
    images, captions, lengths = make_inputs(5, 8, seed=3)
    pad = pad_mask(lengths)
    other = captions.clone()
    g = torch.Generator().manual_seed(33)
    other[pad] = -1e3 * torch.randn(int(pad.sum()), DIM, generator=g, dtype=torch.float64)
    zeros = captions.clone()
    zeros[pad] = 0.0
    a = scan_similarity(images, captions, lengths, direction=direction)
    b = scan_similarity(images, other, lengths, direction=direction)
    c = scan_similarity(images, zeros, lengths, direction=direction)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_padded_equals_unpadded_single_caption(direction):
    # a caption of length 3 padded to MAX_LEN gives the same scores as the same
    # caption given with no padding at all (L == 3)
    images, captions, _ = make_inputs(4, 1, seed=4, lengths=[3])
    lengths = torch.tensor([3])
    padded = scan_similarity(images, captions, lengths, direction=direction)
    unpadded = scan_similarity(images, captions[:, :3].contiguous(), lengths, direction=direction)
    torch.testing.assert_close(padded, unpadded, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize(
    "image_tile,caption_tile", [(3, 5), (1, 1), (2, None), (None, 4), (100, 100), (7, 11)]
)
def test_tiles_do_not_change_result(direction, image_tile, caption_tile):
    images, captions, lengths = make_inputs(7, 11, seed=5)
    full = scan_similarity(images, captions, lengths, direction=direction)
    tiled = scan_similarity(
        images, captions, lengths, direction=direction,
        image_tile=image_tile, caption_tile=caption_tile,
    )
    assert tiled.shape == (7, 11)
    torch.testing.assert_close(tiled, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_one_image(direction):
    images, captions, lengths = make_inputs(1, 6, seed=6)
    out = scan_similarity(images, captions, lengths, direction=direction)
    assert out.shape == (1, 6)
    ref = reference_similarity(images, captions, lengths, direction)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("length", [2, MAX_LEN])
def test_one_caption(direction, length):
    images, captions, lengths = make_inputs(5, 1, seed=7, lengths=[length])
    out = scan_similarity(images, captions, lengths, direction=direction)
    assert out.shape == (5, 1)
    ref = reference_similarity(images, captions, lengths, direction)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_float32_close_to_fp64_reference(direction):
    images64, captions64, lengths = make_inputs(6, 9, seed=8)
    images32, captions32 = images64.float(), captions64.float()
    out = scan_similarity(images32, captions32, lengths, direction=direction)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # reference on exactly the fp32 values, computed in fp64
    ref = reference_similarity(images32.double(), captions32.double(), lengths, direction)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("tiles", [(None, None), (3, 5)])
@pytest.mark.parametrize("recompute", [True, False])
def test_gradients_match_reference(direction, tiles, recompute):
    images, captions, lengths = make_inputs(7, 11, seed=9)
    weights = torch.randn(7, 11, generator=torch.Generator().manual_seed(99), dtype=torch.float64)

    img_impl = images.clone().requires_grad_(True)
    cap_impl = captions.clone().requires_grad_(True)
    out = scan_similarity(
        img_impl, cap_impl, lengths, direction=direction,
        image_tile=tiles[0], caption_tile=tiles[1], recompute=recompute,
    )
    (out * weights).sum().backward()

    img_ref = images.clone().requires_grad_(True)
    cap_ref = captions.clone().requires_grad_(True)
    ref = reference_similarity(img_ref, cap_ref, lengths, direction)
    (ref * weights).sum().backward()

    assert img_impl.grad is not None and cap_impl.grad is not None
    assert torch.allclose(img_impl.grad, img_ref.grad, rtol=1e-6, atol=1e-9)
    assert torch.allclose(cap_impl.grad, cap_ref.grad, rtol=1e-6, atol=1e-9)

    # padding positions get exactly zero gradient (and real positions do not)
    pad = pad_mask(lengths)
    assert torch.count_nonzero(cap_impl.grad[pad]) == 0
    assert (cap_impl.grad[~pad].abs().sum(dim=-1) > 0).all()


# --------------------------------------------------------------------------------------
# Tiles, chunks by length, the in-place path, large lambda
# --------------------------------------------------------------------------------------
ALL_LENGTHS = list(range(2, MAX_LEN + 1)) * 2  # every length from 2 to L, twice


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("tiles", [(None, None), (3, 5), (1, 1), (4, 7), (2, 3)])
def test_every_length_and_odd_tiles_match_reference(direction, tiles):
    images, captions, lengths = make_inputs(7, len(ALL_LENGTHS), seed=20, lengths=ALL_LENGTHS)
    perm = torch.randperm(len(ALL_LENGTHS), generator=torch.Generator().manual_seed(0))
    captions, lengths = captions[perm], lengths[perm]  # lengths in no particular order
    out = scan_similarity(images, captions, lengths, direction=direction,
                          image_tile=tiles[0], caption_tile=tiles[1])
    ref = reference_similarity(images, captions, lengths, direction)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_default_tiles_with_small_budget_match_reference(direction, monkeypatch):
    # shrink the default tile budgets (CPU: evaluation; "cuda": also autograd) so that
    # the default sizing cuts many chunks and tiles
    import hat.models.hat.alignment as alignment
    for kind in ("cpu", "cuda"):
        monkeypatch.setitem(alignment.TILE_SCORES, kind, 300)
        monkeypatch.setitem(alignment.CHUNK_TOKENS, kind, 20)
    images, captions, lengths = make_inputs(7, len(ALL_LENGTHS), seed=21, lengths=ALL_LENGTHS)
    with torch.no_grad():
        out = scan_similarity(images, captions, lengths, direction=direction)
    ref = reference_similarity(images, captions, lengths, direction)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-9)
    leaf = images.clone().requires_grad_(True)
    scan_similarity(leaf, captions, lengths, direction=direction).sum().backward()
    ref_leaf = images.clone().requires_grad_(True)
    reference_similarity(ref_leaf, captions, lengths, direction).sum().backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("tiles", [(None, None), (3, 5), (1, 1), (4, 7), (2, 3)])
def test_recomputed_scores_and_gradients_match_reference(direction, tiles, monkeypatch):
    # memory-bounded scoring under autograd: every length, padded captions, odd tiles, and
    # a tiny recompute budget so that the default tiles of backward are many
    import hat.models.hat.alignment as alignment
    monkeypatch.setitem(alignment.RECOMPUTE_SCORES, "cpu", 300)
    images, captions, lengths = make_inputs(7, len(ALL_LENGTHS), seed=22, lengths=ALL_LENGTHS)
    perm = torch.randperm(len(ALL_LENGTHS), generator=torch.Generator().manual_seed(1))
    captions, lengths = captions[perm], lengths[perm]
    weights = torch.randn(7, len(ALL_LENGTHS), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    leaves = [images.clone().requires_grad_(True), captions.clone().requires_grad_(True)]
    out = scan_similarity(*leaves, lengths, direction=direction, image_tile=tiles[0], caption_tile=tiles[1],
                          recompute=True)
    (out * weights).sum().backward()
    ref_leaves = [images.clone().requires_grad_(True), captions.clone().requires_grad_(True)]
    ref = reference_similarity(*ref_leaves, lengths, direction)
    (ref * weights).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-9)
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-9)
    pad = pad_mask(lengths)
    assert torch.count_nonzero(leaves[1].grad[pad]) == 0  # padding gets no gradient


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("needs", ["images", "captions"])
def test_recomputed_gradients_when_one_side_is_frozen(direction, needs):
    images, captions, lengths = make_inputs(5, 9, seed=23)
    grads = []
    for recompute in (True, False):
        leaves = [images.clone().requires_grad_(needs == "images"),
                  captions.clone().requires_grad_(needs == "captions")]
        out = scan_similarity(*leaves, lengths, direction=direction, image_tile=2, recompute=recompute)
        out.square().sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    assert [g is None for g in grads[0]] == [g is None for g in grads[1]] == [needs != "images", needs != "captions"]
    for mine, kept in zip(*grads):
        if mine is not None:
            torch.testing.assert_close(mine, kept, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_recompute_with_half_precision_inputs(direction):
    # features under autocast are bf16/fp16: fp32 scores, gradients in the inputs' dtype,
    # within bf16's precision of the fp64 reference on the same (rounded) values
    images, captions, lengths = make_inputs(5, 9, seed=25)
    images, captions = images.to(torch.bfloat16), captions.to(torch.bfloat16)
    leaves = [images.clone().requires_grad_(True), captions.clone().requires_grad_(True)]
    out = scan_similarity(*leaves, lengths, direction=direction, image_tile=2, recompute=True)
    out.square().sum().backward()
    ref_leaves = [images.double().requires_grad_(True), captions.double().requires_grad_(True)]
    ref = reference_similarity(*ref_leaves, lengths, direction)
    ref.square().sum().backward()
    assert out.dtype == torch.float32 and leaves[0].grad.dtype == leaves[1].grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        scale = float(ref_leaf.grad.abs().max())
        torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_recompute_keeps_only_the_inputs_for_backward(direction):
    # what autograd saves for backward while the scores are computed: with recompute the
    # inputs (and the lengths), whatever the number of tiles; without, every tile's
    # intermediates, growing with the tiles scored
    images, captions, lengths = make_inputs(12, 20, seed=24)

    def saved_bytes(recompute, n_images):
        saved = []

        def pack(tensor):
            saved.append(tensor.untyped_storage().nbytes() if tensor.device.type == "cpu" else 0)
            return tensor

        leaves = [images[:n_images].clone().requires_grad_(True), captions.clone().requires_grad_(True)]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            scan_similarity(*leaves, lengths, direction=direction, image_tile=2, caption_tile=5,
                            recompute=recompute)
        return sum(saved)

    for n_images in (6, 12):
        inputs = images[:n_images].nbytes + captions.nbytes
        assert 0 < saved_bytes(True, n_images) <= inputs + lengths.nbytes
    kept_6, kept_12 = saved_bytes(False, 6), saved_bytes(False, 12)
    assert kept_12 > 1.8 * kept_6 and kept_12 > 5 * (images.nbytes + captions.nbytes)


def test_caption_chunks_follow_token_budget():
    from hat.models.hat.alignment import _caption_chunks
    lengths = [2, 2, 3, 5, 5, 5, 7]  # sorted
    # at most 10 padded tokens per chunk: [2,2,3] -> 9, [5,5] -> 10, [5,7] -> 14 > 10 -> [5], [7]
    assert _caption_chunks(lengths, None, 10) == [(0, 3), (3, 5), (5, 6), (6, 7)]
    assert _caption_chunks(lengths, 3, 10) == [(0, 3), (3, 6), (6, 7)]
    assert _caption_chunks([9], None, 4) == [(0, 1)]  # one caption always fits


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_inplace_path_equals_autograd_path(direction):
    images, captions, lengths = make_inputs(5, 9, seed=22)
    with torch.no_grad():
        fast = scan_similarity(images, captions, lengths, direction=direction, image_tile=2,
                               caption_tile=4)
    slow = scan_similarity(images.clone().requires_grad_(True), captions, lengths,
                           direction=direction, image_tile=2, caption_tile=4)
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("lam", [30.0, 100.0])
def test_large_lambda_is_shifted_and_exact(direction, lam):
    images, captions, lengths = make_inputs(4, 6, seed=23)
    out = scan_similarity(images, captions, lengths, direction=direction, lambda_softmax=lam)
    ref = reference_similarity(images, captions, lengths, direction, lam)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-9)
    out32 = scan_similarity(images.float(), captions.float(), lengths, direction=direction,
                            lambda_softmax=lam)
    assert torch.isfinite(out32).all()
    torch.testing.assert_close(out32.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_non_finite_padding_is_ignored(direction):
    images, captions, lengths = make_inputs(3, 5, seed=24)
    pad = pad_mask(lengths)
    poisoned = captions.clone()
    poisoned[pad] = float("nan")
    poisoned[pad.nonzero()[0, 0], pad.nonzero()[0, 1]] = float("inf")
    out = scan_similarity(images, poisoned, lengths, direction=direction)
    ref = reference_similarity(images, captions, lengths, direction)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bad", [[0, 3], [3, MAX_LEN + 1]])
def test_rejects_lengths_outside_1_to_L(bad):
    images, captions, _ = make_inputs(2, 2, seed=25, lengths=[3, 3])
    with pytest.raises(ValueError, match="caption_lengths"):
        scan_similarity(images, captions, torch.tensor(bad))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("tiles", [(None, None), (2, 3)])
def test_gradients_every_length_match_reference(direction, tiles):
    images, captions, lengths = make_inputs(4, len(ALL_LENGTHS), seed=26, lengths=ALL_LENGTHS)
    weights = torch.randn(4, len(ALL_LENGTHS), generator=torch.Generator().manual_seed(7),
                          dtype=torch.float64)
    grads = []
    for fn in (lambda i, c: scan_similarity(i, c, lengths, direction=direction,
                                            image_tile=tiles[0], caption_tile=tiles[1]),
               lambda i, c: reference_similarity(i, c, lengths, direction)):
        img, cap = images.clone().requires_grad_(True), captions.clone().requires_grad_(True)
        (fn(img, cap) * weights).sum().backward()
        grads.append((img.grad, cap.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-9)
