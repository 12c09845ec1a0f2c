"""Peak memory of the data preparation (raw images + Karpathy JSON -> arrow), N vs 2N images.

    python bench/prepare_data_memory.py              # N = 5000 and 10000, ~30 KB JPEGs
    python bench/prepare_data_memory.py --images 20000 --compare-vilt

For each size it builds a synthetic raw Flickr30K (a flickr30k-images/ folder and a
Karpathy-style dataset_flickr30k.json, five captions per image, all in the train split;
the image files are hard links to a small pool of pre-encoded ~30 KB JPEGs) and runs
``prepare_dataset`` in a fresh subprocess, whose peak RSS (getrusage ru_maxrss) is
printed next to the RSS the interpreter had after its imports. The streaming writer's
peak must stay under 1 GB and must not grow when the split doubles. ``--compare-vilt``
also measures ViLT's way (the whole split in a pandas DataFrame, then one table).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_MB = 1024
FLAT_MB = 32  # "flat": 2N may exceed N by at most this (allocator noise)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def jpeg_pool(count: int = 16, side: int = 224, quality: int = 75) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pool = []
    for _ in range(count):
        pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        pool.append(buffer.getvalue())
    return pool


def make_raw(raw_root: str, images: int, pool: list[bytes]) -> None:
    folder = os.path.join(raw_root, "flickr30k-images")
    os.makedirs(folder)
    pool_paths = []
    for index, data in enumerate(pool):
        pool_paths.append(os.path.join(raw_root, f"pool_{index}.jpg"))
        with open(pool_paths[-1], "wb") as handle:
            handle.write(data)
    records = []
    for index in range(images):
        filename = f"{index:08d}.jpg"
        target = os.path.join(folder, filename)
        try:
            os.link(pool_paths[index % len(pool)], target)
        except OSError:
            shutil.copyfile(pool_paths[index % len(pool)], target)
        sentences = [{"raw": f"A photo number {index} seen from angle {k}.", "imgid": index,
                      "sentid": 5 * index + k, "tokens": ["a", "photo", "number", str(index), "seen",
                                                           "from", "angle", str(k)]} for k in range(5)]
        records.append({"filename": filename, "imgid": index, "split": "train",
                        "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    with open(os.path.join(raw_root, "dataset_flickr30k.json"), "w") as handle:
        json.dump({"images": records, "dataset": "flickr30k"}, handle)


def child(mode: str, raw_root: str, data_root: str) -> None:
    """Runs in its own process: prepare the split, report peak RSS as one JSON line."""
    sys.path.insert(0, ROOT)
    import pyarrow as pa  # noqa: F401  (imports first: their RSS is the baseline)
    import tqdm  # noqa: F401

    from datamodules.prepare import prepare_dataset

    baseline = _peak_rss_mb()
    start = time.time()
    if mode == "streaming":
        summary = prepare_dataset("f30k", raw_root, data_root, progress=False)
        images = summary["splits"]["train"]["images"]
    else:
        images = vilt_pandas_writer(raw_root, data_root)
    seconds = time.time() - start
    size = os.path.getsize(os.path.join(data_root, "f30k_caption_karpathy_train.arrow"))
    print(json.dumps({"images": images, "seconds": seconds, "baseline_mb": baseline,
                      "peak_mb": _peak_rss_mb(), "arrow_mb": size / 2 ** 20}))


def vilt_pandas_writer(raw_root: str, data_root: str) -> int:
    """ViLT's make_arrow for comparison: every row of the split in memory at once."""
    import pandas as pd
    import pyarrow as pa

    with open(os.path.join(raw_root, "dataset_flickr30k.json")) as handle:
        records = json.load(handle)["images"]
    rows = []
    for record in records:
        with open(os.path.join(raw_root, "flickr30k-images", record["filename"]), "rb") as handle:
            rows.append([handle.read(), [s["raw"] for s in record["sentences"]], record["filename"], "train"])
    frame = pd.DataFrame(rows, columns=["image", "caption", "image_id", "split"])
    table = pa.Table.from_pandas(frame)
    os.makedirs(data_root, exist_ok=True)
    with pa.OSFile(os.path.join(data_root, "f30k_caption_karpathy_train.arrow"), "wb") as sink:
        with pa.RecordBatchFileWriter(sink, table.schema) as writer:
            writer.write_table(table)
    return len(rows)


def measure(mode: str, images: int, pool: list[bytes], workdir: str) -> dict:
    raw_root = tempfile.mkdtemp(prefix=f"raw{images}_", dir=workdir)
    data_root = os.path.join(workdir, f"arrow_{mode}_{images}")
    try:
        make_raw(raw_root, images, pool)
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, raw_root, data_root],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"the {mode} writer failed on {images} images:\n{done.stderr}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(raw_root, ignore_errors=True)
        shutil.rmtree(data_root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="N (also runs 2N); at least 5000")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: the system's temp)")
    parser.add_argument("--compare-vilt", action="store_true", help="also measure ViLT's pandas writer")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "RAW", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    pool = jpeg_pool()
    print(f"JPEG pool: {len(pool)} images, mean {sum(map(len, pool)) / len(pool) / 1024:.1f} KB")
    workdir = tempfile.mkdtemp(prefix="hat_bench_", dir=args.workdir)
    modes = ["streaming"] + (["vilt-pandas"] if args.compare_vilt else [])
    results = {}
    try:
        print(f"{'writer':<12} {'images':>7} {'arrow MB':>9} {'s':>6} {'img/s':>7} "
              f"{'RSS after imports MB':>21} {'peak RSS MB':>12}")
        for mode in modes:
            for images in (args.images, 2 * args.images):
                r = measure(mode, images, pool, workdir)
                results[mode, images] = r
                print(f"{mode:<12} {r['images']:>7} {r['arrow_mb']:>9.0f} {r['seconds']:>6.1f} "
                      f"{r['images'] / r['seconds']:>7.0f} {r['baseline_mb']:>21.0f} {r['peak_mb']:>12.0f}",
                      flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    small, large = results["streaming", args.images], results["streaming", 2 * args.images]
    growth = large["peak_mb"] - small["peak_mb"]
    ok = large["peak_mb"] < LIMIT_MB and growth <= FLAT_MB and args.images >= 5000
    print(f"streaming writer: peak RSS {small['peak_mb']:.0f} MB for {args.images} images, "
          f"{large['peak_mb']:.0f} MB for {2 * args.images} (growth {growth:+.0f} MB; limit {LIMIT_MB} MB, "
          f"flat = within {FLAT_MB} MB): {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
