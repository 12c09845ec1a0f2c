"""Streaming, atomic writer of ViLT-format arrow files.

Rows go out in record batches bounded in rows and in bytes, so memory does not grow
with the split (ViLT's writer holds a whole split in a pandas frame). A file is written
under ``<path>.tmp-<pid>`` and renamed into place only when complete
(`datamodules.atomic.atomic_file`): an interrupted write never leaves a file that looks
finished.
"""
from __future__ import annotations

import glob
import os

import pyarrow as pa

from datamodules.arrow import DataError
from datamodules.atomic import atomic_file

VILT_SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("caption", pa.list_(pa.string())),
    ("image_id", pa.string()),
    ("split", pa.string()),
])
BATCH_ROWS = 256
BATCH_BYTES = 32 << 20  # image bytes buffered before a record batch is written


class ArrowWriter:
    """``with ArrowWriter(path) as out: out.write(image_bytes, captions, image_id, split)``.

    Leaving the block normally renames the finished file to ``path``; leaving it with an
    exception (KeyboardInterrupt included) removes the temporary file."""

    def __init__(self, path: str, batch_rows: int = BATCH_ROWS, batch_bytes: int = BATCH_BYTES):
        self.path, self.batch_rows, self.batch_bytes = path, batch_rows, batch_bytes
        self.count = 0
        self._buffer: list[tuple] = []
        self._buffered_bytes = 0
        self._file = self._writer = None

    def __enter__(self) -> "ArrowWriter":
        self._file = atomic_file(self.path)
        self._writer = pa.ipc.new_file(self._file.__enter__(), VILT_SCHEMA)
        return self

    def write(self, image: bytes, captions: list[str], image_id: str, split: str) -> None:
        self._buffer.append((image, captions, image_id, split))
        self._buffered_bytes += len(image)
        if len(self._buffer) >= self.batch_rows or self._buffered_bytes >= self.batch_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_batch(_batch(self._buffer))
            self.count += len(self._buffer)
            self._buffer, self._buffered_bytes = [], 0

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self._flush()
            self._writer.close()
        except BaseException as error:
            self._file.__exit__(type(error), error, error.__traceback__)
            raise
        self._file.__exit__(exc_type, exc, traceback)


def write_arrow(path: str, rows, batch_rows: int = BATCH_ROWS, batch_bytes: int = BATCH_BYTES) -> int:
    """Write rows ``(image_bytes, captions, image_id, split)`` to ``path``, streamed and
    atomically (see ArrowWriter). Returns the row count."""
    with ArrowWriter(path, batch_rows, batch_bytes) as out:
        for row in rows:
            out.write(*row)
    return out.count


def remove_stale_temporaries(path: str) -> None:
    """Remove ``<path>.tmp-<pid>`` files left by writers that were killed (their process
    is gone). A temporary file of a live process means another writer is at work."""
    for tmp_path in glob.glob(glob.escape(path) + ".tmp-*"):
        pid = tmp_path.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
            raise DataError(f"{tmp_path} is being written by process {pid}; wait for it to finish "
                            f"(or stop that process) and run again")
        os.remove(tmp_path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _batch(rows) -> pa.RecordBatch:
    images, captions, image_ids, splits = zip(*rows)
    return pa.RecordBatch.from_arrays(
        [pa.array(images, pa.binary()), pa.array(captions, pa.list_(pa.string())),
         pa.array(image_ids, pa.string()), pa.array(splits, pa.string())],
        schema=VILT_SCHEMA,
    )
