"""Your own captions, read from CSV/TSV, JSON Lines, COCO caption JSON, a Karpathy split
file or a Flickr8K/Flickr30K token file, as one stream of `CaptionRow` (image path,
caption, split or None, row).

Every reader checks what it can see in one row and stops at the first bad one with a
one-line DataError "<file> row <n>: <what>; <fix>", so a mistake is found in the file
the user edits, at the row they must fix. Rows are the 1-based data rows (CSV/TSV: the
header is row 1, as a spreadsheet numbers them; JSON Lines: the line; COCO: the entry of
``annotations``; Karpathy: the entry of ``images``; token file: the line). CSV, TSV, JSON
Lines and token files are read line by line (memory flat); a .json file is one object and
is loaded whole.
"""
from __future__ import annotations

import csv
import json
import os
import posixpath
import re
from typing import Iterator, NamedTuple

from datamodules.arrow import DataError

SPLITS = ("train", "val", "test")
SPLIT_COLUMN = "split"  # optional; without it the pictures are split by datamodules.custom
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
           ".txt": "token", ".token": "token"}  # Flickr8k.token.txt, Flickr30K's results_20130124.token
COLUMN_FIX = "set image_column=... / caption_column=... to the names your file uses"
TOKEN_LINE = re.compile(r"([^\t#]+)#(\d+)\t(.*)")  # IMAGE#K<TAB>caption, K the caption's number
TOKEN_FIX = ("a line of a Flickr8K/Flickr30K token file is IMAGE#K<TAB>caption (Flickr8k.token.txt); "
             "fix the line, or use a CSV/TSV with a header")


class CaptionRow(NamedTuple):
    image: str  # path relative to raw_root, normalised ('./a.jpg' and 'a.jpg' are one picture)
    caption: str
    split: str | None  # train | val | test, or None when the file has no split column
    row: int


def read_captions(path: str, image_column: str = "image", caption_column: str = "caption") -> Iterator[CaptionRow]:
    """Every caption of ``path`` in file order; the format follows the file's extension."""
    if not os.path.isfile(path):
        raise DataError(f"captions={path} does not exist; pass the CSV, TSV, JSON Lines, COCO JSON or "
                        f"Flickr8K token file of your captions")
    kind = FORMATS.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise DataError(f"captions={path}: unknown format; name it .csv, .tsv, .jsonl, .json "
                        f"(COCO captions or a Karpathy split file) or .txt/.token (Flickr8K/Flickr30K tokens)")
    if kind == "token":
        return _token_rows(path)
    if kind == "json":
        return _json_rows(path)
    if kind == "jsonl":
        return _jsonl_rows(path, image_column, caption_column)
    return _table_rows(path, "\t" if kind == "tsv" else ",", image_column, caption_column)


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, read in binary so that a bad byte names its line."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path} row {number}: not UTF-8 text ({error.reason} at byte {error.start}); "
                                f"save the file as UTF-8") from None


def _make_row(path: str, row: int, image, caption, split) -> CaptionRow:
    """One checked row: an image path, a non-empty caption (text), a known split."""
    where = f"{path} row {row}"
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: no image; give every caption the path of its picture (relative to raw_root)")
    if caption is not None and not isinstance(caption, str):
        raise DataError(f"{where}: a caption of {image} is of type {type(caption).__name__}, not text; "
                        f"write each caption as a string")
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{where}: empty caption for {image}; write the caption or remove the row")
    if split is not None and split not in SPLITS:
        raise DataError(f"{where}: split {split!r} is not one of {list(SPLITS)}; fix the {SPLIT_COLUMN} "
                        f"column (or remove it for a split by picture)")
    return CaptionRow(posixpath.normpath(image.strip().replace(os.sep, "/")), caption.strip(), split, row)


def _table_rows(path: str, delimiter: str, image_column: str, caption_column: str) -> Iterator[CaptionRow]:
    lines = _lines(path)
    reader = csv.reader((text for _, text in lines), delimiter=delimiter)
    header = next(reader, None)
    if not header:
        raise DataError(f"{path} row 1: no header; the first row names the columns ({image_column}, "
                        f"{caption_column}[, {SPLIT_COLUMN}])")
    header = [name.strip() for name in header]
    for column in (image_column, caption_column):
        if column not in header:
            raise DataError(f"{path} row 1: no column {column!r} (columns found: {', '.join(header)}); "
                            f"{COLUMN_FIX}")
    image_at, caption_at = header.index(image_column), header.index(caption_column)
    split_at = header.index(SPLIT_COLUMN) if SPLIT_COLUMN in header else None
    for cells in reader:
        row = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue  # a blank line
        if len(cells) != len(header):
            raise DataError(f"{path} row {row}: {len(cells)} cells, the header has {len(header)}; "
                            f"quote cells that hold a {'tab' if delimiter == chr(9) else 'comma'}")
        split = cells[split_at].strip() if split_at is not None else None
        yield _make_row(path, row, cells[image_at], cells[caption_at], split)


