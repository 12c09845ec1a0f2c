"""ViLT-format arrow files: one row per image.

Columns: ``image`` (JPEG bytes), ``caption`` (list of raw sentences, file order),
``image_id`` (file name) and ``split``. Files are opened memory-mapped; images are
decoded only when asked for. Files written by ViLT, METER or Multi-SEA (pandas-made
tables with extra columns, any row order) load unchanged.
"""
from __future__ import annotations

import io
import os
import re

import pyarrow as pa
from PIL import Image

REQUIRED_COLUMNS = ("image", "caption", "image_id")

# dataset -> split -> arrow files (without .arrow), concatenated in this order
SPLIT_FILES = {
    "f30k": {
        "train": ["f30k_caption_karpathy_train"],
        "val": ["f30k_caption_karpathy_val"],
        "test": ["f30k_caption_karpathy_test"],
    },
    "coco": {
        "train": ["coco_caption_karpathy_train", "coco_caption_karpathy_restval"],
        "val": ["coco_caption_karpathy_val"],
        "test": ["coco_caption_karpathy_test"],
    },
    "demo": {
        "train": ["demo_caption_train"],
        "val": ["demo_caption_val"],
        "test": ["demo_caption_test"],
    },
}
CUSTOM_SPLITS = ("train", "val", "test")  # a prepared custom dataset: NAME_caption_<split>.arrow
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
README_HINT = "see README.md, section 'Data'"
PREPARE_COMMAND = ("`python run.py prepare_data with dataset={dataset} raw_root=RAW data_root={data_root}` "
                   "(or `python -m datamodules.prepare`)")
CUSTOM_PREPARE_COMMAND = ("`python run.py prepare_data with dataset={dataset} raw_root=DIR captions=FILE "
                          "data_root={data_root}` (or `python -m datamodules.prepare`)")


class DataError(Exception):
    """Bad or missing input data; the one-line message names the file and the fix."""


def one_line(text) -> str:
    return " ".join(str(text).split())


def check_prepare_folders(raw_root, data_root, raw_holds: str) -> None:
    """prepare_data's two folders: raw_root must be a directory (``raw_holds``: what it
    must hold, for the message) and data_root must be set; else a one-line DataError."""
    if not raw_root or not os.path.isdir(raw_root):
        raise DataError(f"raw_root={raw_root} is not a directory: pass the folder {raw_holds}")
    if not data_root:
        raise DataError("data_root is not set: pass the folder to write the arrow files into")


def custom_name_problem(dataset) -> str | None:
    """Why ``dataset`` cannot name a custom (prepared) dataset, or None. Its name becomes
    part of file names, so it is one plain word; the built-in names keep their files."""
    if dataset in SPLIT_FILES:
        return f"dataset={dataset!r} is a built-in dataset; give your captions another name (dataset=NAME)"
    if not isinstance(dataset, str) or not _NAME.match(dataset):
        return (f"dataset={dataset!r} cannot name a dataset: use letters, digits, '_', '-' or '.' "
                f"(it becomes part of the arrow file names)")
    return None


def custom_file(data_root: str, dataset: str, split: str) -> str:
    return os.path.join(data_root, f"{dataset}_caption_{split}.arrow")


def split_paths(data_root: str, dataset: str, split: str) -> list[str]:
    """The arrow files of ``dataset``'s ``split``: the built-in layouts of SPLIT_FILES, or
    ``NAME_caption_<split>.arrow`` for any other name (what prepare_data writes for
    captions=FILE)."""
    files = SPLIT_FILES.get(dataset)
    if files is None:
        problem = custom_name_problem(dataset)
        if problem:
            raise DataError(problem)
        files = {name: [f"{dataset}_caption_{name}"] for name in CUSTOM_SPLITS}
    if split not in files:
        raise DataError(f"unknown split {split!r}; choose one of {sorted(files)}")
    return [os.path.join(data_root, name + ".arrow") for name in files[split]]


def prepare_command(dataset: str, data_root) -> str:
    """How to write ``dataset``'s arrow files: the Karpathy JSON of a built-in one, a
    captions file of any other."""
    template = PREPARE_COMMAND if dataset in SPLIT_FILES else CUSTOM_PREPARE_COMMAND
    return template.format(dataset=dataset, data_root=data_root)


def _source(dataset: str) -> str:
    return "the Karpathy JSON" if dataset in SPLIT_FILES else "your captions file"


def _check_root(data_root, dataset: str) -> None:
    command = prepare_command(dataset, data_root)
    fix = (f"write the arrow files from the raw images and {_source(dataset)} with {command}, "
           f"or point data_root at the folder that holds them")
    if not data_root:
        raise DataError(f"data_root is not set: pass data_root=/path/to/arrow/files ({README_HINT})")
    if not os.path.exists(data_root):
        raise DataError(f"data_root={data_root} does not exist: {fix} ({README_HINT})")
    if not os.path.isdir(data_root):
        raise DataError(f"data_root={data_root} is not a directory: {fix} ({README_HINT})")
    if not os.listdir(data_root):
        raise DataError(f"data_root={data_root} is empty: {fix} ({README_HINT})")


