"""ViLT-format arrow files: one row per image (spec data.md).

Columns: ``image`` (JPEG bytes), ``caption`` (list of raw sentences, file order),
``image_id`` (file name) and ``split``. Files are opened memory-mapped; images are
decoded only when asked for. Files written by ViLT, METER or Multi-SEA (pandas-made
tables with extra columns, any row order) load unchanged.
"""
from __future__ import annotations

import io
import os

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
README_HINT = "see README.md, section 'Data'"


class DataError(Exception):
    """Bad or missing input data; the message names the file and the fix."""


def split_paths(data_root: str, dataset: str, split: str) -> list[str]:
    if dataset not in SPLIT_FILES:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {sorted(SPLIT_FILES)}")
    if split not in SPLIT_FILES[dataset]:
        raise DataError(f"unknown split {split!r}; choose one of {sorted(SPLIT_FILES[dataset])}")
    return [os.path.join(data_root, name + ".arrow") for name in SPLIT_FILES[dataset][split]]


def check_data_root(data_root, dataset: str, splits=("train", "val", "test")) -> None:
    """Fail early, in one line, when data_root or one of its arrow files is missing."""
    if not data_root:
        raise DataError(f"data_root is not set: pass data_root=/path/to/arrow/files ({README_HINT})")
    if not os.path.isdir(data_root):
        raise DataError(f"data_root={data_root} is not a directory ({README_HINT})")
    for split in splits:
        for path in split_paths(data_root, dataset, split):
            if not os.path.isfile(path):
                raise DataError(
                    f"missing arrow file {path} for the {dataset} {split} split: write it with "
                    f"the data preparation step or point data_root at it ({README_HINT})"
                )


def _open_table(path: str) -> pa.Table:
    try:
        table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
    except FileNotFoundError as error:
        raise DataError(f"missing arrow file {path} ({README_HINT})") from error
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{path} is not an arrow IPC file ({error}); rewrite it ({README_HINT})") from error
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(
            f"{path} lacks column(s) {missing}; a ViLT arrow file has {list(REQUIRED_COLUMNS)} "
            f"(and split)"
        )
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
            self._captions.extend([list(c) for c in table.column("caption").to_pylist()])
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
        try:
            return Image.open(io.BytesIO(self.image_bytes(index))).convert("RGB")
        except (OSError, ValueError) as error:
            raise DataError(
                f"image {self.image_id(index)} in {self.source(index)} does not decode "
                f"({error}); re-write that arrow file from the original images"
            ) from error


def open_split(data_root: str, dataset: str, split: str) -> ArrowSplit:
    """Public API: the images and captions of ``dataset``'s ``split`` under ``data_root``.

    The returned object has ``len()`` (images), ``image(i)`` (PIL image),
    ``captions(i)`` (list of str) and ``image_id(i)``.
    """
    paths = split_paths(data_root, dataset, split)
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"missing arrow file {path} for the {dataset} {split} split ({README_HINT})")
    return ArrowSplit(paths)
