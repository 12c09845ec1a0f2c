"""Multi-SEA's exact accumulation (accumulation="exact"): an optimizer step over several
micro-batches has the loss, the parameter gradients and the queue of the same batch in
one micro-batch (ITC against the whole batch and the queue as it was before the step, the
queue written once with the whole batch, the hard negatives drawn from the whole batch
by the same fixed generator), where split accumulation (the authors' recipe: each
micro-batch its own ITC, queue write and negatives) differs. Float64, dropout off (a
dropout mask drawn per micro-batch cannot equal one drawn for the whole batch)."""
import copy

import pytest
import torch

from hat.loop import optimizer_step
from hat.models.multisea.plugin import MultiSEAPlugin
from tests.hat.models.multisea.conftest import TINY_AFORMER, TINY_VIT
from tests.hat.test_loop import RecordingSGD

CPU = torch.device("cpu")
QUEUE = ("image_queue", "text_queue", "idx_queue", "queue_ptr")
BATCH, MICRO = 12, 4


def tiny_multisea(queue_size=16):
    """The tiny test model without dropout, in float64, with a queue that is half full of
    earlier pairs (some of them the batch's own images) and whose write wraps round."""
    from transformers import BertConfig, BertModel

    from hat.models.multisea.encoders import build_clip_vision
    from hat.models.multisea.model import MultiSEA

    torch.manual_seed(0)
    text = BertModel(BertConfig(vocab_size=100, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0))
    model = MultiSEA(build_clip_vision(**TINY_VIT), text, **{**TINY_AFORMER, "queue_size": queue_size,
                                                              "dropout": 0.0})
    model = model.double().train()
    with torch.no_grad():
        model.idx_queue[0, :8] = torch.tensor([3, 50, 51, 0, 52, 7, 53, 54])
        model.queue_ptr.fill_(8 if queue_size > BATCH else 5)
    return model


def pair_batch(size=BATCH):
    """Pairs whose images repeat within and across micro-batches; captions padded to 8."""
    generator = torch.Generator().manual_seed(3)
    batch = {"images": torch.randn(size, 3, 32, 32, generator=generator, dtype=torch.float64),
             "input_ids": torch.randint(5, 100, (size, 8), generator=generator),
             "attention_mask": torch.ones(size, 8, dtype=torch.long),
             "image_index": torch.tensor([0, 1, 2, 1, 3, 4, 5, 3, 6, 7, 8, 0])[:size]}
    batch["attention_mask"][1::3, 5:] = 0
    return batch


def plugin(seed=5):
    p = MultiSEAPlugin({})
    p.generator = torch.Generator().manual_seed(seed)  # the hard negatives' draws
    return p


def step(model, batch, micro, exact=True):
    """One optimizer step through the loop (lr 0: the queue is what the step wrote) ->
    (losses, {name: gradient}, {queue buffer: value})."""
    p = plugin()
    optimizer = RecordingSGD(model.parameters(), lr=0.0)
    pair = (lambda net, micro_batch, first: p.encode_batch(net, model, micro_batch, first),
            lambda features, micros: p.loss_from_features(model, features, micros, 0))
    values, skipped = optimizer_step(model, lambda net, micro_batch: p.loss(net, model, micro_batch, 0), batch,
                                     optimizer, CPU, micro, exact=pair if exact else None)
    assert not skipped
    return (values, {name: optimizer.seen.get(id(param)) for name, param in model.named_parameters()},
            {name: getattr(model, name).clone() for name in QUEUE})


def one_micro_batch(model, batch):
    """The reference, by hand: the batch as one micro-batch (Multi-SEA's forward)."""
    model = copy.deepcopy(model)
    losses = plugin().loss(model, model, batch, 0)
    losses["loss"].backward()
    return ({name: value.item() for name, value in losses.items()},
            {name: param.grad for name, param in model.named_parameters()},
            {name: getattr(model, name).clone() for name in QUEUE})


@pytest.mark.parametrize("micro, queue_size", [(4, 16), (5, 16), (4, 10)], ids=["4x3", "5+5+2", "queue-10"])
def test_exact_step_is_the_one_micro_batch_step(micro, queue_size):
    model, batch = tiny_multisea(queue_size), pair_batch()
    losses, expected, queue = one_micro_batch(model, batch)
    values, grads, got_queue = step(copy.deepcopy(model), batch, micro)
    for name in ("loss", "loss_itc", "loss_itm"):
        assert values[name] == pytest.approx(losses[name], rel=1e-5), name
    trained = [name for name, grad in expected.items() if grad is not None]
    assert len(trained) > 20 and {"temp", "alpha", "itm_head.weight"} <= set(trained)
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        assert (grads[name] is None) == (grad is None), name
        if grad is not None:
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-10, msg=name)
    for name in QUEUE:  # written once, with the whole batch
        torch.testing.assert_close(got_queue[name], queue[name], rtol=1e-5, atol=1e-10, msg=name)
    assert int(got_queue["queue_ptr"]) == (int(model.queue_ptr) + BATCH) % queue_size


def test_split_is_the_authors_per_micro_batch_objective_bit_for_bit():
    """split: each micro-batch's ITC sees the queue with the earlier micro-batches written,
    its negatives come from its own pairs; exactly the share-weighted sum by hand."""
    model, batch = tiny_multisea(), pair_batch()
    by_hand, p = copy.deepcopy(model), plugin()
    total = 0.0
    for start in range(0, BATCH, MICRO):
        micro = {key: value[start:start + MICRO] for key, value in batch.items()}
        loss = p.loss(by_hand, by_hand, micro, 0)["loss"] * (MICRO / BATCH)
        loss.backward()
        total += loss.item()
    values, grads, queue = step(copy.deepcopy(model), batch, MICRO, exact=False)
    assert values["loss"] == pytest.approx(total, rel=1e-6)  # the loop sums the losses in float32
    assert all(torch.equal(grads[name], param.grad) for name, param in by_hand.named_parameters()
               if param.grad is not None)
    assert all(torch.equal(queue[name], getattr(by_hand, name)) for name in QUEUE)
    exact_losses, _, _ = one_micro_batch(model, batch)
    assert values["loss"] != pytest.approx(exact_losses["loss"], rel=1e-4)  # another objective


def test_accumulation_exact_is_accepted_for_multisea():
    from hat.checks import validate_batch
    from hat.defaults import default_config

    config = dict(default_config("multisea"), accumulation="exact", batch_size=50, per_gpu_batchsize=20)

    def fail(key, allowed):
        raise AssertionError(f"{key}: {allowed}")

    validate_batch(config, fail)  # 20 + 20 + 10
    assert MultiSEAPlugin.supports_exact()
