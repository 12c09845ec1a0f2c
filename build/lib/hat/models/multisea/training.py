"""Multi-SEA's optimizer and schedule: AdamW over the recipe's four parameter groups, and
the linear warm-up + cosine schedule stepped once per optimizer step. The loop itself
(accumulation, clipping, stepping) is `hat.loop`.
"""
from __future__ import annotations

import math
from functools import partial

import torch


def build_optimizer(model, lr: float = 1e-5, encoder_lr: float = 1e-6, alpha_lr: float = 1e-4,
                    temp_lr: float = 5e-4, weight_decay: float = 0.05, betas=(0.9, 0.98),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``model.parameter_groups``: fusion/projections/heads at ``lr``, the
    backbones at ``encoder_lr``, alpha and tau at their own rates; weight decay on all."""
    groups = model.parameter_groups(lr=lr, encoder_lr=encoder_lr, alpha_lr=alpha_lr, temp_lr=temp_lr,
                                    weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, num_cycles: float) -> float:
    """The learning-rate factor after ``step`` optimizer steps: linear from 0 to 1 over
    ``warmup_steps``, then 0.5 * (1 + cos(2 pi num_cycles progress)), progress 0 -> 1 over
    the remaining steps (num_cycles 0.3 ends at 0.5 * (1 + cos(0.6 pi)) = 0.345)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress)))


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float = 0.15,
                    num_cycles: float = 0.3) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up over ceil(warmup_ratio * total_steps) steps, then the cosine; step it once
    per optimizer step. The factor is a module-level function bound by functools.partial:
    the scheduler's state_dict is plain values and a resume continues exactly (the step
    count comes from the state; warm-up and total from the arguments given here)."""
    warmup_steps = math.ceil(warmup_ratio * total_steps - 1e-9)
    factor = partial(warmup_cosine_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                     num_cycles=num_cycles)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
