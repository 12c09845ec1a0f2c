"""Checkpoints: the project's own, and the authors' released Lightning files (each model
plug-in recognises and maps its own).

The project's checkpoint is a plain dict, readable without Sacred:

    {"format": "hat-toolkit", "version": 1, "model": state_dict, "optimizer": ...,
     "scheduler": ..., "epoch": int, "config": dict, "metrics": dict}

Files are written atomically (temporary file, fsync, rename) and read with
``torch.load(weights_only=True)``: nothing in a checkpoint can execute code. Lightning
checkpoints may hold a few container classes (Lightning's AttributeDict, Sacred's
read-only dict/list); those, and only those, are read back as plain dicts and lists.
"""
from __future__ import annotations

import json
import os
import pickle

import torch

from datamodules.atomic import atomic_file
from hat.plugins import plugins

FORMAT = "hat-toolkit"
VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the model."""


def _container(name: str, factory):
    """A class registered under ``name`` whose instances unpickle as ``factory()``."""
    return type(name.rsplit(".", 1)[1], (), {"__new__": staticmethod(lambda cls, *a, **k: factory())})


# containers that Lightning and Sacred put in checkpoints, read back as plain dicts/lists
_DICT_NAMES = (
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "sacred.config.custom_containers.ReadOnlyDict",
)
PLAIN_CONTAINERS = {name: _container(name, dict) for name in _DICT_NAMES}
PLAIN_CONTAINERS["sacred.config.custom_containers.ReadOnlyList"] = _container(
    "sacred.config.custom_containers.ReadOnlyList", list)


def describe_error(error: BaseException, limit: int = 200) -> str:
    """``Class: first line of the message`` (the class alone for an empty message)."""
    lines = str(error).strip().splitlines()
    return f"{error.__class__.__name__}: {lines[0].strip()[:limit]}" if lines else error.__class__.__name__


def read_checkpoint_file(path: str, map_location="cpu") -> dict:
    """torch.load with weights_only=True; refuses files whose unpickling would run code."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint={path} is a directory; pass the path of a .ckpt file in it")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint={path} does not exist; pass the path of a .ckpt file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint={path} is empty (0 bytes): its write never completed; "
                              f"use another checkpoint (e.g. best.ckpt or an earlier run's last.ckpt)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as error:  # truncated file, not a torch file
        raise CheckpointError(f"checkpoint={path} cannot be read ({describe_error(error)}); "
                              f"is the file complete?") from error
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as error:
        raise CheckpointError(f"checkpoint={path} cannot be read ({describe_error(error)}); "
                              f"is the file complete?") from error
    foreign = [name for name in names if name not in PLAIN_CONTAINERS]
    if foreign:
        raise CheckpointError(
            f"checkpoint={path} refers to code ({', '.join(foreign[:5])}) that would run on "
            f"loading; refused. Load only checkpoints from sources you trust, re-saved as plain tensors"
        )
    with torch.serialization.safe_globals([(PLAIN_CONTAINERS[n], n) for n in names]):
        return torch.load(path, map_location=map_location, weights_only=True)


def save_checkpoint(path: str, model, optimizer=None, scheduler=None, epoch: int = -1,
                    config: dict | None = None, metrics: dict | None = None, **training_state) -> str:
    """Write a checkpoint atomically. ``training_state`` holds what an exact resume needs
    (step within the epoch, GradScaler, RNG states, best score, ...): tensors and plain
    Python values only."""
    state = {
        **training_state,
        "format": FORMAT, "version": VERSION, "epoch": int(epoch),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        # plain JSON types only, so that weights_only loading accepts them
        "config": json.loads(json.dumps(config or {})),
        "metrics": json.loads(json.dumps(metrics or {})),
    }
    try:
        return atomic_save(state, path)
    except (OSError, RuntimeError) as error:  # disk full, quota, file size limit, read-only
        raise CheckpointError(
            f"could not write checkpoint {path} ({describe_error(error, 120)}); the file there before "
            f"(if any) is unchanged: free disk space there or set checkpoint_dir=/a/folder/with/space"
        ) from error


