"""Multi-SEA training pieces (spec multisea.md section 4): AdamW over the recipe's groups,
the warm-up + cosine schedule, and one optimizer step over an effective batch cut into
micro-batches (gradient accumulation). The loop itself is in run.py.
"""
from __future__ import annotations

import contextlib
import math
from functools import partial

import torch

from hat.engine import NonFiniteLoss

LOSS_KEYS = ("loss", "loss_itc", "loss_itm")


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


def train_step(network, model, batch: dict, optimizer, scheduler, device, micro_batch_size: int,
               clip_norm: float | None = 1.0, gather=None, generator: torch.Generator | None = None) -> dict:
    """One optimizer step on this rank's effective batch, in micro-batches of
    ``micro_batch_size``; returns {"loss", "loss_itc", "loss_itm"} (floats, batch means).

    ``network`` is what runs the forward (the DDP wrapper, or ``model`` itself); ``model``
    the MultiSEA inside. Each micro-batch's loss is scaled by its share of the batch;
    under DDP the gradients are reduced once, on the last micro-batch. The model writes
    its queue after every micro-batch. Gradients are clipped to ``clip_norm`` (None: not
    clipped), then optimizer and scheduler step. A non-finite loss raises NonFiniteLoss
    before the optimizer steps (the queue already holds that batch)."""
    size = batch["images"].shape[0]
    starts = range(0, size, micro_batch_size)
    hooks = {} if gather is None else {"gather": gather}
    optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(len(LOSS_KEYS), device=device)  # accumulated without host syncs
    for start in starts:
        micro = {key: batch[key][start:start + micro_batch_size].to(device, non_blocking=True)
                 for key in ("images", "input_ids", "attention_mask", "image_index")}
        share = micro["images"].shape[0] / size
        last = start + micro_batch_size >= size
        reduce = contextlib.nullcontext() if last or not hasattr(network, "no_sync") else network.no_sync()
        with reduce:
            model.clamp_scalars_()
            out = network(micro["images"], micro["input_ids"], micro["attention_mask"],
                          micro["image_index"], generator=generator, **hooks)
            (out["loss"] * share).backward()
        totals += torch.stack([out[key].detach().float() for key in LOSS_KEYS]) * share
    values = dict(zip(LOSS_KEYS, totals.tolist()))  # the step's one host sync
    if not math.isfinite(values["loss"]):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(values["loss"])
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return values