def _jsonl_rows(path: str, image_column: str, caption_column: str) -> Iterator[CaptionRow]:
    """One object a line: the image field and either a caption string or a list of them
    (under caption_column, or under ``captions``)."""
    for row, text in _lines(path):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} row {row}: not JSON ({error.msg}); one object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} row {row}: not a JSON object; one object per line")
        key = caption_column if caption_column in record else "captions"
        for column in (image_column, key):
            if column not in record:
                found = ", ".join(record) or "none"
                raise DataError(f"{path} row {row}: no field {column if column == image_column else caption_column!r} "
                                f"(fields found: {found}); {COLUMN_FIX}")
        captions = record[key] if isinstance(record[key], list) else [record[key]]
        if not captions:
            raise DataError(f"{path} row {row}: empty caption list for {record[image_column]}; "
                            f"write its captions or remove the row")
        for caption in captions:
            yield _make_row(path, row, record[image_column], caption, record.get(SPLIT_COLUMN))


def _token_rows(path: str) -> Iterator[CaptionRow]:
    """Flickr8K's Flickr8k.token.txt (Flickr30K's results_20130124.token alike): no header,
    one ``IMAGE#K<TAB>caption`` a line, IMAGE a file name relative to raw_root; K is not
    used (the captions keep file order). No split: the pictures are split by hash."""
    for row, text in _lines(path):
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        if "\t" not in text:
            raise DataError(f"{path} row {row}: no tab between the image and the caption; {TOKEN_FIX}")
        match = TOKEN_LINE.fullmatch(text)
        if match is None:
            name = text.split("\t", 1)[0]
            raise DataError(f"{path} row {row}: {name!r} does not end in #K (the caption's number, #0 to #4); "
                            f"{TOKEN_FIX}")
        yield _make_row(path, row, match[1], match[3], None)


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save the file as UTF-8") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path} row {error.lineno}: not JSON ({error.msg}, column {error.colno}); "
                        f"fix the file") from None


def _json_rows(path: str) -> Iterator[CaptionRow]:
    """COCO captions (``images`` + ``annotations``) or a Karpathy split file."""
    data = _load_json(path)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        return _coco_rows(path, data)
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
        return _karpathy_rows(path, images)
    found = ", ".join(data) if isinstance(data, dict) else type(data).__name__
    raise DataError(f"{path}: neither COCO captions ('images' + 'annotations') nor a Karpathy split file "
                    f"('images' with 'sentences'); found: {found}")


def _coco_rows(path: str, data: dict) -> Iterator[CaptionRow]:
    files = {}
    for index, image in enumerate(data.get("images") or [], 1):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DataError(f"{path} images row {index}: needs 'id' and 'file_name'; use the COCO caption format")
        files[image["id"]] = image["file_name"]
    for row, note in enumerate(data["annotations"], 1):
        if not isinstance(note, dict) or "image_id" not in note or "caption" not in note:
            found = ", ".join(note) if isinstance(note, dict) else type(note).__name__
            raise DataError(f"{path} row {row}: an annotation needs 'image_id' and 'caption' (found: {found}); "
                            f"use the COCO caption format")
        if note["image_id"] not in files:
            raise DataError(f"{path} row {row}: image_id {note['image_id']!r} is not in 'images'; "
                            f"add it there with its file_name")
        yield _make_row(path, row, files[note["image_id"]], note["caption"], None)


def _karpathy_rows(path: str, images: list) -> Iterator[CaptionRow]:
    """Karpathy's split file for a custom name: its splits (restval joins train)."""
    for row, record in enumerate(images, 1):
        split = record.get("split")
        if split not in KARPATHY_SPLITS:
            raise DataError(f"{path} row {row}: split {split!r} is not one of {sorted(KARPATHY_SPLITS)}; "
                            f"use the Karpathy split file unchanged")
        image = posixpath.join(record.get("filepath") or "", record.get("filename") or "")
        for sentence in record.get("sentences") or []:
            caption = sentence.get("raw") if isinstance(sentence, dict) else None
            yield _make_row(path, row, image if record.get("filename") else "", caption, KARPATHY_SPLITS[split])
