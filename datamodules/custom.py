"""Your own pictures and captions -> ``NAME_caption_{train,val,test}.arrow``.

    python run.py prepare_data with dataset=NAME raw_root=DIR captions=FILE data_root=OUT

The captions (datamodules.captions) are grouped by picture: one arrow row per picture,
in the order of its first caption, its captions in file order, ``image_id`` = its path
relative to raw_root. A ``split`` column is honoured; without one the pictures are split
by a hash of (seed, image path), so the split depends on neither the row order nor the
run, and it is recorded in ``NAME_split.json`` beside the arrow files: preparing again
(with the same seed and counts) keeps every recorded picture in its split, so pictures
added later go to train and never move a test picture into training.

Every problem stops the run before anything is renamed into place: the three files are
written together (ArrowWriter, atomic) and a bad image met while writing removes them all.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

from PIL import Image
from tqdm import tqdm

from datamodules.arrow import DataError, check_prepare_folders, custom_file, custom_name_problem, one_line
from datamodules.atomic import atomic_file
from datamodules.captions import SPLIT_COLUMN, SPLITS, read_captions
from datamodules.writer import ArrowWriter, remove_stale_temporaries

SPLIT_FILE = "{dataset}_split.json"


@dataclass
class Picture:
    row: int  # its first caption's row (named in its errors)
    split: str | None
    captions: list = field(default_factory=list)


@dataclass
class Grouped:
    pictures: dict = field(default_factory=dict)  # image path -> Picture, in first-caption order
    has_split: bool = False
    missing: int = 0
    missing_example: str = ""


def group_rows(rows, captions: str, raw_root: str, skip_missing_images: bool) -> Grouped:
    """One pass over the caption rows: group them by picture, check splits agree and each
    picture's file is there (the first missing one stops the run unless skipping)."""
    found = Grouped()
    for number, row in enumerate(rows):
        if number == 0:
            found.has_split = row.split is not None
        where = f"{captions} row {row.row}"
        if (row.split is not None) != found.has_split:
            raise DataError(f"{where}: {'a' if row.split else 'no'} {SPLIT_COLUMN} value, unlike the first row; "
                            f"give every row a split or none")
        if row.image not in found.pictures:
            if not os.path.isfile(os.path.join(raw_root, row.image)):
                found.missing += 1
                found.missing_example = found.missing_example or f"{where}: {row.image}"
                if not skip_missing_images:
                    raise DataError(f"{where}: image {row.image} not found under raw_root={raw_root}; fix the "
                                    f"path or raw_root, or pass skip_missing_images=True to leave it out")
                found.pictures[row.image] = None  # missing: its other rows are skipped too
                continue
            found.pictures[row.image] = Picture(row.row, row.split)
        picture = found.pictures[row.image]
        if picture is not None and picture.split != row.split:
            raise DataError(f"{where}: {row.image} is in split {row.split!r} here and {picture.split!r} at row "
                            f"{picture.row}; a picture belongs to one split")
        if picture is not None:
            picture.captions.append(row.caption)
    found.pictures = {image: p for image, p in found.pictures.items() if p is not None}
    return found


def resolve_count(value, pictures: int, key: str) -> int:
    """val_images / test_images: a count, or a fraction (0 < f < 1) of the pictures."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
            isinstance(value, float) and value >= 1):
        raise DataError(f"{key}={value!r} is not valid; pass a count >= 1 or a fraction between 0 and 1")
    return int(value) if isinstance(value, int) else max(1, round(value * pictures))


def _rank(seed, image: str) -> str:
    return hashlib.sha256(f"{seed}\0{image}".encode("utf-8")).hexdigest()


def hashed_split(images, seed, val_images: int, test_images: int, recorded: dict | None = None) -> dict:
    """image -> split: the recorded pictures keep theirs; the others, ordered by the hash
    of (seed, path), fill val then test up to the counts, the rest is train."""
    recorded = recorded or {}
    assigned = {image: recorded[image] for image in images if image in recorded}
    wanted = {"val": val_images, "test": test_images}
    for split in assigned.values():
        if split in wanted:
            wanted[split] -= 1
    for image in sorted((i for i in images if i not in assigned), key=lambda i: _rank(seed, i)):
        split = next((s for s in ("val", "test") if wanted[s] > 0), "train")
        wanted[split] = wanted.get(split, 0) - 1  # train's count goes negative: unbounded
        assigned[image] = split
    return assigned


def _read_split_file(path: str, settings: dict) -> dict | None:
    """image -> split from an earlier run with the same settings (None: none or others)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
        if {key: record.get(key) for key in settings} != settings:
            print(f"note: {path} records another seed or val/test counts; the split is drawn afresh")
            return None
        return {image: split for split in ("val", "test") for image in record[split]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not a split file written by prepare_data ({one_line(error)}); "
                        f"delete it to draw the split afresh") from None


