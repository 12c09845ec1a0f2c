"""torch.distributed glue for torchrun: process group, rank, and a feature gather that
keeps gradients (so every rank scores the whole global batch)."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by torchrun; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device_type: str) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA)."""
    _, world_size, local_rank = world()
    if world_size > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def is_main_process() -> bool:
    return world()[0] == 0


@contextlib.contextmanager
def quiet_unless_main():
    """Under torchrun, the standard output of ranks other than 0 goes nowhere inside the
    block (every rank runs the same code: each line would print once per process);
    their standard error (warnings, errors) stays."""
    if is_main_process():
        yield
        return
    with open(os.devnull, "w") as nowhere, contextlib.redirect_stdout(nowhere):
        yield


def active_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pad_dim_to(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad ``tensor`` at the end of ``dim`` to ``size``."""
    missing = size - tensor.shape[dim]
    if missing <= 0:
        return tensor
    return F.pad(tensor, [0, 0] * (tensor.dim() - dim - 1) + [0, missing])


def gather_padded(tensor: torch.Tensor, pad_dim: int | None = None, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, with autograd: the gradient of each
    rank's piece is summed over ranks. ``pad_dim``: a dim whose size may differ between
    ranks (caption length); it is zero-padded to the largest first. ``sizes``: every
    rank's dim-0 size, where they differ (a global batch that does not divide by the world
    size: `datamodules.sampler.rank_shares`); None: all equal."""
    if active_world()[1] == 1:
        return tensor
    if pad_dim is not None:
        size = torch.tensor([tensor.shape[pad_dim]], device=tensor.device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX)
        tensor = pad_dim_to(tensor, pad_dim, int(size.item()))
    import torch.distributed.nn.functional as dist_fn

    if sizes is None or len(set(sizes)) == 1:
        return torch.cat(dist_fn.all_gather(tensor), dim=0)
    pieces = dist_fn.all_gather(pad_dim_to(tensor, 0, max(sizes)))
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)], dim=0)


def _share(total: int, world_size: int) -> int:
    return -(-total // world_size)  # ceil(total / world_size)


def shard_range(total: int) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of ``total`` items: ranks hold
    ceil(total / world_size) items each, the last ones fewer (possibly none)."""
    rank, world_size = active_world()
    start = min(rank * _share(total, world_size), total)
    return start, min(start + _share(total, world_size), total)


def gather_shards(tensor: torch.Tensor, total: int, pad_dim: int | None = None) -> torch.Tensor:
    """Inverse of `shard_range`: every rank passes the rows it computed for its share
    (extra rows beyond the share, e.g. a placeholder on an empty share, are ignored) and
    gets all ``total`` rows in order. ``pad_dim`` as in `gather_padded`."""
    world_size = active_world()[1]
    if world_size == 1:
        return tensor[:total]
    start, stop = shard_range(total)
    return gather_padded(pad_dim_to(tensor[:stop - start], 0, _share(total, world_size)), pad_dim)[:total]


def broadcast_from_main(value):
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if active_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active_world()[1] > 1:
        dist.barrier()
