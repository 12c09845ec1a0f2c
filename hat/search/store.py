"""The search index on disk: one folder holding

* ``shard-NNNNNN.safetensors``: the image features of up to ``shard_size`` pictures
  encoded together, one tensor per output of the plug-in's ``encode_image_set`` (``f0``,
  ``f1``, ...: HAT's levels, Multi-SEA's (f_I, F_I)), row r = the r-th picture of the
  shard. Safetensors only: opening an index runs no pickle.
* ``manifest.json``: the complete index (format and version, the checkpoint's absolute
  path and content digest, its model name and the configuration the Retriever was built
  from, the image root, every indexed file's relative path, size, mtime and (shard,
  row), the unreadable files skipped, the feature layout). Written last, atomically: a
  reader sees the previous index or the new one, never a mix.
* ``progress.json``: while a build runs, the shards it has committed (with their files),
  so that an interrupted build resumes where it stopped; removed when the manifest is
  written.
* ``fingerprints.json`` (content digests of the checkpoint, `hat.fingerprint`) and
  ``.lock`` (one builder at a time).

Every file is written to a temporary name beside it and renamed (`atomic_file`,
`save_shard`); a build removes the shards no file uses only after it wrote the new
manifest (a reader that read the previous manifest just before may then find one gone:
it reports the index as damaged, and opening it again reads the new one). What this
relies on: rename is atomic within a folder (POSIX), and a picture changes its size or
its mtime when it is rewritten.
"""
from __future__ import annotations

import json
import os
import re

import torch

from datamodules.atomic import atomic_file
from hat.images import IMAGE_EXTENSIONS
from hat.search.checks import SearchError

FORMAT = "hat-search-index"
PROGRESS_FORMAT = "hat-search-progress"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
MEMO = "fingerprints.json"
LOCK = ".lock"
DEFAULT_NAME = ".hat-index"  # the index of DIR, when no --out: DIR/.hat-index
DIGEST = "blake2b-128"  # hat.fingerprint.file_digest
SHARD_RE = re.compile(r"^shard-(\d{6,})\.safetensors$")
OWN_FILE_RE = re.compile(r"^(manifest\.json|progress\.json|fingerprints\.json|\.lock|shard-\d{6,}\.safetensors)"
                         r"(\.tmp-\d+)?$")


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.safetensors"


def next_shard_number(folder: str, names) -> int:
    """One more than the highest shard number in ``names`` and in ``folder`` (shard
    names are never reused: a reader of the previous manifest keeps its files)."""
    numbers = [int(m.group(1)) for name in [*names, *os.listdir(folder)] if (m := SHARD_RE.match(name))]
    return max(numbers, default=0) + 1


def is_own_folder(folder: str) -> bool:
    """Whether every entry of ``folder`` is one of the index's own files (an empty
    folder included): a folder the builder may write into and clean."""
    return all(OWN_FILE_RE.match(name) for name in os.listdir(folder))


def read_json(path: str, what: str) -> dict:
    """A JSON object from ``path``; SearchError naming ``what`` when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError) as error:
        raise SearchError(f"{what} cannot be read ({type(error).__name__}: {' '.join(str(error).split())})") \
            from None
    if not isinstance(state, dict):
        raise SearchError(f"{what} holds a JSON {type(state).__name__}, not an object")
    return state


def write_json(path: str, state: dict) -> None:
    with atomic_file(path, "w") as handle:
        json.dump(state, handle, indent=1)


def read_manifest(folder: str, fix: str) -> dict:
    """The manifest of the index in ``folder``. A missing folder, a folder without a
    manifest, a manifest of another format or version ("foreign") is a SearchError
    ending with ``fix``."""
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise SearchError(f"index {folder} {what}; {fix}")
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise SearchError(f"{folder} is not a search index (no {MANIFEST}); {fix}")
    manifest = read_json(path, f"{path} (the index's manifest)")
    if manifest.get("format") != FORMAT:
        raise SearchError(f"{folder} is not a search index ({MANIFEST} of format {manifest.get('format')!r}, "
                          f"not {FORMAT!r}); {fix}")
    if manifest.get("version") != VERSION:
        raise SearchError(f"{folder} is a search index of format version {manifest.get('version')!r}; this "
                          f"toolkit reads version {VERSION}: build it again with --rebuild")
    return manifest


def list_pictures(root: str, exclude: str | None = None) -> dict:
    """{relative path ('/'-separated): (size, mtime_ns)} of every picture under ``root``
    (extensions `IMAGE_EXTENSIONS`, any case), recursively. Hidden files and folders (a
    name starting with '.') and the folder ``exclude`` (the index, when it lies inside
    ``root``) are left out; symbolic links to files are followed, links to folders are
    not (no cycles). A file that cannot be stat'ed (a broken link) has (-1, -1)."""
    exclude = os.path.realpath(exclude) if exclude else None
    found = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(folder, d)) != exclude)
        for name in names:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            try:
                stat = os.stat(path)
            except OSError:
                found[relative] = (-1, -1)
                continue
            if os.path.isfile(path):
                found[relative] = (stat.st_size, stat.st_mtime_ns)
    return dict(sorted(found.items()))


