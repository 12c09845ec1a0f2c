"""Where a training run's checkpoints go, and which earlier run ``resume=True`` continues.

Every training run writes its checkpoints into a folder of its own, so a run never
overwrites another run's files:

* recorded by an observer, no ``checkpoint_dir``: the run's observer folder (``runs/<id>/``);
* ``checkpoint_dir`` set: ``checkpoint_dir/<run id>/`` (``<time stamp>`` for an unrecorded run);
* unrecorded, no ``checkpoint_dir``: ``checkpoints/<exp_name>/<time stamp>/``.

A name already taken gets a suffix (``7-2``). A folder outside the observer's gets a
``config.json`` of its own (the run's configuration), so that ``resume=True`` can find
the latest ``last.ckpt`` of the same configuration in any of these places.
"""
from __future__ import annotations

import json
import os
import time

from datamodules.atomic import atomic_file

# keys that say where files go or how a run is watched, not what it computes
LOCATION_KEYS = ("resume", "resume_from", "progress", "observer_dir", "checkpoint_dir")


def _comparable(config: dict) -> dict:
    plain = json.loads(json.dumps(config))
    return {key: value for key, value in plain.items() if key not in LOCATION_KEYS}


def default_checkpoint_root(exp_name: str) -> str:
    return os.path.join("checkpoints", exp_name)


def new_folder(root: str, name: str) -> str:
    """Create ``root/name`` (or ``root/name-2``, ``-3``, ... when taken) and return it."""
    os.makedirs(root, exist_ok=True)
    for attempt in range(1, 10_000):
        folder = os.path.join(root, name if attempt == 1 else f"{name}-{attempt}")
        try:
            os.mkdir(folder)
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"no free folder name {name}-N under {root}")


def write_json_atomic(path: str, value) -> None:
    with atomic_file(path, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)


def checkpoint_folder(config: dict, run_dir: str | None, run_id) -> str:
    """Create (where needed) and return the folder of this run's checkpoints.
    ``run_dir``: the run's observer folder (None when unrecorded)."""
    if run_dir and not config["checkpoint_dir"]:
        return run_dir  # Sacred's config.json is there already
    root = config["checkpoint_dir"] or default_checkpoint_root(config["exp_name"])
    name = str(run_id) if run_dir and run_id is not None else time.strftime("%Y%m%d-%H%M%S")
    folder = new_folder(root, name)
    write_json_atomic(os.path.join(folder, "config.json"), json.loads(json.dumps(config)))
    return folder


def search_roots(config: dict) -> list[str]:
    """The folders whose sub-folders may hold runs of this configuration."""
    roots = [config["observer_dir"], config["checkpoint_dir"], default_checkpoint_root(config["exp_name"])]
    unique = []
    for root in roots:
        if root and os.path.isdir(root) and os.path.abspath(root) not in map(os.path.abspath, unique):
            unique.append(root)
    return unique


def _recorded_last(folder: str) -> str | None:
    """The last.ckpt of the run recorded in ``folder``: beside it, or (a run with
    ``checkpoint_dir``) beside the checkpoint its info.json names."""
    last = os.path.join(folder, "last.ckpt")
    if os.path.isfile(last):
        return last
    try:
        with open(os.path.join(folder, "info.json")) as handle:
            named = json.load(handle).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(named, str):
        return None
    last = os.path.join(os.path.dirname(named), "last.ckpt")
    return last if os.path.isfile(last) else None


def find_resumable(config: dict, exclude=()) -> tuple[str, str] | None:
    """(folder, its last.ckpt) of the most recently written ``last.ckpt`` whose run had
    this configuration (locations and ``resume`` aside); None when there is none. A run
    recorded in the observer directory is found wherever its checkpoints went (the
    checkpoint its info.json names). Folders in ``exclude`` (the current run's) and
    checkpoints inside them are skipped."""
    wanted = _comparable(config)
    excluded = {os.path.abspath(folder) for folder in exclude if folder}
    candidates = {}
    for root in search_roots(config):
        for name in os.listdir(root):
            folder = os.path.join(root, name)
            recorded = os.path.join(folder, "config.json")
            last = _recorded_last(folder) if os.path.isfile(recorded) else None
            if last is None or {os.path.abspath(folder), os.path.dirname(os.path.abspath(last))} & excluded:
                continue
            try:
                with open(recorded) as handle:
                    matches = _comparable(json.load(handle)) == wanted
            except (OSError, ValueError, AttributeError):
                continue
            if matches:  # one checkpoint may be found twice (its observer folder, its checkpoint_dir)
                key = os.path.abspath(last)
                candidates[key] = max(candidates.get(key, ()), (os.stat(last).st_mtime_ns, folder, last))
    if not candidates:
        return None
    _, folder, last = max(candidates.values())
    return folder, last


def resume_checkpoint(config: dict, exclude=()) -> tuple[str | None, dict]:
    """resume=True: (the last.ckpt written most recently by a run with the same
    configuration, what the run should record about it); (None, {}) with a note when
    there is none (the run starts from scratch)."""
    found = find_resumable(config, exclude)
    if found is None:
        print("resume=True: no earlier run with this configuration; starting from scratch", flush=True)
        return None, {}
    folder, last = found
    name = os.path.basename(os.path.normpath(folder))
    print(f"resume=True: continuing run {name} ({folder}) from {last}", flush=True)
    return last, {"resumed_run": int(name) if name.isdigit() else name,
                  "resumed_folder": os.path.abspath(folder)}
