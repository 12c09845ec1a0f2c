"""Build or update the search index of a folder of pictures (`build_index`).

Every picture under the folder (`hat.search.store.list_pictures`: jpg, jpeg, png, webp,
bmp in any case, recursively, hidden names left out, in sorted order) is opened with
`hat.images.open_image` (the pixels `Retriever.encode_images` sees), put through the
checkpoint's test-time transform and encoded in batches by the plug-in's
``encode_image_set``; every ``shard_size`` pictures make one shard, committed to disk
with the progress record as soon as it is encoded. Re-running on the same folder reuses
the rows of every file whose size and mtime are unchanged (from the manifest, or from
the progress record of an interrupted build), encodes only new and changed files and
drops deleted ones; since a picture's features do not depend on the others in its batch
(what this relies on: the encoders treat the images of a batch independently, in eval
mode), the index equals a fresh build. Files that cannot be decoded are skipped, listed
in the report and recorded in the manifest with their size and mtime, so they are tried
again only when they change.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from hat.fingerprint import FingerprintMemo
from hat.images import IMAGE_EXTENSIONS, ImageDecodeError, open_image
from hat.search.checks import SearchError
from hat.search.shortlist import plan as shortlist_plan
from hat.search.store import (DEFAULT_NAME, DIGEST, FORMAT, LOCK, MANIFEST, MEMO, OWN_FILE_RE, PROGRESS,
                              PROGRESS_FORMAT, SHARD_RE, VERSION, dtype_name, feature_layout,
                              is_own_folder, list_pictures, next_shard_number, read_json, save_shard, shard_name,
                              shard_rows, write_json)

SHARD_SIZE = 256  # pictures per shard (HAT keeps ~4 MB of region features per 224 px picture)
SHOWN = 5  # skipped files named in the summary


@dataclass
class BuildReport:
    """What `build_index` did: pictures ``encoded`` now, ``reused`` from the index (or
    from an interrupted build), ``dropped`` (indexed before, deleted since), ``skipped``
    (the unreadable files, sorted; ``reasons`` says why each), ``total`` pictures in the
    index, the index folder ``out``, and ``notes`` (one line each)."""

    encoded: int
    reused: int
    dropped: int
    skipped: list[str]
    total: int
    out: str
    reasons: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Lines for people: the counts, the skipped files (the first few), the notes."""
        lines = [f"index {self.out}: {self.total} pictures ({self.encoded} encoded, {self.reused} reused, "
                 f"{self.dropped} dropped)"]
        if self.skipped:
            shown = ", ".join(f"{path} ({self.reasons.get(path, 'unreadable')})" for path in self.skipped[:SHOWN])
            more = f" and {len(self.skipped) - SHOWN} more" if len(self.skipped) > SHOWN else ""
            lines.append(f"skipped {len(self.skipped)} unreadable file(s): {shown}{more} (all in "
                         f"{os.path.join(self.out, MANIFEST)}; tried again when they change)")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def load_retriever(checkpoint: str, device):
    """`hat.load_model` of ``checkpoint`` on ``device``; what it refuses is a SearchError."""
    from hat.checkpoint import CheckpointError
    from hat.retrieval import load_model

    try:
        return load_model(checkpoint, device=device)
    except (CheckpointError, ValueError, OSError) as error:
        raise SearchError(" ".join(str(error).split())) from None