# -- the feature layout and the shards ---------------------------------------------

def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def feature_layout(features) -> dict:
    """What the manifest records of ``encode_image_set``'s output: list or tuple, and each
    tensor's name, per-picture shape and dtype."""
    return {"container": "tuple" if isinstance(features, tuple) else "list",
            "tensors": [{"name": f"f{i}", "shape": list(t.shape[1:]), "dtype": dtype_name(t.dtype)}
                        for i, t in enumerate(features)]}


def save_shard(path: str, tensors: dict, paths: list[str]) -> None:
    """Write one shard atomically (a temporary file beside it, fsynced, then renamed);
    its metadata names the pictures of its rows."""
    from safetensors.torch import save_file

    tmp_path = f"{path}.tmp-{os.getpid()}"
    try:
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, tmp_path,
                  metadata={"format": "hat-search-shard", "version": str(VERSION), "paths": json.dumps(paths)})
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def shard_rows(path: str, layout: dict | None) -> int | None:
    """The number of rows of the shard at ``path`` if its header fits ``layout`` (every
    tensor, its per-picture shape and dtype); None when it is missing, unreadable or of
    another layout (its pictures are then encoded again)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as shard:
            rows = set()
            for spec in (layout or {}).get("tensors", []):
                piece = shard.get_slice(spec["name"])
                shape = piece.get_shape()
                if list(shape[1:]) != spec["shape"] or piece.get_dtype().lower() != _safetensors_dtype(spec["dtype"]):
                    return None
                rows.add(shape[0])
    except Exception:  # noqa: BLE001 (missing, truncated, not a safetensors file: encode again)
        return None
    return rows.pop() if len(rows) == 1 else None


def _safetensors_dtype(name: str) -> str:
    """A torch dtype name as safetensors' header spells it (lower case)."""
    return {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64", "int64": "i64",
            "int32": "i32", "bool": "bool", "uint8": "u8", "int8": "i8"}.get(name, name)


def load_features(folder: str, manifest: dict, fix: str) -> list[torch.Tensor]:
    """Every tensor of the layout over the manifest's files, rows in index order (one
    preallocated tensor each, filled shard by shard). A missing or damaged shard is a
    SearchError ending with ``fix``."""
    from safetensors.torch import load_file

    files, layout = manifest["files"], manifest["features"]
    out = [torch.empty((len(files), *spec["shape"]), dtype=getattr(torch, spec["dtype"]))
           for spec in layout["tensors"]]
    by_shard: dict = {}
    for position, entry in enumerate(files):
        by_shard.setdefault(entry["shard"], ([], []))
        by_shard[entry["shard"]][0].append(position)
        by_shard[entry["shard"]][1].append(entry["row"])
    for name, (positions, rows) in by_shard.items():
        path = os.path.join(folder, name)
        try:
            tensors = load_file(path)
            for spec, target in zip(layout["tensors"], out):
                target[torch.tensor(positions)] = tensors[spec["name"]][torch.tensor(rows)].to(target.dtype)
        except Exception as error:  # noqa: BLE001 (any unreadable shard: one line)
            raise SearchError(f"index {folder} is damaged: shard {name} cannot be read "
                              f"({type(error).__name__}: {' '.join(str(error).split())[:200]}); {fix}") from None
    return out
