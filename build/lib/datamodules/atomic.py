"""Files that are complete or absent: every file the toolkit writes (arrow files,
checkpoints, feature caches, run configurations, demo metadata) goes through
`atomic_file`."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb"):
    """Write ``path`` atomically: yields a file object on ``<path>.tmp-<pid>`` beside it;
    leaving the block normally flushes, fsyncs and renames it onto ``path``; leaving it
    with an exception (a signal's included) removes the temporary file and leaves
    ``path`` as it was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp_path, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
