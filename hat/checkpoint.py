"""The project's own checkpoints: plain dicts readable without Sacred.

    {"format": "hat-toolkit", "version": 1, "model": state_dict, "optimizer": ...,
     "scheduler": ..., "epoch": int, "config": dict, "metrics": dict}

Written atomically (temporary file, fsync, rename); read with ``weights_only=True``.
"""
from __future__ import annotations

import json
import os

import torch

FORMAT = "hat-toolkit"
VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the model."""


def save_checkpoint(path: str, model, optimizer=None, scheduler=None, epoch: int = -1,
                    config: dict | None = None, metrics: dict | None = None) -> str:
    state = {
        "format": FORMAT, "version": VERSION, "epoch": int(epoch),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        # plain JSON types only, so that weights_only loading accepts them
        "config": json.loads(json.dumps(config or {})),
        "metrics": json.loads(json.dumps(metrics or {})),
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp_path, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return path


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a project checkpoint (no code is executed while unpickling)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint={path} does not exist; pass the path of a .ckpt file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated file, foreign pickle, not a torch file
        raise CheckpointError(f"checkpoint={path} cannot be read safely ({error.__class__.__name__}: "
                              f"{str(error).splitlines()[0][:200]})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint={path} is not a {FORMAT} checkpoint")
    return state


def load_model_weights(model, path: str) -> dict:
    """Load a project checkpoint's weights into ``model`` (strict); returns the checkpoint."""
    state = load_checkpoint(path)
    try:
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
    except RuntimeError as error:  # shape mismatch
        raise CheckpointError(f"checkpoint={path} does not fit the configured model "
                              f"({str(error).splitlines()[-1].strip()[:300]})") from error
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint={path} does not fit the configured model: missing {list(missing)[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {list(unexpected)[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}; use the config the checkpoint was trained with"
        )
    return state
