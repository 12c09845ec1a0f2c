"""Exact accumulation (hat.loop.exact_gradients, accumulation="exact"): one optimizer step
over several micro-batches has the loss and the gradients of the same batch in one
micro-batch, where split accumulation (each micro-batch its own VSE++ loss, the hardest
negative among its own pairs) does not. Float64 on the CPU, rtol 1e-5."""
import copy

import pytest
import torch

from hat.loop import optimizer_step
from hat.models.hat.plugin import HATPlugin
from tests.hat.test_loop import RecordingSGD

CPU = torch.device("cpu")
PLUGIN = HATPlugin({"margin": 0.2, "vse_warmup_epochs": 0, "same_image_mask": False})


def tiny_hat(text_dropout=0.0, drop_path_rate=0.0):
    """A tiny random Swin + the packaged MiniLM, every parameter trained, in float64."""
    from hat.models.hat.model import build_hat

    torch.manual_seed(0)
    model = build_hat("swin_base_patch4_window7_224", "packaged-minilm", [[2, 2], [3, 4], [4, 6]], embed_dim=32,
                      image_size=64, image_pretrained=False, text_dropout=text_dropout,
                      image_backbone_kwargs=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                                 window_size=4, drop_path_rate=drop_path_rate))
    model.set_backbones_trainable(image=True, text=True)
    return model.double().train()


def pair_batch(size, seed=4):
    generator = torch.Generator().manual_seed(seed)
    batch = {"images": torch.randn(size, 3, 64, 64, generator=generator, dtype=torch.float64),
             "input_ids": torch.randint(1000, 2000, (size, 7), generator=generator),
             "attention_mask": torch.ones(size, 7, dtype=torch.long), "image_index": torch.arange(size)}
    batch["attention_mask"][1::2, 5:] = 0
    return batch


def step(model, batch, micro_batch_size, exact=True):
    """One optimizer step through the loop -> (losses, {parameter name: the gradient it stepped with})."""
    optimizer = RecordingSGD(model.parameters(), lr=0.1)
    pair = (lambda net, micro, first: PLUGIN.encode_batch(net, model, micro, first),
            lambda features, micros: PLUGIN.loss_from_features(model, features, micros, 1))
    values, skipped = optimizer_step(model, lambda net, micro: PLUGIN.loss(net, model, micro, 1), batch, optimizer,
                                     CPU, micro_batch_size, exact=pair if exact else None)
    assert not skipped
    return values, {name: optimizer.seen.get(id(p)) for name, p in model.named_parameters()}


def one_micro_batch(model, batch):
    """The reference: the whole batch as one micro-batch, by hand (HAT's forward, VSE++)."""
    model = copy.deepcopy(model)
    loss = PLUGIN.loss(model, model, batch, 1)["loss"]
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


def assert_same_gradients(got, want, rtol=1e-5):
    assert got.keys() == want.keys()
    for name, grad in want.items():
        assert (got[name] is None) == (grad is None), name
        if grad is not None:
            torch.testing.assert_close(got[name], grad, rtol=rtol, atol=1e-10, msg=name)


def differ(got, want) -> bool:
    return any(not torch.allclose(got[name], grad, rtol=1e-3, atol=1e-8)
               for name, grad in want.items() if grad is not None)


@pytest.mark.parametrize("size, micro", [(16, 4), (13, 5)], ids=["4x4", "5+5+3"])
def test_exact_step_is_the_one_micro_batch_step(size, micro):
    model, batch = tiny_hat(), pair_batch(size)
    loss, expected = one_micro_batch(model, batch)
    values, grads = step(copy.deepcopy(model), batch, micro)
    assert values["loss"] == pytest.approx(loss, rel=1e-5)
    assert_same_gradients(grads, expected)
    split_values, split_grads = step(copy.deepcopy(model), batch, micro, exact=False)
    # split: each micro-batch's hardest negative among its own pairs, another objective
    assert split_values["loss"] != pytest.approx(loss, rel=1e-3)
    assert differ(split_grads, expected)


def one_graph_over_micro_batches(model, batch, seed, micro=5):
    """The reference with random masks: each micro-batch encoded in turn with a graph (from
    ``seed``), one loss over all of them -> (loss, gradients, the RNG state after)."""
    reference = copy.deepcopy(model)
    torch.manual_seed(seed)
    micros = [{key: value[start:start + micro] for key, value in batch.items()}
              for start in range(0, batch["images"].shape[0], micro)]
    features = [PLUGIN.encode_batch(reference, reference, part) for part in micros]
    loss = PLUGIN.loss_from_features(reference, features, micros, 1)["loss"]
    loss.backward()
    return loss, {name: p.grad for name, p in reference.named_parameters()}, torch.get_rng_state()