def _write_split_file(path: str, settings: dict, splits: dict) -> None:
    record = dict(settings, val=[i for i, s in splits.items() if s == "val"],
                  test=[i for i, s in splits.items() if s == "test"])
    with atomic_file(path, "w") as handle:
        json.dump(record, handle, indent=1)


def _image_bytes(raw_root: str, image: str, where: str) -> bytes:
    """The file's bytes, once they are known to decode (a broken picture would only fail
    in the middle of training)."""
    try:
        with open(os.path.join(raw_root, image), "rb") as handle:
            data = handle.read()
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"{where}: image {image} does not decode ({one_line(error)}); replace the file "
                        f"or remove its rows") from None
    return data


def write_pictures(found: Grouped, splits: dict, raw_root: str, targets: dict, captions: str,
                   batch_rows: int | None = None, progress: bool = True, dataset: str = "") -> dict:
    """Stream every picture into its split's file, all three files together: any error
    leaves none of them (a progress bar of pictures unless ``progress`` is False). Returns
    split -> (pictures, captions)."""
    options = {} if batch_rows is None else {"batch_rows": batch_rows}
    counts = {split: [0, 0] for split in targets}
    with ExitStack() as stack:
        writers = {split: stack.enter_context(ArrowWriter(path, **options)) for split, path in targets.items()}
        bar = stack.enter_context(tqdm(total=len(found.pictures), unit="img", desc=f"writing {dataset}",
                                       disable=not progress, dynamic_ncols=True, mininterval=1.0))
        for image, picture in found.pictures.items():
            split = splits[image]
            data = _image_bytes(raw_root, image, f"{captions} row {picture.row}")
            writers[split].write(data, picture.captions, image, split)
            counts[split][0] += 1
            counts[split][1] += len(picture.captions)
            bar.update()
    return counts


def assign_splits(found: Grouped, dataset: str, data_root: str, seed, val_images, test_images, captions: str):
    """image -> split (the file's own, or the recorded / hashed one) and the split file
    to write (None with a split column)."""
    if found.has_split:
        splits = {image: picture.split for image, picture in found.pictures.items()}
        record = None
    else:
        total = len(found.pictures)
        settings = {"seed": seed, "val_images": val_images, "test_images": test_images}
        val, test = (resolve_count(value, total, key) for key, value in
                     (("val_images", val_images), ("test_images", test_images)))
        if val + test >= total:
            raise DataError(f"{captions}: {total} picture(s) cannot give {val} val and {test} test pictures and "
                            f"keep some for training; lower val_images / test_images")
        record = (os.path.join(data_root, SPLIT_FILE.format(dataset=dataset)), settings)
        splits = hashed_split(list(found.pictures), seed, val, test, _read_split_file(*record))
    for split in SPLITS:
        if split not in splits.values():
            raise DataError(f"{captions}: no picture in the {split} split; every split needs one "
                            f"(fix the {SPLIT_COLUMN} column, or raise val_images / test_images)")
    return splits, record


def prepare_custom(dataset: str, raw_root: str, data_root: str, captions: str, *, image_column="image",
                   caption_column="caption", val_images=0.05, test_images=0.05, seed=0,
                   skip_missing_images=False, batch_rows: int | None = None, progress: bool = True) -> dict:
    """Write ``NAME_caption_{train,val,test}.arrow`` into data_root from the pictures under
    raw_root and the captions file. Returns the summary prepare_dataset returns."""
    problem = custom_name_problem(dataset)
    if problem:
        raise DataError(problem)
    check_prepare_folders(raw_root, data_root, f"the image paths in {captions} are relative to")
    start = time.time()
    rows = read_captions(captions, image_column, caption_column)
    found = group_rows(rows, captions, raw_root, skip_missing_images)
    if found.missing:
        print(f"skipping {found.missing} missing image(s), first: {found.missing_example}")
    splits, record = assign_splits(found, dataset, data_root, seed, val_images, test_images, captions)
    targets = {split: custom_file(data_root, dataset, split) for split in SPLITS}
    for path in targets.values():
        remove_stale_temporaries(path)
    counts = write_pictures(found, splits, raw_root, targets, captions, batch_rows, progress, dataset)
    if record:
        _write_split_file(record[0], record[1], splits)
    summary = {split: {"file": targets[split], "images": counts[split][0], "captions": counts[split][1],
                       "written": True} for split in SPLITS}
    for split, info in summary.items():
        print(f"{dataset} {split}: {info['images']} images, {info['captions']} captions -> {info['file']}")
    return {"dataset": dataset, "raw_root": raw_root, "data_root": data_root, "captions": captions,
            "splits": summary, "split_file": record[0] if record else None,
            "skipped_missing_images": found.missing, "seconds": round(time.time() - start, 1)}