def json_config(config: dict) -> dict:
    """The Retriever's configuration as the manifest keeps it (JSON values; no device)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k != "device"}, default=str))


def feature_keys(plugin) -> tuple:
    """The configuration keys the image features depend on."""
    return ("model", "image_size", "image_transform", *plugin.architecture_keys)


def config_difference(recorded: dict, config: dict, plugin) -> str | None:
    """The first feature key (`feature_keys`) whose value differs, as ``key=a vs b``."""
    config = json_config(config)
    for key in feature_keys(plugin):
        if recorded.get(key) != config.get(key):
            return f"{key}={recorded.get(key)!r} vs {config.get(key)!r}"
    return None


def build_index(checkpoint, images_dir, out=None, batch_size: int | None = None, device="cpu",
                progress: bool = True, *, shard_size: int = SHARD_SIZE, rebuild: bool = False,
                num_workers: int = 0) -> BuildReport:
    """Index every picture under ``images_dir`` with ``checkpoint`` into ``out`` (default
    ``images_dir/.hat-index``), or bring that index up to date. ``batch_size``: pictures
    per encoding batch (default: the checkpoint's eval_batch_size); ``progress``: a tqdm
    bar (pictures/s, ETA) on stderr; ``shard_size``: pictures per shard; ``rebuild``:
    start from nothing (the index's own files are removed first); ``num_workers``: data
    loader processes that decode the pictures. An index of another checkpoint, another
    format version, or a folder that is not an index is refused (SearchError, one line)."""
    root = os.path.abspath(os.path.expanduser(os.fspath(images_dir)))
    if not os.path.isdir(root):
        raise SearchError(f"--images {images_dir} is not a folder; pass the folder that holds your pictures")
    out = os.path.abspath(os.path.expanduser(os.fspath(out))) if out else os.path.join(root, DEFAULT_NAME)
    checkpoint = os.path.abspath(os.path.expanduser(os.fspath(checkpoint)))
    if not os.path.isfile(checkpoint):
        raise SearchError(f"checkpoint {checkpoint} does not exist; pass a trained checkpoint (e.g. runs/1/best.ckpt)")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size), ("num_workers", num_workers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < (0 if name == "num_workers" else 1)):
            kind = "non-negative" if name == "num_workers" else "positive"
            raise SearchError(f"{name}={value!r} is not valid; pass a {kind} integer")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SearchError(f"--out {out} is a file, not a folder; pass a new or empty folder for the index")
    if os.path.isdir(out):
        read_own_manifest(out, rebuild)  # before the lock file goes in: another folder stays as it was
    os.makedirs(out, exist_ok=True)
    with _locked(out):
        return _Build(checkpoint, root, out, device, rebuild).run(batch_size, progress, shard_size, num_workers)


def read_own_manifest(out: str, rebuild: bool) -> dict | None:
    """The manifest in the folder ``out`` (None: none yet). A folder that is not an index
    (a manifest of another format, or other files and no manifest), or an index of
    another version without ``rebuild``, is refused."""
    path = os.path.join(out, MANIFEST)
    if not os.path.isfile(path):
        if not is_own_folder(out):
            raise SearchError(f"{out} is not a search index (it holds other files and no {MANIFEST}); pass "
                              f"another --out (a new or empty folder)")
        return None
    manifest = read_json(path, f"{path} (the index's manifest; pass --rebuild to start again)")
    if manifest.get("format") != FORMAT:
        raise SearchError(f"{out} is not a search index ({MANIFEST} of format {manifest.get('format')!r}); "
                          f"pass another --out (a new or empty folder)")
    if manifest.get("version") != VERSION and not rebuild:
        raise SearchError(f"{out} is a search index of format version {manifest.get('version')!r}; this "
                          f"toolkit writes version {VERSION}: pass --rebuild to build it again, or a new --out")
    return manifest


@contextlib.contextmanager
def _locked(out: str):
    """One builder per index folder at a time (an flock on ``out``/.lock, released when
    the process ends however it ends)."""
    path = os.path.join(out, LOCK)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SearchError(f"index {out} is being built by another process (it holds {path}); wait for it "
                              f"to finish, or pass another --out") from None
        yield


class _Build:
    """One run of `build_index`, under the folder's lock."""

    def __init__(self, checkpoint: str, root: str, out: str, device, rebuild: bool):
        self.checkpoint, self.root, self.out = checkpoint, root, out
        self.notes: list[str] = []
        self.manifest, self.record = self.existing(rebuild)
        self.memo = FingerprintMemo(os.path.join(out, MEMO))
        self.digest = self.memo.digest(checkpoint)
        self.check_checkpoint(self.manifest or self.record)
        self.retriever = load_retriever(checkpoint, device)
        if self.manifest is not None:
            difference = config_difference(self.manifest.get("config") or {}, self.retriever.config,
                                           self.retriever.plugin)
            if difference:
                raise SearchError(f"index {out} holds features of another configuration than checkpoint "
                                  f"{checkpoint} loads with ({difference}); pass --rebuild to encode the pictures "
                                  f"again, or a new --out")
        if self.record is not None and self.record["checkpoint"].get("digest") != self.digest:
            self.record = None  # an unfinished build of another checkpoint (its shards are removed below)

    # -- what the folder holds ------------------------------------------------------

    def existing(self, rebuild: bool) -> tuple[dict | None, dict | None]:
        """(manifest, progress record) of the folder, None where there is none; a folder
        that is not an index, or an index of another version without ``rebuild``, is
        refused. ``rebuild``: the index's own files are removed (the lock stays)."""
        out = self.out
        manifest = read_own_manifest(out, rebuild)
        if rebuild:
            for name in os.listdir(out):
                if OWN_FILE_RE.match(name) and name != LOCK:
                    os.remove(os.path.join(out, name))
            return None, None
        record = None
        if os.path.isfile(os.path.join(out, PROGRESS)):
            try:
                record = read_json(os.path.join(out, PROGRESS), "the progress record")
            except SearchError:
                record = None
            if record is not None and (record.get("format") != PROGRESS_FORMAT or record.get("version") != VERSION
                                       or not isinstance(record.get("checkpoint"), dict)):
                record = None
        return manifest, record

    def check_checkpoint(self, owner: dict | None) -> None:
        """Refuse to add features of this checkpoint to an index of another one."""
        if owner is None:
            return
        recorded = owner.get("checkpoint") or {}
        if recorded.get("digest") == self.digest:
            if recorded.get("path") != self.checkpoint:
                self.notes.append(f"checkpoint {self.checkpoint} has the content of {recorded.get('path')}, "
                                  f"which the index was built with: the index now names it")
            return
        old, new, digest = recorded.get("path"), self.checkpoint, str(recorded.get("digest"))[:12]
        if old == new:
            raise SearchError(f"checkpoint {new} has changed since index {self.out} was built with it (content "
                              f"{digest}, now {self.digest[:12]}); pass --rebuild to encode the pictures again, "
                              f"or a new --out")
        raise SearchError(f"index {self.out} was built with checkpoint {old} (content {digest}), not {new} (content "
                          f"{self.digest[:12]}); pass a new --out for this checkpoint, or --rebuild to replace the "
                          f"index")

    # -- the build ------------------------------------------------------------------

    def run(self, batch_size, progress: bool, shard_size: int, num_workers: int) -> BuildReport:
        manifest, record, out = self.manifest, self.record, self.out
        pictures = list_pictures(self.root, exclude=out)
        if not pictures and manifest is None:
            raise SearchError(f"no pictures under {self.root} (files ending in {', '.join(IMAGE_EXTENSIONS)}, any "
                              f"case; hidden files and folders are left out); pass the folder that holds them")
        if manifest is not None and manifest.get("root") != self.root:
            self.notes.append(f"the pictures are now under {self.root} (they were under {manifest.get('root')}): "
                              f"files are matched by their relative path, size and mtime")
        self.layout = (manifest or {}).get("features") or (record or {}).get("features")
        candidates, known_skipped = {}, {}
        for source in (manifest, record):
            if source is None:
                continue
            entries = source.get("files", []) if source is manifest else [
                {**entry, "shard": shard["name"]} for shard in source.get("shards", []) for entry in shard["files"]]
            candidates.update({entry["path"]: entry for entry in entries})
            known_skipped.update({entry["path"]: entry for entry in source.get("skipped", [])})

        rows: dict = {}  # shard name -> its rows (None: missing or damaged)

        def usable(entry) -> bool:
            name = entry["shard"]
            if name not in rows:
                rows[name] = shard_rows(os.path.join(out, name), self.layout)
                if rows[name] is None and name in (manifest or {}).get("shards", []):
                    self.notes.append(f"shard {name} is missing or damaged: its pictures are encoded again")
            return rows[name] is not None and 0 <= entry["row"] < rows[name]

        reused, skipped, todo = {}, {}, []
        for path, (size, mtime) in pictures.items():
            entry = candidates.get(path)
            if entry is not None and (entry["size"], entry["mtime_ns"]) == (size, mtime) and usable(entry):
                reused[path] = {key: entry[key] for key in ("path", "size", "mtime_ns", "shard", "row")}
                continue
            entry = known_skipped.get(path)
            if entry is not None and size >= 0 and (entry["size"], entry["mtime_ns"]) == (size, mtime):
                skipped[path] = entry
                continue
            todo.append(path)
        dropped = sum(1 for entry in (manifest or {}).get("files", []) if entry["path"] not in pictures)

        n_reused = len(reused)
        encoded = self.encode(todo, pictures, reused, skipped, batch_size, progress, shard_size, num_workers)
        self.commit(pictures, reused, skipped)
        return BuildReport(encoded=encoded, reused=n_reused, dropped=dropped, skipped=sorted(skipped),
                           total=len(reused), out=out, reasons={p: skipped[p]["reason"] for p in sorted(skipped)},
                           notes=self.notes)

    def checkpoint_info(self) -> dict:
        return {"path": self.checkpoint, "digest": self.digest, "digest_algorithm": DIGEST,
                "size": os.path.getsize(self.checkpoint)}

    def encode(self, todo: list, pictures: dict, reused: dict, skipped: dict, batch_size, progress: bool,
               shard_size: int, num_workers: int) -> int:
        """Encode ``todo`` shard by shard, each committed (shard file, then the progress
        record) as it finishes; adds the new rows to ``reused`` and the unreadable files
        to ``skipped``. -> the number of pictures encoded."""
        from tqdm import tqdm

        if not todo:
            return 0
        retriever, out = self.retriever, self.out
        record = {"format": PROGRESS_FORMAT, "version": VERSION, "checkpoint": self.checkpoint_info(),
                  "features": self.layout, "shards": list((self.record or {}).get("shards", [])),
                  "skipped": list((self.record or {}).get("skipped", []))}
        taken = [shard["name"] for shard in record["shards"]] + list((self.manifest or {}).get("shards", []))
        number = next_shard_number(out, taken)
        batch_size = batch_size or retriever.batch_size
        encoded = 0
        with tqdm(total=len(todo), unit="img", desc="encoding pictures", disable=not progress, dynamic_ncols=True,
                  smoothing=0.1) as bar:
            for start in range(0, len(todo), shard_size):
                chunk = todo[start:start + shard_size]
                kept, features, failures = self.encode_chunk(chunk, batch_size, num_workers, bar)
                for path, reason in failures:
                    size, mtime = pictures[path]
                    skipped[path] = {"path": path, "size": size, "mtime_ns": mtime, "reason": reason}
                    record["skipped"].append(skipped[path])
                if kept:
                    name = shard_name(number)
                    number += 1
                    tensors = self.shard_tensors(features)
                    try:
                        save_shard(os.path.join(out, name), tensors, kept)
                    except OSError as error:
                        raise SearchError(f"cannot write {os.path.join(out, name)} ({type(error).__name__}: "
                                          f"{error}); free disk space or pass another --out (the shards written "
                                          f"so far are kept: run again to resume)") from None
                    files = [{"path": path, "size": pictures[path][0], "mtime_ns": pictures[path][1], "row": row}
                             for row, path in enumerate(kept)]
                    record["shards"].append({"name": name, "files": files})
                    reused.update({entry["path"]: {**entry, "shard": name} for entry in files})
                    encoded += len(kept)
                record["features"] = self.layout
                write_json(os.path.join(out, PROGRESS), record)
        return encoded

    def encode_chunk(self, chunk: list, batch_size: int, num_workers: int, bar):
        """Decode and encode the pictures of one shard -> (the paths encoded, in row order;
        the features, concatenated; [(path, why)] of those that cannot be decoded)."""
        retriever = self.retriever
        loader = DataLoader(_Pictures(self.root, chunk, retriever.transform), batch_size=batch_size,
                            num_workers=num_workers, collate_fn=_as_list)
        kept, parts, failures, container = [], [], [], list
        for batch in loader:
            good = [(index, item) for index, item in batch if isinstance(item, torch.Tensor)]
            failures.extend((chunk[index], item) for index, item in batch if not isinstance(item, torch.Tensor))
            if good:
                features = retriever.plugin.encode_image_set(retriever.model, [torch.stack([x for _, x in good])],
                                                             retriever.device)
                container = type(features)
                parts.append([f.detach().cpu() for f in features])
                kept.extend(chunk[index] for index, _ in good)
            bar.update(len(batch))
        if not parts:
            return kept, None, failures
        return kept, container(torch.cat(list(outputs)) for outputs in zip(*parts)), failures

    def shard_tensors(self, features) -> dict:
        """The shard's tensors by name, in the index's layout: the first shard sets it;
        later ones must fit it (the dtype is cast, with a note: another device)."""
        layout = feature_layout(features)
        if self.layout is None:
            self.layout = layout
        shapes = lambda spec: [s["shape"] for s in spec["tensors"]]  # noqa: E731
        if shapes(layout) != shapes(self.layout) or layout["container"] != self.layout["container"]:
            raise SearchError(f"the model encodes pictures into {shapes(layout)}, index {self.out} holds "
                              f"{shapes(self.layout)}; pass --rebuild to encode every picture again")
        tensors = {}
        for spec, tensor in zip(self.layout["tensors"], features):
            if dtype_name(tensor.dtype) != spec["dtype"]:
                note = (f"features encoded as {dtype_name(tensor.dtype)} are stored as {spec['dtype']}, the "
                        f"index's type (it was built on another device)")
                if note not in self.notes:
                    self.notes.append(note)
                tensor = tensor.to(getattr(torch, spec["dtype"]))
            tensors[spec["name"]] = tensor
        return tensors

    def commit(self, pictures: dict, reused: dict, skipped: dict) -> None:
        """Write the manifest (the new index, atomically), then remove the progress record,
        the shards no file uses any more and stale temporary files."""
        out, retriever = self.out, self.retriever
        files = [reused[path] for path in sorted(reused)]
        shards = sorted({entry["shard"] for entry in files})
        manifest = {
            "format": FORMAT, "version": VERSION,
            "checkpoint": self.checkpoint_info(),
            "model": retriever.config["model"],
            "config": json_config(retriever.config),
            "root": self.root,
            "extensions": list(IMAGE_EXTENSIONS),
            "features": self.layout,
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shards": shards,
            "shortlist": shortlist_plan(retriever.config["model"], len(files), self.layout) if self.layout else None,
            "files": files,
            "skipped": [skipped[path] for path in sorted(skipped) if path in pictures],
        }
        write_json(os.path.join(out, MANIFEST), manifest)
        for name in os.listdir(out):
            stale = (name == PROGRESS or (SHARD_RE.match(name) and name not in shards)
                     or (OWN_FILE_RE.match(name) and ".tmp-" in name))
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out, name))
        self.memo.save()


def _as_list(batch):
    return batch


class _Pictures(Dataset):
    """(position, transformed picture) or (position, why it cannot be used) per file of
    ``paths`` (relative to ``root``)."""

    def __init__(self, root: str, paths: list[str], transform):
        self.root, self.paths, self.transform = root, paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = os.path.join(self.root, *self.paths[index].split("/"))
        try:
            if os.path.getsize(path) == 0:
                return index, "empty file, 0 bytes"
            return index, self.transform(open_image(path))
        except ImageDecodeError as error:
            return index, error.reason
        except (OSError, ValueError, RuntimeError) as error:  # gone since the scan, or the transform refused it
            return index, f"{type(error).__name__}: {' '.join(str(error).split())}"
