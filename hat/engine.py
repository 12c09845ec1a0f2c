"""Training steps and the state an exact resume needs; the loop itself is in run.py."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from hat.loss import vse_loss


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite."""


def train_step(model, batch, optimizer, device, margin: float, hardest_negative: bool,
               same_image_mask: bool = False, scaler=None, amp_dtype=None,
               gather=None) -> tuple[float, bool]:
    """One optimisation step on a batch. Returns (loss, skipped): ``skipped`` is True when
    fp16 GradScaler dropped the step because of inf/NaN gradients. ``gather`` (DDP)
    collects the features of every process: the loss then covers the global batch."""
    images = batch["images"].to(device, non_blocking=True)
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    attention_mask = batch["attention_mask"].to(device, non_blocking=True)
    positive_mask = None
    if same_image_mask:
        index = batch["image_index"].to(device)
        index = gather(index) if gather is not None else index
        positive_mask = index[:, None] == index[None, :]
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype)
                if amp_dtype is not None else contextlib.nullcontext())
    with autocast:
        scores = model(images, input_ids, attention_mask, gather=gather)  # [B, B]
    loss = vse_loss(scores.float(), margin, hardest_negative, positive_mask)
    value = loss.item()
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # fp16: GradScaler skips steps with inf/NaN gradients
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return value, scaler.get_scale() < scale
    if not np.isfinite(value):
        raise NonFiniteLoss(value)
    loss.backward()
    optimizer.step()
    return value, False


def rng_state() -> dict:
    """Every random generator the training touches, as checkpoint-safe values."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
