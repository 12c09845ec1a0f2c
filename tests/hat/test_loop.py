"""The one optimizer step of the training loop (hat.loop.optimizer_step): gradient
accumulation, clipping, mixed precision, for any model's loss."""
import copy

import pytest
import torch

from hat.loop import NonFiniteLoss, optimizer_step
from tests.toy_model import ToyDualEncoder, toy_loss

CPU = torch.device("cpu")


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it stepped with."""

    def step(self, closure=None):
        self.seen = {id(p): p.grad.detach().clone() for group in self.param_groups for p in group["params"]
                     if p.grad is not None}
        return super().step(closure)


def toy_batch(size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 50, (size, 6), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::3, 4:] = 0
    return {"images": torch.randn(size, 3, 16, 16, generator=generator), "input_ids": input_ids,
            "attention_mask": attention_mask, "image_index": torch.arange(size)}


def toy_step(model, batch, micro_batch_size, clip_norm=None, kind="pairwise", amp_dtype=None):
    optimizer = RecordingSGD(model.parameters(), lr=0.1)

    def compute(network, micro):
        return {"loss": toy_loss(network(micro["images"], micro["input_ids"], micro["attention_mask"]), kind, 0.1)}

    values, skipped = optimizer_step(model, compute, batch, optimizer, CPU, micro_batch_size, amp_dtype=amp_dtype,
                                     clip_norm=clip_norm, parameters=model.parameters())
    return values, [optimizer.seen[id(p)] for p in model.parameters()], skipped


def literal_gradients(model, batch, kind="pairwise"):
    """The gradient of the loss on the whole batch, by hand."""
    model = copy.deepcopy(model)
    toy_loss(model(batch["images"], batch["input_ids"], batch["attention_mask"]), kind, 0.1).backward()
    return [p.grad for p in model.parameters()]


def test_accumulated_micro_batches_give_the_whole_batch_gradient():
    torch.manual_seed(0)
    model = ToyDualEncoder(vocab_size=50, dim=8)
    batch = toy_batch()
    expected = literal_gradients(model, batch)
    for micro in (8, 4, 3):  # one batch, two halves, uneven thirds (3 + 3 + 2)
        values, grads, _ = toy_step(copy.deepcopy(model), batch, micro)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    whole = toy_loss(model(batch["images"], batch["input_ids"], batch["attention_mask"]), "pairwise", 0.1)
    assert values["loss"] == pytest.approx(whole.item(), rel=1e-6)


def test_clipping_caps_the_gradient_norm_and_keeps_its_direction():
    torch.manual_seed(1)
    model = ToyDualEncoder(vocab_size=50, dim=8)
    batch = toy_batch(seed=1)
    expected = literal_gradients(model, batch, "infonce")
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected]))
    assert norm > 0.05
    _, grads, _ = toy_step(copy.deepcopy(model), batch, 8, clip_norm=0.05, kind="infonce")
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert clipped == pytest.approx(0.05, rel=1e-4)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want * (0.05 / (norm + 1e-6)), rtol=1e-4, atol=1e-9)
    _, unclipped, _ = toy_step(copy.deepcopy(model), batch, 8, clip_norm=1e6, kind="infonce")
    for got, want in zip(unclipped, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_non_finite_loss_stops_before_the_optimizer_steps():
    model = ToyDualEncoder(vocab_size=50, dim=8)
    batch = toy_batch()
    batch["images"][2] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLoss):
        toy_step(model, batch, 4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_hat_step_with_accumulation_and_clipping():
    """HAT's loss (hardest negative per micro-batch) through the loop: two micro-batches
    give the mean of the two micro-batch gradients, clipped to clip_norm."""
    from hat.models.hat.loss import vse_loss
    from hat.models.hat.plugin import HATPlugin
    from hat.models.hat.model import build_hat

    torch.manual_seed(0)
    model = build_hat("swin_base_patch4_window7_224", "packaged-minilm", [[2, 2], [3, 4], [4, 6]], embed_dim=32,
                      image_size=64, image_pretrained=False, text_dropout=0.0,
                      image_backbone_kwargs=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                                 window_size=4, drop_path_rate=0.0))
    model.set_backbones_trainable(image=True, text=False)
    generator = torch.Generator().manual_seed(4)
    batch = {"images": torch.randn(8, 3, 64, 64, generator=generator),
             "input_ids": torch.randint(1000, 2000, (8, 7), generator=generator),
             "attention_mask": torch.ones(8, 7, dtype=torch.long), "image_index": torch.arange(8)}
    batch["attention_mask"][1::2, 5:] = 0
    reference = copy.deepcopy(model)
    for start in (0, 4):
        scores = reference(batch["images"][start:start + 4], batch["input_ids"][start:start + 4],
                           batch["attention_mask"][start:start + 4])
        (vse_loss(scores, 0.2, True) / 2).backward()
    expected = [p.grad if p.grad is not None else torch.zeros_like(p) for p in reference.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected]))
    clip = float(norm) / 3

    plugin = HATPlugin({"margin": 0.2, "vse_warmup_epochs": 0, "same_image_mask": False})
    optimizer = RecordingSGD(model.parameters(), lr=0.1)
    values, skipped = optimizer_step(model, lambda net, micro: plugin.loss(net, model, micro, epoch=1), batch,
                                     optimizer, CPU, 4, clip_norm=clip, parameters=model.parameters())
    assert not skipped and set(values) == {"loss"}
    for param, want in zip(model.parameters(), expected):
        got = optimizer.seen.get(id(param), torch.zeros_like(param))
        torch.testing.assert_close(got, want * (clip / (norm + 1e-6)), rtol=1e-4, atol=1e-7)


def test_multisea_step_under_bf16_autocast_on_cpu():
    """The loop's autocast path (bf16 on CUDA is the same code) with Multi-SEA's loss."""
    from hat.models.multisea.model import build_multisea
    from hat.models.multisea.plugin import MultiSEAPlugin
    from hat.models.multisea.training import build_optimizer

    torch.manual_seed(0)
    model = build_multisea("vit_base_patch16_clip_quickgelu_224", "packaged-minilm", vision_depth=2,
                           image_size=32, image_pretrained=False, text_pretrained=False,
                           image_backbone_kwargs={"patch_size": 16, "embed_dim": 32, "num_heads": 2},
                           frozen_vision_blocks=0, freeze_vision_stem=False, embed_dim=32, num_layers=1,
                           num_heads=2, mlp_ratio=2, dropout=0.0, num_agents=4, queue_size=16, itm_layers=[1])
    generator = torch.Generator().manual_seed(3)
    batch = {"images": torch.randn(6, 3, 32, 32, generator=generator),
             "input_ids": torch.randint(5, 100, (6, 8), generator=generator),
             "attention_mask": torch.ones(6, 8, dtype=torch.long), "image_index": torch.arange(6)}
    plugin = MultiSEAPlugin({})
    optimizer = build_optimizer(model, lr=1e-3, encoder_lr=1e-3)
    before = model.itm_head.weight.detach().clone()
    values, skipped = optimizer_step(model, lambda net, micro: plugin.loss(net, model, micro, 0), batch, optimizer,
                                     CPU, 3, amp_dtype=torch.bfloat16, clip_norm=1.0, parameters=model.parameters())
    assert not skipped and list(values) == ["loss", "loss_itc", "loss_itm"]
    assert all(torch.isfinite(torch.tensor(v)) for v in values.values())
    assert not torch.equal(model.itm_head.weight, before)  # the step moved the weights
    assert model.itm_head.weight.dtype == torch.float32  # autocast leaves the parameters in fp32
    assert model.queue_ptr.item() == 6  # both micro-batches went through the queue


def test_fp16_with_grad_scaler_unscales_before_clipping_and_skips_overflow():
    """The fp16 path (GradScaler; on CPU here, the same code on CUDA): the clipped gradient
    is the unscaled one's, and a step whose gradients overflow is skipped, not applied."""
    torch.manual_seed(2)
    model = ToyDualEncoder(vocab_size=50, dim=8)
    batch = toy_batch(seed=2)
    expected = literal_gradients(model, batch, "infonce")
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected]))

    def compute(network, micro):
        return {"loss": toy_loss(network(micro["images"], micro["input_ids"], micro["attention_mask"]).float(),
                                 "infonce", 0.1)}

    scaled = copy.deepcopy(model)
    optimizer = RecordingSGD(scaled.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    _, skipped = optimizer_step(scaled, compute, batch, optimizer, CPU, 8, amp_dtype=torch.float16, scaler=scaler,
                                clip_norm=float(norm) / 2, parameters=scaled.parameters())
    assert not skipped
    for param, want in zip(scaled.parameters(), expected):  # fp16 matmuls: a looser tolerance
        torch.testing.assert_close(optimizer.seen[id(param)], want / 2, rtol=2e-2, atol=2e-3)

    before = [p.detach().clone() for p in scaled.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # overflows the fp16 gradients
    _, skipped = optimizer_step(scaled, compute, batch, torch.optim.SGD(scaled.parameters(), lr=0.1), CPU, 4,
                                amp_dtype=torch.float16, scaler=scaler, parameters=scaled.parameters())
    assert skipped and all(torch.equal(a, b) for a, b in zip(before, scaled.parameters()))
