"""Multi-SEA training pieces: optimizer groups, the warm-up + cosine schedule, the
accumulated train step, and loading checkpoints (released and the project's own)."""
import contextlib
import copy
import io
import math

import pytest
import torch

from hat.checkpoint import CheckpointError, load_model_weights, save_checkpoint
from hat.loop import NonFiniteLoss, optimizer_step
from hat.models.multisea.plugin import MultiSEAPlugin
from hat.models.multisea.released import to_released_state_dict
from hat.models.multisea.rerank import rerank_scores
from hat.models.multisea.training import build_optimizer, cosine_schedule


def train_step(network, model, batch, optimizer, scheduler, device, micro_batch_size, clip_norm=1.0,
               generator=None) -> dict:
    """One Multi-SEA optimizer step as the runner takes it: the toolkit's loop step
    (hat.loop.optimizer_step) over the plug-in's loss."""
    plugin = MultiSEAPlugin({})
    plugin.generator = generator
    values, skipped = optimizer_step(network, lambda net, micro: plugin.loss(net, model, micro, 0), batch,
                                     optimizer, device, micro_batch_size, clip_norm=clip_norm,
                                     parameters=model.parameters(), scheduler=scheduler)
    assert not skipped
    return values


def _batch(size=6, seed=2):
    """Pairs of images 0, 0, 1, 2, 3, 3, ..., captions of 8 tokens, some padded."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 100, (size, 8), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1::2, 5:] = 0
    return {"images": torch.randn(size, 3, 32, 32, generator=generator), "input_ids": input_ids,
            "attention_mask": attention_mask, "image_index": torch.tensor([0, 0, 1, 2, 3, 3, 4, 5][:size])}


def test_optimizer_is_adamw_over_the_recipe_groups(tiny_model):
    model = tiny_model()
    optimizer = build_optimizer(model)
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = {g["name"]: (g["lr"], g["weight_decay"], g["betas"], g["eps"]) for g in optimizer.param_groups}
    assert groups == {"default": (1e-5, 0.05, (0.9, 0.98), 1e-8), "encoder": (1e-6, 0.05, (0.9, 0.98), 1e-8),
                      "alpha": (1e-4, 0.05, (0.9, 0.98), 1e-8), "temp": (5e-4, 0.05, (0.9, 0.98), 1e-8)}
    custom = build_optimizer(model, lr=3e-4, encoder_lr=0.0, alpha_lr=1e-3, temp_lr=2e-3, weight_decay=0.01,
                             betas=(0.8, 0.9), eps=1e-6)
    assert [(g["name"], g["lr"], g["weight_decay"], g["betas"], g["eps"]) for g in custom.param_groups] == [
        ("default", 3e-4, 0.01, (0.8, 0.9), 1e-6), ("encoder", 0.0, 0.01, (0.8, 0.9), 1e-6),
        ("alpha", 1e-3, 0.01, (0.8, 0.9), 1e-6), ("temp", 2e-3, 0.01, (0.8, 0.9), 1e-6)]


def test_schedule_warms_up_linearly_then_follows_a_0_3_cycle_cosine():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [weight], "lr": 2e-5}, {"params": [], "lr": 1e-3}])
    scheduler = cosine_schedule(optimizer, total_steps=100)  # warm-up: 0.15 * 100 = 15 steps

    def reference(step):  # warm-up 15 steps, then 85 steps of cosine with 0.3 cycles
        if step < 15:
            return step / 15
        return 0.5 * (1 + math.cos(math.pi * 0.6 * (step - 15) / 85))

    seen = {}
    for step in range(101):
        seen[step] = [group["lr"] for group in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
    for step in (0, 1, 7, 14, 15, 16, 50, 99, 100):
        assert seen[step] == pytest.approx([2e-5 * reference(step), 1e-3 * reference(step)], rel=1e-12)
    assert seen[0] == [0.0, 0.0] and seen[15] == pytest.approx([2e-5, 1e-3], rel=1e-12)  # the peak
    assert seen[100][0] / 2e-5 == pytest.approx(0.3454915, abs=1e-7)  # 0.5 (1 + cos(0.6 pi))
    assert max(seen, key=lambda step: seen[step][0]) == 15


def _step_state(parameters, optimizer, scheduler):
    return [p.detach().clone() for p in parameters], [g["lr"] for g in optimizer.param_groups]


def test_optimizer_and_scheduler_state_round_trip_continues_identically():
    def run(model, optimizer, scheduler, steps, start):
        for step in range(start, start + steps):
            model.zero_grad()
            target = torch.full((3,), float(step))
            ((model(torch.eye(4)[step % 4]) - target) ** 2).sum().backward()
            optimizer.step()
            scheduler.step()

    def fresh(model):
        optimizer = torch.optim.AdamW([{"params": model.weight, "lr": 1e-2},
                                       {"params": model.bias, "lr": 1e-3}], betas=(0.9, 0.98))
        return optimizer, cosine_schedule(optimizer, total_steps=20)

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer, scheduler = fresh(model)
    run(model, optimizer, scheduler, 7, 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, buffer)
    run(model, optimizer, scheduler, 8, 7)

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain values only, as in a checkpoint
    resumed = torch.nn.Linear(4, 3)
    resumed.load_state_dict(state["model"])
    resumed_optimizer, resumed_scheduler = fresh(resumed)
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed_scheduler.load_state_dict(state["scheduler"])
    assert resumed_scheduler.last_epoch == 7
    run(resumed, resumed_optimizer, resumed_scheduler, 8, 7)
    assert torch.equal(resumed.weight, model.weight) and torch.equal(resumed.bias, model.bias)
    assert [g["lr"] for g in resumed_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert resumed_scheduler.last_epoch == scheduler.last_epoch == 15


class NoSyncRecorder(torch.nn.Module):
    """A DDP stand-in: forwards to the model and counts the micro-batches run under no_sync."""

    def __init__(self, module):
        super().__init__()
        self.module, self.no_sync_calls, self.forwards = module, 0, 0

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        self.no_sync_calls += 1
        yield


@pytest.mark.parametrize("clip_norm", [1e6, 0.5])
def test_accumulated_step_equals_the_mean_gradient_of_its_micro_batches(tiny_model, clip_norm):
    model = tiny_model().eval()  # no dropout: the step is compared with a hand-made one
    with torch.no_grad():
        model.alpha.fill_(0.95)  # out of range: the step clamps it before the first forward
    reference = copy.deepcopy(model)
    batch = _batch()

    expected_losses = torch.zeros(3)
    generator = torch.Generator().manual_seed(5)
    for start in (0, 3):  # two micro-batches of 3, each half of the loss; the queue moves in between
        reference.clamp_scalars_()
        out = reference(*(batch[k][start:start + 3] for k in ("images", "input_ids", "attention_mask",
                                                               "image_index")), generator=generator)
        (out["loss"] / 2).backward()
        expected_losses += torch.stack([out["loss"], out["loss_itc"], out["loss_itm"]]).detach() / 2
    named = dict(reference.named_parameters())
    grads = {name: p.grad for name, p in named.items() if p.grad is not None}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    assert 0.5 < norm < 1e6  # clipped to 0.5, not clipped at 1e6
    scale = min(1.0, clip_norm / (norm + 1e-6))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # param -= lr * clipped gradient
    scheduler = cosine_schedule(optimizer, total_steps=10, warmup_ratio=0.0)
    network = NoSyncRecorder(model)
    losses = train_step(network, model, batch, optimizer, scheduler, torch.device("cpu"), micro_batch_size=3,
                        clip_norm=clip_norm, generator=torch.Generator().manual_seed(5))

    assert list(losses) == ["loss", "loss_itc", "loss_itm"] and all(isinstance(v, float) for v in losses.values())
    assert torch.allclose(torch.tensor(list(losses.values())), expected_losses, atol=1e-6)
    assert (network.forwards, network.no_sync_calls) == (2, 1)  # gradients reduced once, at the end
    for name, param in model.named_parameters():
        before = named[name].detach()
        want = before - 0.1 * scale * grads[name] if name in grads else before
        assert torch.allclose(param, want, atol=1e-7), name
    assert model.alpha.grad is None  # zeroed for the next step
    assert scheduler.last_epoch == 1  # stepped once per optimizer step
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.6 / 10)))
    assert model.queue_ptr.tolist() == reference.queue_ptr.tolist() == [6]
    assert torch.equal(model.idx_queue, reference.idx_queue)
    assert torch.allclose(model.text_queue, reference.text_queue, atol=1e-6)


def test_uneven_micro_batches_and_a_non_finite_loss(tiny_model):
    model = tiny_model().eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = cosine_schedule(optimizer, total_steps=10)
    network = NoSyncRecorder(model)
    train_step(network, model, _batch(5), optimizer, scheduler, torch.device("cpu"), micro_batch_size=2)
    assert (network.forwards, network.no_sync_calls, model.queue_ptr.item()) == (3, 2, 5)

    with torch.no_grad():
        model.temp.fill_(float("nan"))
    before = model.itm_head.weight.detach().clone()
    with pytest.raises(NonFiniteLoss):
        train_step(model, model, _batch(4), optimizer, scheduler, torch.device("cpu"), micro_batch_size=2)
    assert torch.equal(model.itm_head.weight, before) and scheduler.last_epoch == 1
    assert all(p.grad is None for p in model.parameters())


def _scores(model):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    input_ids = torch.randint(5, 100, (4, 8), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[2, 4:] = 0
    with torch.no_grad():
        image_feats, image_states = model.encode_images(images)
        text_feats, text_states = model.encode_captions(input_ids, mask)
    return rerank_scores(model, image_feats, image_states, text_feats, text_states, mask, k=2)


def test_released_multisea_file_loads_through_load_model_weights(tiny_model, tmp_path):
    trained = tiny_model(seed=0).eval()
    trained(*(_batch()[k] for k in ("images", "input_ids", "attention_mask", "image_index")),
            generator=torch.Generator().manual_seed(0))  # fills part of the queue
    path = tmp_path / "multisea.ckpt"
    torch.save({"state_dict": to_released_state_dict(trained), "epoch": 12,
                "hyper_parameters": {"config": {"top_k": 64}}}, path)
    fresh = tiny_model(seed=1).eval()
    assert not torch.equal(_scores(fresh)[0], _scores(trained)[0])
    info = load_model_weights(fresh, str(path))
    assert (info["format"], info["epoch"], info["loaded"]) == ("released-multisea", 12, len(trained.state_dict()))
    for got, want in zip(_scores(fresh), _scores(trained)):
        assert torch.equal(got, want)
    assert fresh.queue_ptr.tolist() == [6] and torch.equal(fresh.image_queue, trained.image_queue)

    state = to_released_state_dict(trained)
    state.pop("itm_head.bias")
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": state}, bad)
    with pytest.raises(CheckpointError, match=r"checkpoint=.*bad\.ckpt: .*missing 1 \['itm_head\.bias'\]"):
        load_model_weights(fresh, str(bad))


def test_project_checkpoint_of_a_trained_model_round_trips_with_its_queue(tiny_model, tmp_path):
    model = tiny_model(seed=0)
    optimizer = build_optimizer(model, lr=1e-3)
    scheduler = cosine_schedule(optimizer, total_steps=4)
    for _ in range(2):
        train_step(model, model, _batch(4), optimizer, scheduler, torch.device("cpu"), micro_batch_size=4,
                   generator=torch.Generator().manual_seed(0))
    assert model.queue_ptr.item() == 8 and model.idx_queue[0, 9].item() == -100
    path = save_checkpoint(str(tmp_path / "last.ckpt"), model, optimizer, scheduler, epoch=3)
    fresh = tiny_model(seed=1)
    assert load_model_weights(fresh, path) == {"format": "hat-toolkit", "epoch": 3}
    expected = model.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in fresh.state_dict().items())
    assert fresh.idx_queue[0, :8].tolist() == [0, 0, 1, 2] * 2
