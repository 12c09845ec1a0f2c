"""Training batch order that is reproducible, resumable mid-epoch and independent of
the number of processes.

The order of an epoch is a permutation drawn from a generator seeded with (seed, epoch);
it is cut into global batches of ``batch_size`` (the last partial batch is dropped).
Process ``rank`` of ``world_size`` takes its contiguous slice of every global batch, so
the union over ranks is the single-process batch. ``start_batch`` skips the batches an
interrupted run already trained on. With ``with_epoch`` the items are (epoch, index)
pairs: a dataset whose item depends on the epoch (one random caption per image) then
gets the epoch from the sampler, which lives in the main process, also when the items
are read in worker processes.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, with_epoch: bool = False):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by world size {world_size}")
        if num_items < batch_size:
            raise ValueError(f"{num_items} training items cannot fill one batch of {batch_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.with_epoch = rank, world_size, with_epoch
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.num_items // self.batch_size - self.start_batch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        local = self.batch_size // self.world_size
        for batch in range(self.start_batch, self.num_items // self.batch_size):
            start = batch * self.batch_size + self.rank * local
            items = order[start:start + local]
            yield [(self.epoch, index) for index in items] if self.with_epoch else items
