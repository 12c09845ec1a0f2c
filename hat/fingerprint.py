"""Content fingerprints of files, for cache keys that a same-size file with a restored
modification time cannot fool.

`file_digest` hashes a whole file (BLAKE2b, read in chunks). `FingerprintMemo` remembers
each digest under the file's absolute path together with its stat identity (size,
mtime_ns, inode, device, ctime_ns), so an unchanged file is hashed once, also across
processes when the memo is kept in a JSON file. What this relies on: every change to a
file's content changes its ctime (the kernel sets it on every write and on ``touch -r``;
it cannot be set from user space), or its inode (a file moved over it), and the system
clock does not go back.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

from datamodules.atomic import atomic_file

CHUNK = 8 << 20  # bytes read per step
# A file whose ctime is within this of the start of its hashing is not memoised: with
# coarse timestamps (one clock tick; a second on some filesystems) a rewrite right after
# the hashing could keep the same ctime.
RACY_NS = 2_000_000_000
MEMO_VERSION = 1


def file_digest(path: str) -> str:
    """BLAKE2b (128-bit, hex) of the whole content of ``path``."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stat_identity(path: str) -> list:
    """What changes when ``path`` is written, replaced or touched: [size, mtime_ns,
    inode, device, ctime_ns]."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev, stat.st_ctime_ns]


class FingerprintMemo:
    """Digests by absolute path, valid while the file's `stat_identity` is unchanged;
    kept in ``memo_path`` (JSON) when one is given. A missing, unreadable or corrupt
    memo file counts as empty; `save` only warns when it cannot write."""

    def __init__(self, memo_path: str | None = None):
        self.memo_path = memo_path
        self.entries: dict = {}
        self.changed = False
        if memo_path:
            try:
                with open(memo_path, encoding="utf-8") as handle:
                    state = json.load(handle)
                if state.get("version") == MEMO_VERSION and isinstance(state.get("files"), dict):
                    self.entries = state["files"]
            except (OSError, ValueError, AttributeError):
                pass  # no memo yet, or a broken one: every file is hashed again

    def digest(self, path: str) -> str:
        """`file_digest` of ``path``, from the memo when the file is unchanged."""
        key = os.path.abspath(path)
        identity = stat_identity(path)
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("stat") == identity and isinstance(entry.get("digest"), str):
            return entry["digest"]
        started = time.time_ns()
        digest = file_digest(path)
        if stat_identity(path) == identity and identity[4] + RACY_NS <= started:
            self.entries[key] = {"stat": identity, "digest": digest}
            self.changed = True
        elif self.entries.pop(key, None) is not None:  # changed while hashed, or too fresh
            self.changed = True
        return digest

    def save(self) -> None:
        """Write the memo file (atomically) if a digest was added; warn in one line when
        it cannot be written (the files are then hashed again next time)."""
        if not (self.memo_path and self.changed):
            return
        try:
            with atomic_file(self.memo_path, "w") as handle:
                json.dump({"version": MEMO_VERSION, "files": self.entries}, handle)
            self.changed = False
        except OSError as error:
            print(f"fingerprint: cannot write the hash memo {self.memo_path} ({error.__class__.__name__}: "
                  f"{error}); the files will be hashed again next time", flush=True)
