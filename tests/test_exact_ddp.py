"""Exact accumulation under DDP: two gloo processes, each running micro-batches of 2 pairs
of its share of the batch through hat.loop.optimizer_step(exact=...) as _Fit.train_step
calls it (features gathered with hat.distributed.gather_padded, every pass in no_sync and
the gradients averaged once at the end), step with the loss and the parameter gradients
of the same global batch in one micro-batch on one process (HAT: 8 pairs as 4 + 4, and 7
as 4 + 3), and (Multi-SEA, whose loss uses the ITM fusion outside DDP's forward) with
those of DDP's own step over each process's share in one micro-batch. Float64 on the
CPU, rtol 1e-5."""
import os
import socket

import pytest
import torch

from hat.models.hat.plugin import HATPlugin

CPU = torch.device("cpu")
WORLD, MICRO = 2, 2  # 2 processes, micro-batches of 2 pairs
CASES = {"plain": ({"same_image_mask": False}, 8), "same_image_mask": ({"same_image_mask": True}, 8),
         "uneven": ({"same_image_mask": True}, 7)}  # case: (HAT keys, global batch)


def plugin_of(case):
    return HATPlugin({"margin": 0.2, "vse_warmup_epochs": 0, **CASES[case][0]})


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


def global_batch(size=8):
    """The first ``size`` of 8 pairs, captions of different lengths; images 0/1 and 4/5
    (pairs on different micro-batches and ranks) shared, for same_image_mask."""
    generator = torch.Generator().manual_seed(4)
    lengths = torch.tensor([9, 4, 7, 9, 3, 6, 8, 5])
    batch = {"images": torch.randn(8, 3, 64, 64, generator=generator, dtype=torch.float64),
             "input_ids": torch.randint(1000, 2000, (8, 9), generator=generator),
             "attention_mask": (torch.arange(9)[None] < lengths[:, None]).long(),
             "image_index": torch.tensor([0, 1, 2, 1, 3, 4, 5, 3])}
    return {key: value[:size] for key, value in batch.items()}


def rank_batch(rank, batch, pad=True):
    """This rank's contiguous share (as GlobalBatchSampler cuts it), padded to its own longest
    caption (as the collate pads)."""
    from datamodules.sampler import rank_shares

    shares = rank_shares(next(iter(batch.values())).shape[0], WORLD)
    start = sum(shares[:rank])
    local = {key: value[start:start + shares[rank]] for key, value in batch.items()}
    if not pad:
        return local
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
    import functools

    import torch.distributed as dist

    from datamodules.sampler import rank_shares
    from hat.distributed import gather_padded
    from hat.loop import optimizer_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    results = {}
    for case, (_, size) in CASES.items():
        plugin, model, epoch = plugin_of(case), tiny_hat(), 1
        shares = rank_shares(size, world_size)  # as _Fit builds its gather
        gather = gather_padded if len(set(shares)) == 1 else functools.partial(gather_padded, sizes=shares)
        network = torch.nn.parallel.DistributedDataParallel(model)  # as hat/loop.py wraps it
        optimizer = RecordingSGD(model.parameters(), lr=0.1)
        exact = (lambda net, micro, first: plugin.encode_batch(net, model, micro, first),  # as _Fit.train_step
                 lambda features, micros: plugin.loss_from_features(model, features, micros, epoch, gather))
        values, skipped = optimizer_step(network, lambda net, micro: plugin.loss(net, model, micro, epoch, gather),
                                         rank_batch(rank, global_batch(size)), optimizer, CPU, MICRO, exact=exact)
        results[case] = {"loss": values["loss"], "skipped": skipped,
                         "grads": {name: optimizer.seen.get(id(p)) for name, p in model.named_parameters()}}
    results["multisea"] = multisea_steps(rank, gather_padded)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def multisea_steps(rank, gather):
    """Multi-SEA's step of this rank's 6 of 12 pairs: DDP's own (one micro-batch), and exact
    over micro-batches of 2 -> {mode: (losses, gradients, queue)}."""
    from tests.hat.models.multisea.test_multisea_exact import QUEUE, pair_batch, plugin, tiny_multisea

    from hat.loop import optimizer_step

    out = {}
    for mode, micro in (("ddp", 6), ("exact", MICRO)):
        model, p = tiny_multisea(queue_size=32), plugin(seed=5 + rank)
        network = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = RecordingSGD(model.parameters(), lr=0.0)
        exact = (lambda net, m, first: p.encode_batch(net, model, m, first),
                 lambda features, micros: p.loss_from_features(model, features, micros, 0, gather))
        values, _ = optimizer_step(network, lambda net, m: p.loss(net, model, m, 0, gather),
                                   rank_batch(rank, pair_batch(), pad=False), optimizer, CPU, micro, exact=exact)
        out[mode] = (values, {name: optimizer.seen.get(id(param)) for name, param in model.named_parameters()},
                     {name: getattr(model, name).clone() for name in QUEUE})
    return out


def one_micro_batch(case):
    """The reference: the global batch as one micro-batch on one process (HAT's forward, VSE++)."""
    model = tiny_hat()
    loss = plugin_of(case).loss(model, model, global_batch(CASES[case][1]), 1)["loss"]
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


def test_multisea_exact_under_ddp_is_ddps_own_step(ranks):
    """The ITM fusion's and tau's gradients come from the loss outside DDP's forward: averaged
    by the loop, they equal DDP's reduction of the one-micro-batch step, on both ranks."""
    for rank, results in enumerate(ranks):
        (want, want_grads, want_queue), (got, got_grads, got_queue) = (results["multisea"][mode]
                                                                       for mode in ("ddp", "exact"))
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=1e-5), (rank, name)
        assert {"temp", "itm_head.weight"} <= {name for name, grad in want_grads.items() if grad is not None}
        for name, grad in want_grads.items():
            assert (got_grads[name] is None) == (grad is None), (rank, name)
            if grad is not None:
                torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-10, msg=f"rank {rank}: {name}")
        for name in want_queue:
            torch.testing.assert_close(got_queue[name], want_queue[name], rtol=1e-5, atol=1e-10, msg=name)
    torch.testing.assert_close(ranks[0]["multisea"]["exact"][1]["itm_head.weight"],
                               ranks[1]["multisea"]["exact"][1]["itm_head.weight"])
