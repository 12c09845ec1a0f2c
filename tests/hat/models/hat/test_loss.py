"""Tests for hat.models.hat.loss.vse_loss, following HAT's loss (VSE++ with the hardest negative).

L = sum_i max_{j != i} [m + S_ij - S_ii]_+  +  sum_j max_{i != j} [m + S_ij - S_jj]_+
(rows images, columns captions, diagonal positives; summed, not averaged).
hardest_negative=False sums over all negatives instead of taking the max.
positive_mask[i, j] = True removes S_ij from the negatives; the diagonal never is one.
"""
import pytest
import torch

from hat.models.hat.loss import vse_loss


# --------------------------------------------------------------------------------------
# Literal reference (VSE++, hardest negative)
# --------------------------------------------------------------------------------------
def reference_vse_loss(scores, margin=0.2, hardest_negative=True, positive_mask=None):
    """Python loops over the batch; each hinge term written out."""
    n = scores.shape[0]

    def is_negative(i, j):
        if i == j:
            return False
        return positive_mask is None or not bool(positive_mask[i, j])

    def reduce(terms):
        if not terms:
            return scores.new_zeros(())
        if hardest_negative:
            return torch.stack(terms).max()
        return torch.stack(terms).sum()

    total = scores.new_zeros(())
    # image i as the query: negatives are captions j != i
    for i in range(n):
        terms = [torch.clamp(margin + scores[i, j] - scores[i, i], min=0)
                 for j in range(n) if is_negative(i, j)]
        total = total + reduce(terms)
    # caption j as the query: negatives are images i != j
    for j in range(n):
        terms = [torch.clamp(margin + scores[i, j] - scores[j, j], min=0)
                 for i in range(n) if is_negative(i, j)]
        total = total + reduce(terms)
    return total


def random_scores(b, seed):
    g = torch.Generator().manual_seed(seed)
    # spread chosen so that many hinge terms are active and many are not
    return 0.3 * torch.randn(b, b, generator=g, dtype=torch.float64)


def same_image_mask(image_ids):
    ids = torch.as_tensor(image_ids)
    return ids[:, None] == ids[None, :]


# --------------------------------------------------------------------------------------
# Hand-computed
# --------------------------------------------------------------------------------------
HAND_S = torch.tensor([
    [0.9, 0.5, 0.8],
    [0.3, 0.6, 0.1],
    [0.7, 0.9, 0.4],
], dtype=torch.float64)


def test_hand_computed_3x3_hardest():
    # m = 0.2
    # image rows, [m + S_ij - S_ii]_+ over j != i:
    #   i=0 (S00=.9): j1 .2+.5-.9=-.2 -> 0, j2 .2+.8-.9=.1      -> max .1
    #   i=1 (S11=.6): j0 .2+.3-.6=-.1 -> 0, j2 .2+.1-.6=-.3 -> 0 -> max 0
    #   i=2 (S22=.4): j0 .2+.7-.4=.5,       j1 .2+.9-.4=.7      -> max .7
    #   rows: .8
    # caption columns, [m + S_ij - S_jj]_+ over i != j:
    #   j=0 (S00=.9): i1 .2+.3-.9=-.4 -> 0, i2 .2+.7-.9=0       -> max 0
    #   j=1 (S11=.6): i0 .2+.5-.6=.1,       i2 .2+.9-.6=.5      -> max .5
    #   j=2 (S22=.4): i0 .2+.8-.4=.6,       i1 .2+.1-.4=-.1 -> 0 -> max .6
    #   columns: 1.1
    # total 1.9
    loss = vse_loss(HAND_S)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(1.9, abs=1e-9)
    assert vse_loss(HAND_S, margin=0.2, hardest_negative=True).item() == pytest.approx(1.9, abs=1e-9)


def test_hand_computed_3x3_sum_over_negatives():
    # same terms as above, summed instead of maxed:
    #   rows: 0 + .1 + 0 + 0 + .5 + .7 = 1.3
    #   columns: 0 + 0 + .1 + .5 + .6 + 0 = 1.2
    # total 2.5
    loss = vse_loss(HAND_S, hardest_negative=False)
    assert loss.item() == pytest.approx(2.5, abs=1e-9)


def test_hand_computed_3x3_with_mask():
    # mark (image 2, caption 1) as a positive pair: S21 = .9 is no longer a negative
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[2, 1] = True
    # hardest: row 2 keeps only j0 (.5) -> rows .1 + 0 + .5 = .6
    #          column 1 keeps only i0 (.1) -> columns 0 + .1 + .6 = .7        total 1.3
    assert vse_loss(HAND_S, positive_mask=mask).item() == pytest.approx(1.3, abs=1e-9)
    # sum: rows .1 + .5 = .6 ; columns .1 + .6 = .7                          total 1.3
    assert vse_loss(HAND_S, hardest_negative=False, positive_mask=mask).item() == pytest.approx(
        1.3, abs=1e-9
    )


