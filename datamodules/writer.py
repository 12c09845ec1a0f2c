"""Streaming, atomic writer of ViLT-format arrow files."""
from __future__ import annotations

import os

import pyarrow as pa

VILT_SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("caption", pa.list_(pa.string())),
    ("image_id", pa.string()),
    ("split", pa.string()),
])


def write_arrow(path: str, rows, batch_rows: int = 256) -> int:
    """Write rows ``(image_bytes, captions, image_id, split)`` to ``path``.

    Rows are streamed in record batches of ``batch_rows`` so memory does not grow with
    the split. The file is written under a temporary name and renamed when complete:
    an interrupted write never leaves a file that looks finished. Returns the row count.
    """
    tmp_path = f"{path}.tmp-{os.getpid()}"
    count = 0
    try:
        with pa.OSFile(tmp_path, "wb") as sink, pa.ipc.new_file(sink, VILT_SCHEMA) as writer:
            buffer = []
            for row in rows:
                buffer.append(row)
                if len(buffer) == batch_rows:
                    writer.write_batch(_batch(buffer))
                    count += len(buffer)
                    buffer = []
            if buffer:
                writer.write_batch(_batch(buffer))
                count += len(buffer)
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return count


def _batch(rows) -> pa.RecordBatch:
    images, captions, image_ids, splits = zip(*rows)
    return pa.RecordBatch.from_arrays(
        [pa.array(images, pa.binary()), pa.array(captions, pa.list_(pa.string())),
         pa.array(image_ids, pa.string()), pa.array(splits, pa.string())],
        schema=VILT_SCHEMA,
    )
