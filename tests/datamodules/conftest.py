"""Miniature raw Flickr30K and MSCOCO: generated JPEGs plus Karpathy-style split JSON."""
import io
import json
import os

from PIL import Image

# F30K: 30 images, JSON order interleaves the splits: 20 train, 5 val, 5 test
F30K_SPLITS = ["train", "test", "train", "train", "val", "train"] * 5
# COCO: 36 images: 12 train (train2014), 12 restval, 6 val, 6 test (val2014)
COCO_SPLITS = ["train", "restval", "val", "train", "restval", "test"] * 6


def colour(index: int) -> tuple:
    return (index * 7 % 256, 255 - index * 5 % 256, (index * 37) % 256)


def jpeg(rgb, size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def caption_count(index: int) -> int:
    return 5 + (index % 4 == 1) + (index % 7 == 0)  # 5, 6 or 7, like COCO's few extras


def make_raw(root, dataset: str, image_folder: bool = True) -> list[dict]:
    """Write images and dataset_{flickr30k,coco}.json under root; returns the records."""
    root = str(root)
    records = []
    splits = F30K_SPLITS if dataset == "f30k" else COCO_SPLITS
    for index, split in enumerate(splits):
        if dataset == "f30k":
            record = {"filename": f"{1000 + index}.jpg", "imgid": index}
            folder = os.path.join(root, "flickr30k-images") if image_folder else root
        else:
            filepath = "train2014" if split == "train" else "val2014"
            cocoid = 500 + index
            record = {"filepath": filepath, "filename": f"COCO_{filepath}_{cocoid:012d}.jpg",
                      "imgid": index, "cocoid": cocoid}
            folder = os.path.join(root, filepath)
        count = caption_count(index)
        record.update(split=split, sentids=list(range(10 * index, 10 * index + count)), sentences=[
            {"raw": f"{dataset} image {index} caption {k}.", "tokens": [dataset, "image", str(index)],
             "imgid": index, "sentid": 10 * index + k} for k in range(count)])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, record["filename"]), "wb") as handle:
            handle.write(jpeg(colour(index), size=(24 + index % 3, 16)))
        records.append(record)
    name = {"f30k": "flickr30k", "coco": "coco"}[dataset]
    with open(os.path.join(root, f"dataset_{name}.json"), "w") as handle:
        json.dump({"images": records, "dataset": name}, handle)
    return records


def image_path(root, dataset: str, record: dict, image_folder: bool = True) -> str:
    if dataset == "coco":
        return os.path.join(str(root), record["filepath"], record["filename"])
    return os.path.join(str(root), "flickr30k-images" if image_folder else "", record["filename"])
