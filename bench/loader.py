"""Can the data loader keep a training step busy? Images/s of the training loader alone.

    python bench/loader.py                              # 512 JPEGs 500 x 375, HAT's transforms at 224
    python bench/loader.py --workers 0 2 8 --batch 58 --epochs 2
    python bench/loader.py --pin-memory                 # on a CUDA machine: pinned batches too

Writes --images synthetic photographs (smooth colour fields with noise and shapes, JPEG
quality 90, the size of a Flickr30K image) into a ViLT arrow file in a temporary folder,
then iterates the runner's training loader over them (datamodules.datasets.CaptionPairs:
JPEG decode + RandomResizedCrop + flip + normalisation at --size, tokenisation, collation)
for --epochs epochs with each --workers setting, and prints images/s per epoch: the
first epoch includes starting the worker processes; later epochs reuse them (the loader's
persistent_workers). Compare with `python bench/train_step.py step`'s images/s.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def photo(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG that compresses like a photograph (smooth gradients, texture, edges)."""
    from PIL import Image, ImageDraw, ImageFilter

    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(x * rng.uniform(2, 8) + rng.uniform(0, 6)) + np.cos(y * rng.uniform(2, 8)) for _ in range(3)]
    base = (np.stack(channels, axis=2) * 50 + 128 + rng.normal(0, 24, (height, width, 3))).clip(0, 255)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        box = [int(x0), int(y0), int(x0 + rng.integers(20, 160)), int(y0 + rng.integers(20, 160))]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    image = image.filter(ImageFilter.GaussianBlur(0.5))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--size", type=int, default=224, help="training resolution")
    parser.add_argument("--batch", type=int, default=58, help="images per batch (HAT's batch 58)")
    parser.add_argument("--workers", type=int, nargs="+", default=[8], help="loader processes (default: the "
                                                                            "runner's num_workers=8)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--pin-memory", action="store_true", help="also pin each batch (needs CUDA)")
    parser.add_argument("--text-backbone", default="packaged-minilm", help="tokenizer (bert-base-uncased's "
                                                                           "vocabulary, offline)")
    args = parser.parse_args(argv)

    from datamodules import open_split
    from datamodules.datasets import CaptionPairs, pad_id_of, train_loader
    from datamodules.transforms import build_transform
    from datamodules.writer import write_arrow
    from hat.backbones import load_tokenizer

    rng = np.random.default_rng(0)
    captions = ["a person in a red jacket walks a brown dog along a snowy path"] * 5
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        rows = [(photo(rng, args.width, args.height), captions, f"{i:06d}.jpg", "train") for i in range(args.images)]
        write_arrow(os.path.join(root, "f30k_caption_karpathy_train.arrow"), rows)
        size_mb = sum(len(r[0]) for r in rows) / 1e6
        print(f"{args.images} JPEGs {args.width} x {args.height} ({size_mb / args.images * 1000:.0f} kB each) "
              f"written in {time.perf_counter() - start:.1f} s; transforms: HAT's training crops at {args.size} px; "
              f"batch {args.batch}; {os.cpu_count()} CPU cores")
        split = open_split(root, "f30k", "train")
        tokenizer = load_tokenizer(args.text_backbone)
        # one caption per image: an epoch decodes every image once
        dataset = CaptionPairs(split, tokenizer, build_transform("hat", args.size, train=True), 32)
        dataset.pairs = [(image, 0) for image in range(len(split))]
        for workers in args.workers:
            for pin in ([False, True] if args.pin_memory else [False]):
                loader = train_loader(dataset, args.batch, workers, seed=0, pad_id=pad_id_of(tokenizer),
                                      pin_memory=pin)
                rates = []
                for epoch in range(args.epochs):
                    loader.batch_sampler.set_epoch(epoch, 0)
                    start, seen = time.perf_counter(), 0
                    for batch in loader:
                        seen += batch["images"].shape[0]
                    rates.append(seen / (time.perf_counter() - start))
                print(f"  num_workers={workers}{' pin_memory' if pin else ''}: "
                      + ", ".join(f"epoch {e} {rate:.1f} images/s" for e, rate in enumerate(rates)), flush=True)
                del loader
    return 0


if __name__ == "__main__":
    sys.exit(main())