def _check_file(path: str, dataset: str, split: str, data_root: str) -> None:
    if not os.path.isfile(path):
        command = prepare_command(dataset, data_root)
        raise DataError(f"missing arrow file {path} for the {dataset} {split} split: write it from "
                        f"the raw images and {_source(dataset)} with {command}, or point data_root at "
                        f"the folder that holds it ({README_HINT})")


def check_data_root(data_root, dataset: str, splits=("train", "val", "test")) -> None:
    """Fail early, in one line, when data_root is missing or empty or one of its arrow
    files is missing."""
    _check_root(data_root, dataset)
    for split in splits:
        for path in split_paths(data_root, dataset, split):
            _check_file(path, dataset, split, data_root)


def _read_table(path: str) -> pa.Table:
    """The whole file, memory-mapped (zero copy). Arrow IPC file format; the stream
    format is accepted too."""
    if not os.path.exists(path):
        raise DataError(f"missing arrow file {path} ({README_HINT})")
    try:
        source = pa.memory_map(path, "r")
        try:
            return pa.ipc.open_file(source).read_all()
        except (pa.ArrowInvalid, OSError):
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(
            f"{path} is not an arrow IPC file ({one_line(error)}); delete it and write it again "
            f"with `python -m datamodules.prepare` ({README_HINT})"
        ) from error


def _is_binary(kind) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _is_string(kind) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _open_table(path: str) -> pa.Table:
    """Open ``path`` and check its schema once: the columns the readers use must be there
    with usable types. Extra columns (pandas' ``__index_level_0__``) are ignored."""
    table = _read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(
            f"{path} lacks column(s) {missing}; a ViLT arrow file has {list(REQUIRED_COLUMNS)} "
            f"(and split): write it again with `python -m datamodules.prepare` ({README_HINT})"
        )
    image_type, caption_type = table.schema.field("image").type, table.schema.field("caption").type
    problems = []
    if not _is_binary(image_type):
        problems.append(f"column image is {image_type}, not binary (JPEG bytes)")
    if not ((pa.types.is_list(caption_type) or pa.types.is_large_list(caption_type))
            and _is_string(caption_type.value_type)):
        problems.append(f"column caption is {caption_type}, not list<string>")
    if problems:
        raise DataError(f"{path}: {'; '.join(problems)}; write it again with "
                        f"`python -m datamodules.prepare` ({README_HINT})")
    return table


class ArrowSplit:
    """The images and captions of one split, possibly spread over several arrow files."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        self._images = []  # one pyarrow ChunkedArray per file
        self._rows = []  # global row -> (file index, row in file)
        self._captions: list[list[str]] = []
        self._image_ids: list[str] = []
        for file_index, path in enumerate(self.paths):
            table = _open_table(path)
            self._images.append(table.column("image"))
            self._captions.extend([list(c or ()) for c in table.column("caption").to_pylist()])
            self._image_ids.extend(str(i) for i in table.column("image_id").to_pylist())
            self._rows.extend((file_index, row) for row in range(table.num_rows))

    def __len__(self) -> int:
        return len(self._rows)

    def captions(self, index: int) -> list[str]:
        return self._captions[index]

    def image_id(self, index: int) -> str:
        return self._image_ids[index]

    def source(self, index: int) -> str:
        """The arrow file that holds image ``index``."""
        return self.paths[self._rows[index][0]]

    def image_bytes(self, index: int) -> bytes:
        file_index, row = self._rows[index]
        return self._images[file_index][row].as_py()

    def image(self, index: int) -> Image.Image:
        data = self.image_bytes(index)
        try:
            if not data:
                raise ValueError("no image bytes")
            return Image.open(io.BytesIO(data)).convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(
                f"image {self.image_id(index)} in {self.source(index)} does not decode "
                f"({one_line(error)}); write that arrow file again from the original images "
                f"(`python -m datamodules.prepare`)"
            ) from error


def fewest_captions(data_root: str, dataset: str, split: str) -> tuple[int, str, str] | None:
    """(the smallest caption count of any image, that image's id, its file) over the
    split's arrow files, reading the caption column only; None for an empty split."""
    import pyarrow.compute as pc

    fewest = None
    for path in split_paths(data_root, dataset, split):
        table = _open_table(path)
        if table.num_rows == 0:
            continue
        counts = pc.fill_null(pc.list_value_length(table.column("caption")), 0)
        row = int(pc.index(counts, pc.min(counts)).as_py())
        count = int(counts[row].as_py())
        if fewest is None or count < fewest[0]:
            fewest = (count, str(table.column("image_id")[row].as_py()), path)
    return fewest


def open_split(data_root: str, dataset: str, split: str) -> ArrowSplit:
    """Public API: the images and captions of ``dataset``'s ``split`` under ``data_root``.

    The returned object has ``len()`` (images), ``image(i)`` (PIL image),
    ``captions(i)`` (list of str) and ``image_id(i)``.
    """
    _check_root(data_root, dataset)
    paths = split_paths(data_root, dataset, split)
    for path in paths:
        _check_file(path, dataset, split, data_root)
    return ArrowSplit(paths)
