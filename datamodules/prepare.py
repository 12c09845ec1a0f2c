"""Raw images + Karpathy split JSON -> ViLT-format arrow files, streamed (your own
pictures and captions: ``captions=FILE``, see datamodules.custom).

    python -m datamodules.prepare --dataset coco --raw-root /data/coco --data-root /data/coco_arrow
    python run.py prepare_data with dataset=coco raw_root=/data/coco data_root=/data/coco_arrow

Writes ``{f30k,coco}_caption_karpathy_<split>.arrow`` for every Karpathy split (F30K:
train, val, test; COCO: train, restval, val, test): one row per image in Karpathy JSON
order, its sentences in file order, ``image_id`` = the file name. Memory stays flat:
the JSON is parsed one record at a time and images go out in bounded record batches.

Two passes over the JSON: the first checks every record and that every image file is
there (nothing is written when one is missing, unless ``skip_missing_images``), the
second writes all pending splits at once. Each file is written under a temporary name
and renamed when complete; splits whose file is already complete are skipped.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import pyarrow as pa
from tqdm import tqdm

from datamodules.arrow import REQUIRED_COLUMNS, DataError, check_prepare_folders, one_line
from datamodules.custom import prepare_custom
from datamodules.karpathy import iter_images
from datamodules.writer import ArrowWriter, remove_stale_temporaries

PROTOCOL_CAPTIONS = 5  # the test protocol's captions per image (Karpathy splits)
SHOW_FIRST = 3  # missing images named in the error


@dataclass(frozen=True)
class Source:
    json_name: str  # the Karpathy split file, looked for in raw_root
    json_dataset: str  # its top-level "dataset" field
    splits: tuple  # Karpathy splits, each written to its own arrow file
    image_folder: str | None  # F30K: images in raw_root/<folder> (or raw_root itself)


SOURCES = {
    "f30k": Source("dataset_flickr30k.json", "flickr30k", ("train", "val", "test"), "flickr30k-images"),
    "coco": Source("dataset_coco.json", "coco", ("train", "restval", "val", "test"), None),
}


def arrow_path(data_root: str, dataset: str, split: str) -> str:
    return os.path.join(data_root, f"{dataset}_caption_karpathy_{split}.arrow")


def image_locator(dataset: str, raw_root: str):
    """record -> (image path, path relative to raw_root). COCO: raw_root/filepath/filename;
    F30K: raw_root/flickr30k-images/filename, or raw_root/filename without that folder."""
    folder = SOURCES[dataset].image_folder
    if folder is None or not os.path.isdir(os.path.join(raw_root, folder)):
        folder = ""

    def locate(record: dict) -> tuple[str, str]:
        relative = os.path.join(record.get("filepath") or folder, record["filename"])
        return os.path.join(raw_root, relative), relative

    return locate


@dataclass
class Survey:
    """What the first pass over the JSON found (flat in size: counts and a few names)."""
    images: dict = field(default_factory=dict)  # split -> images whose file is there
    captions: dict = field(default_factory=dict)  # split -> their captions
    missing: int = 0
    missing_examples: list = field(default_factory=list)
    few_captions: int = 0  # images with fewer than PROTOCOL_CAPTIONS captions
    few_captions_example: str = ""


def _record_fields(record, index: int, json_path: str, splits) -> tuple[str, str, list[str]]:
    """(filename, split, captions) of one record, checked."""
    where = f"{json_path}, image #{index}"
    if not isinstance(record, dict):
        raise DataError(f"{where} is not an object; use the Karpathy split file unchanged")
    ident = record.get("filename", record.get("imgid", "?"))
    where = f"{json_path}, image #{index} ({ident})"
    for key, kind in (("filename", str), ("split", str), ("sentences", list)):
        if not isinstance(record.get(key), kind):
            raise DataError(f"{where} lacks a {kind.__name__} '{key}'; use the Karpathy split file unchanged")
    if record["split"] not in splits:
        raise DataError(f"{where} has split {record['split']!r}, expected one of {list(splits)}; "
                        f"is this the split file of the right dataset?")
    captions = []
    for sentence in record["sentences"]:
        if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
            raise DataError(f"{where} has a sentence without a 'raw' string; use the Karpathy split file unchanged")
        captions.append(sentence["raw"])
    return record["filename"], record["split"], captions


def survey(dataset: str, json_path: str, raw_root: str) -> Survey:
    """First pass: check every record and that its image file exists."""
    source, locate = SOURCES[dataset], image_locator(dataset, raw_root)
    found = Survey(images=dict.fromkeys(source.splits, 0), captions=dict.fromkeys(source.splits, 0))
    meta: dict = {}
    for index, record in enumerate(iter_images(json_path, meta)):
        filename, split, captions = _record_fields(record, index, json_path, source.splits)
        path, relative = locate(record)
        if not os.path.isfile(path):
            found.missing += 1
            if len(found.missing_examples) < SHOW_FIRST:
                found.missing_examples.append(relative)
            continue
        found.images[split] += 1
        found.captions[split] += len(captions)
        if len(captions) < PROTOCOL_CAPTIONS:
            found.few_captions += 1
            found.few_captions_example = found.few_captions_example or f"{filename} ({len(captions)})"
    if meta.get("dataset", source.json_dataset) != source.json_dataset:
        raise DataError(f"{json_path} is the split file of {meta['dataset']!r}, not {source.json_dataset!r}; "
                        f"pass {source.json_name} for dataset={dataset}")
    return found


def _is_complete(path: str, rows: int) -> bool:
    """A finished file of this split: an arrow file with the ViLT columns and ``rows`` rows."""
    if not os.path.isfile(path):
        return False
    try:
        reader = pa.ipc.open_file(pa.memory_map(path, "r"))
        num_rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (pa.ArrowInvalid, OSError):
        return False
    return num_rows == rows and all(name in reader.schema.names for name in REQUIRED_COLUMNS)


def _read_image(path: str, filename: str, json_path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise DataError(f"cannot read image {filename} at {path} (listed in {json_path}): "
                        f"{one_line(error)}; restore the file or pass --skip-missing-images") from error


def write_splits(dataset: str, json_path: str, raw_root: str, targets: dict, total: int,
                 progress: bool = True, batch_rows: int | None = None) -> dict:
    """Second pass: stream every image of the splits in ``targets`` (split -> arrow path)
    into its file, in JSON order. Images whose file is absent are left out (the survey
    has already refused them unless skipping was asked for). Returns split -> rows."""
    source, locate = SOURCES[dataset], image_locator(dataset, raw_root)
    options = {} if batch_rows is None else {"batch_rows": batch_rows}
    bar = tqdm(total=total, unit="img", desc=f"writing {dataset} {'+'.join(targets)}",
               disable=not progress, dynamic_ncols=True, mininterval=1.0)
    with ExitStack() as stack:
        stack.callback(bar.close)
        writers = {split: stack.enter_context(ArrowWriter(path, **options)) for split, path in targets.items()}
        for index, record in enumerate(iter_images(json_path)):
            filename, split, captions = _record_fields(record, index, json_path, source.splits)
            if split not in writers:
                continue
            path, _ = locate(record)
            if not os.path.isfile(path):
                continue
            writers[split].write(_read_image(path, filename, json_path), captions, filename, split)
            bar.update(1)
    return {split: writer.count for split, writer in writers.items()}


def prepare_dataset(dataset: str, raw_root: str, data_root: str, skip_missing_images: bool = False, *,
                    captions: str | None = None, karpathy_json: str | None = None, progress: bool = True,
                    batch_rows: int | None = None, **custom) -> dict:
    """Write the arrow files of ``dataset`` into ``data_root``: f30k or coco from
    ``raw_root`` (images and the Karpathy JSON), or with ``captions`` (your captions
    file) any other name from your own pictures (datamodules.custom; ``custom``:
    image_column, caption_column, val_images, test_images, seed). Returns a summary:
    per split the file, its images and captions and whether it was written now."""
    if captions is not None:
        return prepare_custom(dataset, raw_root, data_root, captions, skip_missing_images=skip_missing_images,
                              batch_rows=batch_rows, progress=progress, **custom)
    return prepare_karpathy(dataset, raw_root, data_root, skip_missing_images, karpathy_json=karpathy_json,
                            progress=progress, batch_rows=batch_rows)


def prepare_karpathy(dataset: str, raw_root: str, data_root: str, skip_missing_images: bool = False, *,
                     karpathy_json: str | None = None, progress: bool = True,
                     batch_rows: int | None = None) -> dict:
    """f30k or coco from the Karpathy JSON; splits whose file is complete are skipped."""
    if dataset not in SOURCES:
        raise DataError(f"dataset={dataset!r} cannot be prepared without captions=FILE (a CSV, TSV, JSON Lines, "
                        f"COCO JSON or Flickr8K token file of your captions); the built-in ones are {sorted(SOURCES)}")
    source = SOURCES[dataset]
    images = "flickr30k-images/" if dataset == "f30k" else "train2014/, val2014/"
    check_prepare_folders(raw_root, data_root, f"holding {source.json_name} and the images ({images})")
    json_path = karpathy_json or os.path.join(raw_root, source.json_name)
    if not os.path.isfile(json_path):
        raise DataError(f"missing Karpathy split file {json_path}: put {source.json_name} (from "
                        f"Karpathy's caption_datasets.zip) there or pass its path (--karpathy-json)")
    start = time.time()
    print(f"checking {json_path} and the images under {raw_root}", flush=True)
    found = survey(dataset, json_path, raw_root)
    if found.missing and not skip_missing_images:
        raise DataError(
            f"{found.missing} image(s) listed in {json_path} are missing under {raw_root} (first: "
            f"{', '.join(found.missing_examples)}); fix raw_root or pass skip_missing_images=True "
            f"(--skip-missing-images) to leave them out; nothing was written"
        )
    if found.missing:
        print(f"skipping {found.missing} missing image(s), first: {', '.join(found.missing_examples)}")
    if found.few_captions:
        print(f"note: {found.few_captions} image(s) have fewer than {PROTOCOL_CAPTIONS} captions "
              f"(first: {found.few_captions_example}); in a test split they need captions_per_image=None")

    os.makedirs(data_root, exist_ok=True)
    paths = {split: arrow_path(data_root, dataset, split) for split in source.splits}
    targets = {}
    for split, path in paths.items():
        if not _is_complete(path, found.images[split]):
            remove_stale_temporaries(path)
            targets[split] = path
    written = {}
    if targets:
        total = sum(found.images[split] for split in targets)
        written = write_splits(dataset, json_path, raw_root, targets, total, progress, batch_rows)
        for split, rows in written.items():
            if rows != found.images[split]:
                raise DataError(f"{paths[split]}: wrote {rows} images, {json_path} lists "
                                f"{found.images[split]}; did images change during the run? Run again")
    splits = {split: {"file": paths[split], "images": found.images[split],
                      "captions": found.captions[split], "written": split in written}
              for split in source.splits}
    for split, info in splits.items():
        print(f"{dataset} {split}: {info['images']} images, {info['captions']} captions -> {info['file']}"
              f"{'' if info['written'] else ' (already complete, skipped)'}")
    return {"dataset": dataset, "raw_root": raw_root, "data_root": data_root, "karpathy_json": json_path,
            "splits": splits, "skipped_missing_images": found.missing,
            "seconds": round(time.time() - start, 1)}


def _count_or_fraction(text: str):
    return float(text) if any(c in text for c in ".eE") else int(text)


def add_custom_arguments(parser) -> None:
    """The flags of your own captions: the same keys as prepare_data's config keys."""
    parser.add_argument("--captions", help="your captions: CSV/TSV with a header, JSON Lines, COCO caption "
                                           "JSON or a Flickr8K/Flickr30K token file (Flickr8k.token.txt); "
                                           "image paths relative to RAW_ROOT")
    parser.add_argument("--image-column", default="image", help="the column/field of the image path")
    parser.add_argument("--caption-column", default="caption", help="the column/field of the caption")
    parser.add_argument("--val-images", type=_count_or_fraction, default=0.05,
                        help="without a split column: val pictures (a count, or a fraction such as 0.05)")
    parser.add_argument("--test-images", type=_count_or_fraction, default=0.05,
                        help="without a split column: test pictures (a count or a fraction)")
    parser.add_argument("--seed", type=int, default=0, help="without a split column: the split's seed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.prepare",
        description="Write the ViLT-format arrow files of Flickr30K or MSCOCO (Karpathy splits) "
                    "from the raw images and the Karpathy split JSON.")
    parser.add_argument("--dataset", required=True,
                        help=f"{' or '.join(sorted(SOURCES))} (Karpathy splits), or a name of your own with --captions")
    parser.add_argument("--raw-root", required=True,
                        help="folder with dataset_{flickr30k,coco}.json and the images "
                             "(flickr30k-images/ or train2014/ + val2014/)")
    parser.add_argument("--data-root", required=True, help="folder to write the arrow files into")
    parser.add_argument("--skip-missing-images", action="store_true",
                        help="leave out images listed in the JSON whose file is absent")
    parser.add_argument("--karpathy-json", help="the split file, if not RAW_ROOT/dataset_<name>.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_custom_arguments(parser)
    args = parser.parse_args(argv)
    custom = {} if args.captions is None else {
        "image_column": args.image_column, "caption_column": args.caption_column,
        "val_images": args.val_images, "test_images": args.test_images, "seed": args.seed}
    try:
        prepare_dataset(args.dataset, args.raw_root, args.data_root, args.skip_missing_images,
                        karpathy_json=args.karpathy_json, progress=not args.no_progress,
                        captions=args.captions, **custom)
    except DataError as error:  # one line on stderr, exit status 2 (as for a usage error)
        parser.exit(2, f"error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
