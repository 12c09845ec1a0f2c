"""One training epoch of HAT; the rest of the loop lives in run.py."""
from __future__ import annotations

import contextlib
import math

import torch
from tqdm import tqdm

from hat.loss import vse_loss


def train_one_epoch(model, loader, optimizer, device, epoch: int, margin: float,
                    hardest_negative: bool, same_image_mask: bool = False, scaler=None,
                    amp_dtype=None, progress: bool = True) -> float:
    """Train for one pass over ``loader``; returns the mean batch loss."""
    model.train()
    total, steps = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, mininterval=5)
    for batch in bar:
        images = batch["images"].to(device, non_blocking=True)
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        attention_mask = batch["attention_mask"].to(device, non_blocking=True)
        positive_mask = None
        if same_image_mask:
            index = batch["image_index"].to(device)
            positive_mask = index[:, None] == index[None, :]
        autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype)
                    if amp_dtype is not None else contextlib.nullcontext())
        with autocast:
            scores = model(images, input_ids, attention_mask)  # [B, B]
        loss = vse_loss(scores.float(), margin, hardest_negative, positive_mask)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch}, step {steps}")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total += loss.item()
        steps += 1
        bar.set_postfix(loss=f"{total / steps:.3f}", refresh=False)
    return total / max(steps, 1)
