"""ITC with the queue, queue writes, hard negatives and ITM pairs."""
import math

import pytest
import torch
import torch.nn.functional as F

from hat.models.multisea.losses import (build_itm_pairs, enqueue_, itc_loss, itm_loss, sample_hard_negatives,
                                 soft_targets)

# a 3-pair batch: pairs 0 and 1 show image 7, pair 2 image 9; the queue holds one more
# feature of image 9 (column 0) and an empty slot (-100)
IMAGE_FEATS = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
TEXT_FEATS = [[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]
IMAGE_QUEUE_COLUMNS = [[0.5, 0.5], [-1.0, 0.0]]
TEXT_QUEUE_COLUMNS = [[0.0, 1.0], [2.0, -1.0]]
IMAGE_INDEX = [7, 7, 9]
IDX_QUEUE = [9, -100]
TAU = 0.5


def _soft_ce(queries, keys, targets):
    """mean over rows of -sum_j y_ij log softmax_j(q_i . k_j / tau), in plain Python."""
    total = 0.0
    for query, row_targets in zip(queries, targets):
        logits = [sum(a * b for a, b in zip(query, key)) / TAU for key in keys]
        log_norm = math.log(sum(math.exp(v) for v in logits))
        total += -sum(y * (v - log_norm) for y, v in zip(row_targets, logits))
    return total / len(queries)


def test_itc_soft_targets_count_queue_positives():
    targets = [[0.5, 0.5, 0.0, 0.0, 0.0],  # image 7: pairs 0, 1
               [0.5, 0.5, 0.0, 0.0, 0.0],
               [0.0, 0.0, 0.5, 0.5, 0.0]]  # image 9: pair 2 and queue column 0
    got = soft_targets(torch.tensor(IMAGE_INDEX), torch.tensor(IMAGE_INDEX + IDX_QUEUE))
    assert torch.equal(got, torch.tensor(targets))

    image_feats = torch.tensor(IMAGE_FEATS, requires_grad=True)
    text_feats = torch.tensor(TEXT_FEATS, requires_grad=True)
    loss = itc_loss(image_feats, text_feats, torch.tensor(IMAGE_INDEX), torch.tensor(IMAGE_QUEUE_COLUMNS).t(),
                    torch.tensor(TEXT_QUEUE_COLUMNS).t(), torch.tensor([IDX_QUEUE]), torch.tensor(TAU))
    i2t = _soft_ce(IMAGE_FEATS, TEXT_FEATS + TEXT_QUEUE_COLUMNS, targets)
    t2i = _soft_ce(TEXT_FEATS, IMAGE_FEATS + IMAGE_QUEUE_COLUMNS, targets)
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(2.2408, abs=1e-4)  # by hand: (2.4673 + 2.0144) / 2

    # in-batch keys are detached: the text features get gradient from the t2i half only
    loss.backward()
    queries = torch.tensor(TEXT_FEATS, requires_grad=True)
    keys = torch.cat([torch.tensor(IMAGE_FEATS), torch.tensor(IMAGE_QUEUE_COLUMNS)])
    t2i_only = -(F.log_softmax(queries @ keys.t() / TAU, dim=1) * torch.tensor(targets)).sum(1).mean() / 2
    t2i_only.backward()
    assert torch.allclose(text_feats.grad, queries.grad, atol=1e-6)


def test_queue_is_fifo_and_wraps_around():
    size, width = 5, 2
    image_queue, text_queue = torch.zeros(width, size), torch.zeros(width, size)
    idx_queue, ptr = torch.full((1, size), -100), torch.tensor([3])

    def write(first_row, count):
        rows = torch.arange(first_row, first_row + count, dtype=torch.float32)
        feats = rows[:, None].repeat(1, width)  # row r holds the value r
        enqueue_(image_queue, text_queue, idx_queue, ptr, feats, -feats, rows.long())

    write(0, 4)  # columns 3, 4, 0, 1
    assert idx_queue.tolist() == [[2, 3, -100, 0, 1]] and ptr.tolist() == [2]
    assert image_queue[0].tolist() == [2, 3, 0, 0, 1] and text_queue[1].tolist() == [-2, -3, 0, -0, -1]
    write(10, 7)  # longer than the queue: as if written one by one from column 2
    assert idx_queue.tolist() == [[13, 14, 15, 16, 12]] and ptr.tolist() == [4]
    assert image_queue[1].tolist() == [13, 14, 15, 16, 12]


def test_hard_negatives_follow_the_softmax_without_same_image():
    temp = torch.tensor(1.0)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    key_index = torch.tensor([0, 1, 2, 3])
    query = torch.tensor([[2.0, 0.0]])  # logits 2, 0, 2, 0 -> key 0 is its own image
    queries, query_index = query.repeat(20000, 1), torch.zeros(20000, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    picks = sample_hard_negatives(queries, keys, query_index, key_index, temp, generator)
    assert picks.shape == (20000,) and picks.dtype == torch.long
    frequencies = torch.bincount(picks, minlength=4).float() / 20000
    e = math.e ** 2
    expected = torch.tensor([0.0, 1 / (e + 2), e / (e + 2), 1 / (e + 2)])  # key 0 zeroed, renormalised
    assert torch.allclose(frequencies, expected, atol=0.015)
    assert frequencies[0] == 0


def test_hard_negatives_when_the_softmax_underflows():
    keys = torch.tensor([[100.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    # the query's own image (key 0) takes all the softmax mass: the rest underflow to 0
    picks = sample_hard_negatives(torch.tensor([[100.0, 0.0]] * 200), keys, torch.zeros(200, dtype=torch.long),
                                  torch.tensor([0, 1, 2]), torch.tensor(0.1), torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1, 2}  # uniform over the negatives, never the positive


def test_itm_pairs_positive_then_text_negative_then_image_negative():
    # two ranks of 3 pairs; this rank holds gathered rows 3, 4, 5; states hold their row number
    all_images = torch.arange(6, dtype=torch.float32).view(6, 1, 1).expand(6, 4, 2)  # [6, R=4, 2]
    all_texts = torch.arange(6, dtype=torch.float32).view(6, 1, 1).expand(6, 3, 2) + 100  # [6, L=3, 2]
    all_masks = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
    negative_image, negative_text = torch.tensor([0, 2, 4]), torch.tensor([1, 5, 3])
    images, texts, masks, labels = build_itm_pairs(all_images[3:], all_texts[3:], all_masks[3:], all_images,
                                                   all_texts, all_masks, negative_image, negative_text)
    assert images[:, 0, 0].tolist() == [3, 4, 5, 3, 4, 5, 0, 2, 4]
    assert texts[:, 0, 0].tolist() == [103, 104, 105, 101, 105, 103, 103, 104, 105]
    assert masks.sum(1).tolist() == [3, 2, 1, 1, 1, 3, 3, 2, 1]
    assert labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_itm_loss_averages_both_directions_over_all_layers():
    labels = torch.tensor([1, 0, 0])
    i2t = [torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [3.0, 0.0], [0.0, 1.0]])]
    t2i = [torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 2.0], [1.0, 1.0]])]

    def ce(logits, label):  # -log softmax(logits)[label]
        return -(logits[label] - math.log(sum(math.exp(v) for v in logits)))

    def mean_ce(layers):
        values = [ce(row.tolist(), lab) for layer in layers for row, lab in zip(layer, labels.tolist())]
        return sum(values) / len(values)

    expected = (mean_ce(i2t) + mean_ce(t2i)) / 2
    assert itm_loss(i2t, t2i, labels).item() == pytest.approx(expected, rel=1e-6)