def test_hand_computed_2x2_margin():
    s = torch.tensor([[0.5, 0.4], [0.1, 0.2]], dtype=torch.float64)
    # m = 0.5:
    #   rows:    i0: .5+.4-.5=.4 ; i1: .5+.1-.2=.4          -> .8
    #   columns: j0: .5+.1-.5=.1 ; j1: .5+.4-.2=.7          -> .8
    # one negative per query, so both modes agree: 1.6
    assert vse_loss(s, margin=0.5).item() == pytest.approx(1.6, abs=1e-9)
    assert vse_loss(s, margin=0.5, hardest_negative=False).item() == pytest.approx(1.6, abs=1e-9)
    # m = 0: only j1 column term survives: 0 + .4 - .2 = .2 ; rows: .4-.5<0, .1-.2<0
    assert vse_loss(s, margin=0.0).item() == pytest.approx(0.2, abs=1e-9)


def test_no_violation_gives_zero():
    s = torch.eye(4, dtype=torch.float64)  # positives 1, negatives 0, margin .2
    assert vse_loss(s).item() == 0.0
    assert vse_loss(s, hardest_negative=False).item() == 0.0


# --------------------------------------------------------------------------------------
# Literal reference on random matrices
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("hardest", [True, False])
@pytest.mark.parametrize("margin", [0.2, 0.5])
@pytest.mark.parametrize("b", [2, 7, 16])
def test_matches_reference_no_mask(hardest, margin, b):
    s = random_scores(b, seed=b)
    loss = vse_loss(s, margin=margin, hardest_negative=hardest)
    ref = reference_vse_loss(s, margin=margin, hardest_negative=hardest)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("hardest", [True, False])
def test_matches_reference_same_image_mask(hardest):
    s = random_scores(8, seed=3)
    mask = same_image_mask([0, 0, 1, 2, 2, 2, 3, 4])
    loss = vse_loss(s, hardest_negative=hardest, positive_mask=mask)
    ref = reference_vse_loss(s, hardest_negative=hardest, positive_mask=mask)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
    # the mask makes a difference here
    unmasked = reference_vse_loss(s, hardest_negative=hardest)
    assert abs(unmasked.item() - ref.item()) > 1e-3


@pytest.mark.parametrize("hardest", [True, False])
def test_matches_reference_asymmetric_mask_with_false_diagonal(hardest):
    # an arbitrary (asymmetric) mask: checks the orientation mask[i, j] <-> S[i, j];
    # its diagonal is False, yet the diagonal must still never count as a negative
    g = torch.Generator().manual_seed(4)
    s = random_scores(9, seed=5)
    mask = torch.rand(9, 9, generator=g) < 0.3
    mask.fill_diagonal_(False)
    loss = vse_loss(s, hardest_negative=hardest, positive_mask=mask)
    ref = reference_vse_loss(s, hardest_negative=hardest, positive_mask=mask)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
    transposed = reference_vse_loss(s, hardest_negative=hardest, positive_mask=mask.T)
    assert abs(transposed.item() - ref.item()) > 1e-3  # the test can tell the orientation


def test_mask_with_true_diagonal_same_as_false_diagonal():
    s = random_scores(6, seed=6)
    mask = same_image_mask([0, 1, 1, 2, 3, 3])
    mask_off = mask.clone()
    mask_off.fill_diagonal_(False)
    for hardest in (True, False):
        a = vse_loss(s, hardest_negative=hardest, positive_mask=mask)
        b = vse_loss(s, hardest_negative=hardest, positive_mask=mask_off)
        assert a.item() == pytest.approx(b.item(), rel=1e-12, abs=1e-12)


def test_all_false_mask_equals_no_mask():
    s = random_scores(6, seed=7)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    for hardest in (True, False):
        a = vse_loss(s, hardest_negative=hardest, positive_mask=mask)
        b = vse_loss(s, hardest_negative=hardest)
        assert a.item() == pytest.approx(b.item(), rel=1e-12, abs=1e-12)


def test_summed_not_averaged():
    # the same 4x4 block repeated on the diagonal of an 8x8 matrix with very low
    # off-block scores doubles the loss (a mean would keep it the same)
    small = random_scores(4, seed=8)
    big = torch.full((8, 8), -10.0, dtype=torch.float64)
    big[:4, :4] = small
    big[4:, 4:] = small
    for hardest in (True, False):
        a = vse_loss(small, hardest_negative=hardest).item()
        b = vse_loss(big, hardest_negative=hardest).item()
        assert a > 0
        assert b == pytest.approx(2 * a, rel=1e-9)


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("hardest", [True, False])
@pytest.mark.parametrize("use_mask", [False, True])
def test_gradient_matches_reference(hardest, use_mask):
    s = random_scores(10, seed=9)  # continuous random values: the max is unique
    mask = same_image_mask([0, 0, 1, 2, 3, 3, 3, 4, 5, 6]) if use_mask else None

    s_impl = s.clone().requires_grad_(True)
    vse_loss(s_impl, hardest_negative=hardest, positive_mask=mask).backward()
    s_ref = s.clone().requires_grad_(True)
    reference_vse_loss(s_ref, hardest_negative=hardest, positive_mask=mask).backward()

    assert s_impl.grad is not None
    assert s_ref.grad.abs().sum() > 0
    torch.testing.assert_close(s_impl.grad, s_ref.grad, rtol=1e-6, atol=1e-9)
