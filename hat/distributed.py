"""torch.distributed glue for torchrun: process group, rank, and a feature gather that
keeps gradients (so every rank scores the whole global batch)."""
from __future__ import annotations

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


def gather_padded(tensor: torch.Tensor, pad_dim: int | None = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, with autograd: the gradient of each
    rank's piece is summed over ranks. ``pad_dim``: a dim whose size may differ between
    ranks (caption length); it is zero-padded to the largest first."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    if pad_dim is not None:
        size = torch.tensor([tensor.shape[pad_dim]], device=tensor.device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX)
        missing = int(size.item()) - tensor.shape[pad_dim]
        if missing:
            pad = [0, 0] * (tensor.dim() - pad_dim - 1) + [0, missing]
            tensor = F.pad(tensor, pad)
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(tensor), dim=0)


def broadcast_from_main(value):
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