def link_checkpoint(source: str, path: str) -> bool:
    """Make ``path`` a second name of the checkpoint file ``source`` (a hard link, put in
    place atomically: ``path`` is the old file or the new name, never half of either).
    Every later write of either name replaces its file, so the other keeps its contents.
    False where the file system has no hard links (the caller writes the file instead)."""
    temporary = f"{path}.tmp-link-{os.getpid()}"
    try:
        os.link(source, temporary)
        os.replace(temporary, path)
        return True
    except OSError:
        if os.path.lexists(temporary):
            os.remove(temporary)
        return False


def atomic_save(state, path: str) -> str:
    """torch.save ``state`` to ``path`` atomically (`datamodules.atomic.atomic_file`): a
    failed or interrupted write leaves ``path`` as it was and no temporary file."""
    with atomic_file(path) as handle:
        torch.save(state, handle)
    return path


def recorded_config(path: str) -> dict | None:
    """The configuration a project checkpoint records, read without loading its tensors
    (memory-mapped); None for a released file, or a file that cannot be read this way
    (loading it later says what is wrong)."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return None
    if isinstance(state, dict) and state.get("format") == FORMAT:
        config = state.get("config") or {}
        if not isinstance(config, dict):
            raise CheckpointError(f"checkpoint={path} is a {FORMAT} checkpoint whose 'config' is a "
                                  f"{type(config).__name__}, not a dict: the file was not written by this "
                                  f"toolkit's save_checkpoint; use a checkpoint a run wrote")
        return dict(config)
    return None


def check_project_layout(state: dict, path: str) -> dict:
    """``state`` (a project checkpoint's contents) if its ``model`` is a state dict and its
    ``config`` a dict; else a one-line CheckpointError (a dict edited or assembled by hand)."""
    for key, kind in (("model", "a state dict of tensors"), ("config", "a dict")):
        value = state.get(key, {} if key == "config" else None)
        if not isinstance(value, dict) or (key == "model" and not all(
                isinstance(tensor, torch.Tensor) for tensor in value.values())):
            found = "no" if value is None else f"a {type(value).__name__} as its"
            raise CheckpointError(f"checkpoint={path} is a {FORMAT} checkpoint with {found} '{key}' "
                                  f"(it must be {kind}): the file was not written by this toolkit's "
                                  f"save_checkpoint; use a checkpoint a run wrote")
    return state


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a project checkpoint (no code is executed while unpickling)."""
    state = read_checkpoint_file(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint={path} is not a {FORMAT} checkpoint")
    return check_project_layout(state, path)


def non_finite_parameters(model) -> list[str]:
    """The names of ``model``'s floating-point parameters that hold NaN or inf."""
    return [name for name, param in model.named_parameters()
            if param.is_floating_point() and not bool(torch.isfinite(param).all())]


def check_finite_parameters(model, path: str) -> None:
    """Refuse a model whose loaded parameters hold NaN or infinite values (a run that
    diverged, a corrupted file): its scores would be meaningless."""
    bad = non_finite_parameters(model)
    if bad:
        raise CheckpointError(f"checkpoint={path} holds NaN/infinite weights in {len(bad)} "
                              f"parameter(s) (first: {bad[0]}): the run that wrote it diverged or "
                              f"the file is corrupted; use an earlier checkpoint")


def load_training_state(path: str, model, optimizer, scheduler, model_kind: str) -> dict:
    """Read the project checkpoint ``path`` for an exact resume and load the model,
    optimizer and scheduler states from it; returns the checkpoint dict. Every mismatch
    (another model, another architecture or optimizer) is a one-line CheckpointError."""
    state = load_checkpoint(path)
    recorded = (state.get("config") or {}).get("model", "hat")
    if recorded != model_kind:
        raise CheckpointError(f"resume_from={path} is a checkpoint of model={recorded}, this run is "
                              f"model={model_kind}; resume with the configuration it was written with")
    for what, target, saved in (("model", model, state["model"]), ("optimizer", optimizer, state["optimizer"]),
                                ("scheduler", scheduler, state["scheduler"])):
        try:
            target.load_state_dict(saved)
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"resume_from={path}: its {what} state does not fit this run "
                                  f"({describe_error(error, 160)}); resume with the configuration it "
                                  f"was written with") from error
    check_finite_parameters(model, path)
    return state


def load_mapped_state_dict(model, source: dict, name_map: dict[str, str], skipped=lambda key: False,
                           source_shape=lambda ours, shape: tuple(shape)) -> dict:
    """Load ``source``, a state dict under another layout's names (a released checkpoint's),
    into ``model``; checks every key and shape first.

    ``name_map``: each entry of ``model.state_dict()`` -> its name in ``source``;
    ``skipped(key)``: true for the source keys that are deliberately not used;
    ``source_shape(ours, shape)``: the shape the tensor of our entry ``ours`` (of shape
    ``shape``) has in ``source`` (loaded tensors are reshaped to ours). Returns
    {"loaded": n, "skipped": [the skipped keys, sorted]}; raises ValueError listing the
    missing, unexpected and mis-shaped keys if anything does not match."""
    wanted = {name: ours for ours, name in name_map.items()}
    own = model.state_dict()
    skipped_keys = sorted(key for key in source if skipped(key))
    unused = set(skipped_keys)
    unexpected = sorted(key for key in source if key not in wanted and key not in unused)
    missing = sorted(key for key in wanted if key not in source)
    mis_shaped = sorted(
        f"{key} {tuple(source[key].shape)} vs {source_shape(ours, own[ours].shape)}"
        for key, ours in wanted.items()
        if key in source and tuple(source[key].shape) != source_shape(ours, own[ours].shape)
    )
    if missing or unexpected or mis_shaped:
        def show(keys):
            return f"{len(keys)} {keys[:8]}{' ...' if len(keys) > 8 else ''}"
        raise ValueError(f"the released checkpoint does not fit the configured model: missing "
                         f"{show(missing)}, unexpected {show(unexpected)}, mis-shaped {show(mis_shaped)}")
    model.load_state_dict({ours: source[name].reshape(own[ours].shape) for name, ours in wanted.items()},
                          strict=True)
    return {"loaded": len(wanted), "skipped": skipped_keys}


def load_model_weights(model, path: str, state=None) -> dict:
    """Load weights into ``model`` from a project checkpoint or one of the authors'
    released Lightning checkpoints (recognised by the registered model plug-ins). Returns a
    short description: {"format", "epoch", ...}. ``state``: the file's contents when the
    caller has read them already (`read_checkpoint_file`)."""
    state = read_checkpoint_file(path) if state is None else state
    if isinstance(state, dict) and state.get("format") == FORMAT:
        check_project_layout(state, path)
        try:
            missing, unexpected = model.load_state_dict(state["model"], strict=False)
        except RuntimeError as error:  # shape mismatch
            raise CheckpointError(f"checkpoint={path} does not fit the configured model "
                                  f"({str(error).splitlines()[-1].strip()[:300]})") from error
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint={path} does not fit the configured model: missing {list(missing)[:5]}, "
                f"unexpected {list(unexpected)[:5]}; use the config the checkpoint was trained with"
            )
        check_finite_parameters(model, path)
        return {"format": FORMAT, "epoch": state.get("epoch")}
    released = state.get("state_dict") if isinstance(state, dict) else None
    adapters = [plugin for plugin in plugins() if plugin.released_module]
    for plugin in adapters:
        if isinstance(released, dict) and plugin.is_released(released):
            if not plugin.accepts(model):
                raise CheckpointError(f"checkpoint={path} is a released {plugin.display_name()} checkpoint; the "
                                      f"configured model is a {model.__class__.__name__} (use model={plugin.name})")
            try:
                info = plugin.load_released(model, released)
            except ValueError as error:
                raise CheckpointError(f"checkpoint={path}: {error}") from error
            check_finite_parameters(model, path)
            return {"format": plugin.released_format, "epoch": state.get("epoch"), **info}
    raise CheckpointError(f"checkpoint={path} is neither a {FORMAT} checkpoint nor a released "
                          f"{' or '.join(p.display_name() for p in adapters)} checkpoint (no 'state_dict' with "
                          f"{' or '.join(p.released_keys for p in adapters)} keys)")
