"""Exact accumulation under DDP: two gloo processes, each running two micro-batches of its
half of the batch through hat.loop.optimizer_step(exact=...) as _Fit.train_step calls it
(features gathered with hat.distributed.gather_padded, DDP no_sync before the last
micro-batch), step with the loss and the parameter gradients of the same global batch in
one micro-batch on one process. Float64 on the CPU, rtol 1e-5."""
import os
import socket

import pytest
import torch

from hat.models.hat.plugin import HATPlugin

CPU = torch.device("cpu")
GLOBAL, WORLD, MICRO = 8, 2, 2  # 8 pairs: 2 processes x 4 pairs, 2 micro-batches of 2 each
CASES = {"plain": {"same_image_mask": False}, "same_image_mask": {"same_image_mask": True}}


def plugin_of(case):
    return HATPlugin({"margin": 0.2, "vse_warmup_epochs": 0, **CASES[case]})


def tiny_hat():
    """A tiny random Swin + the packaged MiniLM, every parameter trained, in float64."""
    from hat.models.hat.model import build_hat

    torch.manual_seed(0)
    model = build_hat("swin_base_patch4_window7_224", "packaged-minilm", [[2, 2], [3, 4], [4, 6]], embed_dim=32,
                      image_size=64, image_pretrained=False, text_dropout=0.0,
                      image_backbone_kwargs=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                                 window_size=4, drop_path_rate=0.0))
    model.set_backbones_trainable(image=True, text=True)
    return model.double().train()


def global_batch():
    """8 pairs, captions of different lengths; images 0/1 and 4/5 (pairs on different
    micro-batches and ranks) shared, for same_image_mask."""
    generator = torch.Generator().manual_seed(4)
    lengths = torch.tensor([9, 4, 7, 9, 3, 6, 8, 5])
    return {"images": torch.randn(GLOBAL, 3, 64, 64, generator=generator, dtype=torch.float64),
            "input_ids": torch.randint(1000, 2000, (GLOBAL, 9), generator=generator),
            "attention_mask": (torch.arange(9)[None] < lengths[:, None]).long(),
            "image_index": torch.tensor([0, 1, 2, 1, 3, 4, 5, 3])}


def rank_batch(rank):
    """This rank's contiguous share, padded to its own longest caption (as the collate pads)."""
    share = GLOBAL // WORLD
    local = {key: value[rank * share:(rank + 1) * share] for key, value in global_batch().items()}
    longest = int(local["attention_mask"].sum(1).max())
    local["input_ids"], local["attention_mask"] = local["input_ids"][:, :longest], local["attention_mask"][:, :longest]
    return local


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it stepped with (the loop zeroes them after)."""

    def step(self, closure=None):
        self.seen = {id(p): p.grad.detach().clone() for group in self.param_groups for p in group["params"]
                     if p.grad is not None}
        return super().step(closure)


def _worker(rank, world_size, port, out_dir):
    import torch.distributed as dist

    from hat.distributed import gather_padded
    from hat.loop import optimizer_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    results = {}
    for case in CASES:
        plugin, model, epoch, gather = plugin_of(case), tiny_hat(), 1, gather_padded
        network = torch.nn.parallel.DistributedDataParallel(model)  # as hat/loop.py wraps it
        optimizer = RecordingSGD(model.parameters(), lr=0.1)
        exact = (lambda net, micro: plugin.encode_batch(net, model, micro),  # as _Fit.train_step builds it
                 lambda features, micros: plugin.loss_from_features(model, features, micros, epoch, gather))
        values, skipped = optimizer_step(network, lambda net, micro: plugin.loss(net, model, micro, epoch, gather),
                                         rank_batch(rank), optimizer, CPU, MICRO, exact=exact)
        results[case] = {"loss": values["loss"], "skipped": skipped,
                         "grads": {name: optimizer.seen.get(id(p)) for name, p in model.named_parameters()}}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def one_micro_batch(case):
    """The reference: the global batch as one micro-batch on one process (HAT's forward, VSE++)."""
    model = tiny_hat()
    loss = plugin_of(case).loss(model, model, global_batch(), 1)["loss"]
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("exact_ddp")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(WORLD, port, str(out_dir)), nprocs=WORLD)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_two_micro_batches_equal_one_micro_batch(ranks, case):
    loss, expected = one_micro_batch(case)
    trained = [name for name, grad in expected.items() if grad is not None]
    assert len(trained) > 10
    for rank, results in enumerate(ranks):
        got = results[case]
        assert not got["skipped"]
        assert got["loss"] == pytest.approx(loss, rel=1e-5), rank
        assert got["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            assert (got["grads"][name] is None) == (grad is None), (rank, name)
            if grad is not None:
                torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-10, msg=f"rank {rank}: {name}")
