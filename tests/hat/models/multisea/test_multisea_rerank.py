"""ITC shortlist + ITM re-rank."""
import pytest
import torch

from hat.models.multisea.rerank import encode_caption_set, evaluate, rerank_recall, rerank_scores


@pytest.fixture
def encoded(tiny_model):
    model = tiny_model(seed=2).eval()
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    input_ids = torch.randint(5, 100, (5, 8), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[2, 4:] = 0
    mask[4, 6:] = 0
    with torch.no_grad():
        image_feats, image_states = model.encode_images(images)
        text_feats, text_states = model.encode_captions(input_ids, mask)
    return model, (image_feats, image_states, text_feats, text_states, mask), (images, input_ids, mask)


def _pair_by_pair(model, image_feats, image_states, text_feats, text_states, mask, direction):
    """ITM class-1 logit (last layer) + f_I . f_T / tau, one pair at a time."""
    scores = torch.empty(len(image_feats), len(text_feats))
    with torch.no_grad():
        for i in range(len(image_feats)):
            for j in range(len(text_feats)):
                logits = model.itm_logits(image_states[i:i + 1], text_states[j:j + 1], mask[j:j + 1], direction)
                scores[i, j] = logits[-1][0, 1] + image_feats[i] @ text_feats[j] / model.temp
    return scores


def test_rerank_with_k_n_scores_every_pair_with_itm_plus_itc(encoded):
    model, features, _ = encoded
    with torch.no_grad():
        model.temp.fill_(0.7)
    i2t, t2i = rerank_scores(model, *features, k=5, pair_batch_size=4)  # chunks split an image's captions
    assert i2t.shape == t2i.shape == (3, 5)
    assert torch.allclose(i2t, _pair_by_pair(model, *features, "i2t"), atol=1e-5)
    assert torch.allclose(t2i, _pair_by_pair(model, *features, "t2i"), atol=1e-5)
    assert not torch.allclose(i2t, t2i, atol=1e-3)  # two experts, two different matrices


def test_rerank_keeps_the_itc_top_k_and_puts_the_rest_below_it_in_itc_order(encoded):
    """(Until issue 21 the rest scored -100, ranked last whatever its ITC score.)"""
    model, features, _ = encoded
    image_feats, _, text_feats, _, _ = features
    coarse = image_feats @ text_feats.t() / model.temp
    i2t, t2i = rerank_scores(model, *features, k=2, pair_batch_size=3)
    full_i2t, full_t2i = rerank_scores(model, *features, k=64)  # k beyond N: every pair
    inside_i2t = torch.zeros_like(i2t, dtype=torch.bool).scatter_(1, coarse.topk(2, dim=1).indices, True)
    inside_t2i = torch.zeros_like(t2i, dtype=torch.bool).scatter_(0, coarse.topk(2, dim=0).indices, True)
    for i in range(3):  # the rest: strictly below the shortlist, in ITC order
        assert i2t[i][~inside_i2t[i]].max() < i2t[i][inside_i2t[i]].min()
        outside = torch.nonzero(~inside_i2t[i]).view(-1)
        assert (i2t[i][outside].argsort(descending=True).tolist()
                == coarse[i][outside].argsort(descending=True).tolist())
    for j in range(5):
        assert t2i[:, j][~inside_t2i[:, j]].max() < t2i[:, j][inside_t2i[:, j]].min()
    assert torch.allclose(i2t[inside_i2t], full_i2t[inside_i2t], atol=1e-5)
    assert torch.allclose(t2i[inside_t2i], full_t2i[inside_t2i], atol=1e-5)


def test_recall_takes_each_direction_from_its_own_matrix():
    i2t = torch.eye(2).repeat_interleave(2, dim=1)  # image i ranks its captions 2i, 2i+1 first
    t2i = 1 - i2t  # every caption ranks the wrong image first
    metrics = rerank_recall(i2t, t2i, torch.tensor([0, 0, 1, 1]))
    assert metrics["i2t_r1"] == 100.0 and metrics["t2i_r1"] == 0.0 and metrics["t2i_r5"] == 100.0
    assert metrics["rsum"] == 500.0 and metrics["t2i_meanr"] == 2.0


def test_evaluate_encodes_once_and_reranks(encoded):
    model, features, (images, input_ids, mask) = encoded
    image_loader = [images[:2], images[2:]]
    caption_loader = [{"input_ids": input_ids[:3], "attention_mask": mask[:3]},
                      {"input_ids": input_ids[3:], "attention_mask": mask[3:]}]
    text_feats, text_states, text_mask = encode_caption_set(model, caption_loader, torch.device("cpu"))
    assert torch.allclose(text_states, features[3], atol=1e-5) and torch.equal(text_mask, mask)
    metrics, (i2t, t2i) = evaluate(model, image_loader, caption_loader, torch.tensor([0, 0, 1, 1, 2]),
                                   torch.device("cpu"), k=2)
    expected_i2t, expected_t2i = rerank_scores(model, *features, k=2)
    assert torch.allclose(i2t, expected_i2t, atol=1e-5) and torch.allclose(t2i, expected_t2i, atol=1e-5)
    assert metrics == rerank_recall(i2t, t2i, torch.tensor([0, 0, 1, 1, 2]))
