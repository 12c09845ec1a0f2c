"""Karpathy split files (dataset_flickr30k.json, dataset_coco.json), streamed.

``{"images": [{"filename", "filepath" (COCO), "split", "sentences": [{"raw"}, ...]}, ...],
"dataset": ...}``. ``json.load`` of dataset_coco.json takes over a GB
of Python objects; ``iter_images`` parses one image record at a time instead, in file
order, so memory does not grow with the file.
"""
from __future__ import annotations

import json
import os
import re

from datamodules.arrow import DataError, one_line

CHUNK_CHARS = 1 << 20
_WHITESPACE = re.compile(r"[ \t\n\r]*")


class _JsonStream:
    """Incremental reading of JSON values from a text file, chunk by chunk."""

    def __init__(self, handle, path: str, chunk_chars: int):
        self.handle, self.path, self.chunk_chars = handle, path, chunk_chars
        self.buffer, self.pos, self.consumed, self.eof = "", 0, 0, False
        self.decoder = json.JSONDecoder()

    def _more(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.handle.read(self.chunk_chars)
        except UnicodeDecodeError as error:
            raise self.error(f"not UTF-8 text ({error.reason})") from None
        if not chunk:
            self.eof = True
            return False
        self.consumed += self.pos
        self.buffer, self.pos = self.buffer[self.pos:] + chunk, 0
        return True

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the file), not consumed."""
        while True:
            self.pos = _WHITESPACE.match(self.buffer, self.pos).end()
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self._more():
                return ""

    def expect(self, allowed: str) -> str:
        char = self.peek()
        if not char or char not in allowed:
            raise self.error(f"expected one of {allowed!r}, found {char or 'the end of the file'!r}")
        self.pos += 1
        return char

    def value(self):
        """One complete JSON value (a whole image record, a key, a number...)."""
        self.peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buffer, self.pos)
                if end < len(self.buffer) or self.eof:  # a number may go on in the next chunk
                    self.pos = end
                    return value
            except json.JSONDecodeError as error:
                if self.eof:
                    raise self.error(error.msg) from None
            self._more()

    def error(self, message: str) -> DataError:
        return DataError(
            f"{self.path} is not a valid Karpathy split file ({one_line(message)} at character "
            f"{self.consumed + self.pos}); download dataset_flickr30k.json / dataset_coco.json "
            f"again (Karpathy's caption_datasets.zip) and use it unchanged"
        )


def iter_images(path: str, meta: dict | None = None, chunk_chars: int = CHUNK_CHARS):
    """Yield the image records of a Karpathy split file one at a time, in file order.

    The other top-level fields (``dataset``) are stored into ``meta`` as they are met;
    they are complete once the iteration ends."""
    if not os.path.isfile(path):
        raise DataError(f"missing Karpathy split file {path}: put dataset_flickr30k.json / "
                        f"dataset_coco.json (Karpathy's caption_datasets.zip) there")
    meta = {} if meta is None else meta
    found_images = False
    with open(path, encoding="utf-8") as handle:
        stream = _JsonStream(handle, path, chunk_chars)
        stream.expect("{")
        if stream.peek() == "}":
            stream.expect("}")
        else:
            while True:
                key = stream.value()
                if not isinstance(key, str):
                    raise stream.error("expected a key")
                stream.expect(":")
                if key == "images":
                    found_images = True
                    stream.expect("[")
                    if stream.peek() == "]":
                        stream.expect("]")
                    else:
                        while True:
                            yield stream.value()
                            if stream.expect(",]") == "]":
                                break
                else:
                    meta[key] = stream.value()
                if stream.expect(",}") == "}":
                    break
        if stream.peek():
            raise stream.error("unexpected data after the top-level object")
    if not found_images:
        raise DataError(f"{path} has no 'images' list: it is not a Karpathy split file; use "
                        f"dataset_flickr30k.json / dataset_coco.json from caption_datasets.zip")
