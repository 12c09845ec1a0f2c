"""Training batch order that is reproducible, resumable mid-epoch and independent of
the number of processes.

The order of an epoch is a permutation drawn from a generator seeded with (seed, epoch);
it is cut into global batches of ``batch_size`` (the last partial batch is dropped).
Process ``rank`` of ``world_size`` takes its contiguous slice of every global batch, so
the union over ranks is the single-process batch; a batch that does not divide by the
world size gives the first ``batch_size % world_size`` ranks one pair more (`rank_shares`:
58 on 4 processes is 15 + 15 + 14 + 14). ``start_batch`` skips the batches an
interrupted run already trained on. With ``with_epoch`` the items are (epoch, index)
pairs: a dataset whose item depends on the epoch (one random caption per image) then
gets the epoch from the sampler, which lives in the main process, also when the items
are read in worker processes.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


def rank_shares(batch_size: int, world_size: int) -> list[int]:
    """How many pairs of a global batch each rank takes, in rank order."""
    return [batch_size // world_size + (rank < batch_size % world_size) for rank in range(world_size)]


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, with_epoch: bool = False):
        if batch_size < world_size:
            raise ValueError(f"batch size {batch_size} leaves a process of the {world_size} without pairs")
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
        shares = rank_shares(self.batch_size, self.world_size)
        offset, local = sum(shares[:self.rank]), shares[self.rank]
        for batch in range(self.start_batch, self.num_items // self.batch_size):
            start = batch * self.batch_size + offset
            items = order[start:start + local]
            yield [(self.epoch, index) for index in items] if self.with_epoch else items