def test_exact_replays_dropout_and_drop_path():
    """With text dropout and Swin drop-path on, each micro-batch's replay draws the masks its
    no-grad pass drew: the step's gradients are those of one graph over the same masks
    (each micro-batch encoded in turn with a graph, one loss over all of them)."""
    model, batch = tiny_hat(text_dropout=0.2, drop_path_rate=0.3), pair_batch(13)
    torch.manual_seed(7)
    first = PLUGIN.encode_batch(model, model, batch)
    assert not torch.equal(first["images"][0], PLUGIN.encode_batch(model, model, batch)["images"][0])
    assert not torch.equal(first["captions"][0], PLUGIN.encode_batch(model, model, batch)["captions"][0])

    loss, expected, rng_after = one_graph_over_micro_batches(model, batch, seed=11)

    torch.manual_seed(11)
    values, grads = step(copy.deepcopy(model), batch, 5)
    assert values["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert_same_gradients(grads, expected)
    assert torch.equal(torch.get_rng_state(), rng_after)  # the step drew what the one graph drew


def test_frozen_text_encoder_runs_once_per_micro_batch():
    """While the text encoder is frozen (the demo's MiniLM) the replay takes its layers from
    the no-grad pass instead of running it again, with dropout and drop-path on: the step
    equals one graph over the same masks, and the text encoder ran 3 times for 3
    micro-batches, not 6."""
    model, batch = tiny_hat(text_dropout=0.2, drop_path_rate=0.3), pair_batch(13)
    model.set_backbones_trainable(image=True, text=False)
    loss, expected, _ = one_graph_over_micro_batches(model, batch, seed=11)
    assert all(expected[name] is None for name, p in model.named_parameters() if name.startswith("text_encoder."))

    stepped, calls = copy.deepcopy(model), []
    stepped.text_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    torch.manual_seed(11)
    values, grads = step(stepped, batch, 5)
    assert calls == [5, 5, 3]
    assert values["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert_same_gradients(grads, expected)


def test_one_micro_batch_and_split_run_the_split_code_bit_for_bit():
    """A step of one micro-batch (the demo's 64 = 64) runs the split code whatever the mode,
    and split accumulation is each micro-batch's share-weighted loss, as before exact existed."""
    model, batch = tiny_hat(), pair_batch(8)
    loss, expected = one_micro_batch(model, batch)
    values, grads = step(copy.deepcopy(model), batch, 8, exact=True)
    assert values["loss"] == loss
    assert all(torch.equal(grads[name], grad) for name, grad in expected.items() if grad is not None)

    by_hand = copy.deepcopy(model)
    for start in (0, 3, 6):  # 3 + 3 + 2
        micro = {key: value[start:start + 3] for key, value in batch.items()}
        (PLUGIN.loss(by_hand, by_hand, micro, 1)["loss"] * (micro["images"].shape[0] / 8)).backward()
    _, split = step(copy.deepcopy(model), batch, 3, exact=False)
    assert all(torch.equal(split[name], p.grad) for name, p in by_hand.named_parameters() if p.grad is not None)


def test_join_pads_captions_of_different_lengths():
    """Micro-batches padded to different caption lengths join into one batch whose scores
    are the scores of the batch padded once (the lengths mask the padding)."""
    model = tiny_hat().eval()
    batch = pair_batch(6)
    batch["attention_mask"][3:, 5:] = 0
    with torch.no_grad():
        whole = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        parts = [PLUGIN.encode_batch(model, model, {key: value[:3] for key, value in batch.items()}),
                 PLUGIN.encode_batch(model, model, {"images": batch["images"][3:], "input_ids":
                                                    batch["input_ids"][3:, :5], "attention_mask":
                                                    batch["attention_mask"][3:, :5]})]
        from hat.models.hat.model import join_features

        joined = model.batch_scores(join_features(parts))
    torch.testing.assert_close(joined, whole, rtol=1e-5, atol=1e-10)


def test_accumulation_key_defaults_and_refusals():
    from hat.checks import validate_batch
    from hat.defaults import default_config
    from hat.plugins import ConfigProblem

    hat, multisea = default_config("hat"), default_config("multisea")
    assert (hat["accumulation"], multisea["accumulation"]) == ("exact", "split")

    def check(config):
        def fail(key, allowed):
            raise ConfigProblem(f"{key}={config[key]!r} is not valid; allowed: {allowed}")
        validate_batch(config, fail)

    check(dict(hat, batch_size=13, per_gpu_batchsize=5))  # exact: 5 + 5 + 3
    with pytest.raises(ConfigProblem, match=r"^batch_size=13 is not valid; allowed: a multiple of .*"
                                            r"accumulation=exact"):
        check(dict(hat, batch_size=13, per_gpu_batchsize=5, accumulation="split"))
    check(dict(multisea, accumulation="exact"))  # Multi-SEA has both members too
    from tests.toy_model import registered_toy

    with registered_toy():  # a plug-in without encode_batch / loss_from_features: split only
        toy = dict(multisea, model="toy", accumulation="exact")
        with pytest.raises(ConfigProblem, match=r"^accumulation='exact' is not available with model=toy .*"
                                                r"set accumulation=split$"):
            check(toy)
    with pytest.raises(ConfigProblem, match=r"^accumulation='mean' is not valid; allowed: \['exact', 'split'\]"):
        check(dict(hat, accumulation="mean"))
