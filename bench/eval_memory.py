"""Peak host memory (and time) of a Flickr30K-size evaluation on random features.

    python bench/eval_memory.py                            # CPU: 1000 x 5000, 250 captions scored
    python bench/eval_memory.py --score-captions 250,500   # one process each: RSS vs scored pairs
    python bench/eval_memory.py --device cuda --score-captions 5000

Builds the features an evaluation holds (three levels, R 784/196/49, D 768, captions of
8-32 tokens padded to 32) in the storage dtype, then runs the evaluation path of
hat.models.hat.evaluation: level_similarities -> sum -> recall and per-level recall on the full
[N_images, N_captions] matrix. On CPU a full Flickr30K score takes many minutes, so by
default only the first --score-captions captions are scored (the rest of the matrix is
filled by repeating that block; the tiles, and so the working memory, are the same) and
the full time is extrapolated. Peak RSS is resource.getrusage's ru_maxrss.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hat.models.hat.model import summed_scores  # noqa: E402
from hat.evaluation import recall  # noqa: E402
from hat.models.hat.evaluation import level_metrics, level_similarities  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class RandomScorer:
    """Stands in for a HAT model on random features: its ``score`` is HAT's."""

    def __init__(self, direction):
        self.direction = direction

    def score(self, image_features, caption_features, caption_lengths, image_tile=None, caption_tile=None):
        return summed_scores(image_features, caption_features, caption_lengths, self.direction, 9.0,
                             image_tile, caption_tile)


def rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def random_features(n, shape, dtype, device, generator, chunk=64):
    """[n, *shape] standard normal in ``dtype``, generated in chunks (no fp32 copy)."""
    out = torch.empty(n, *shape, dtype=dtype, device=device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        out[start:stop] = torch.randn(stop - start, *shape, generator=generator).to(device, dtype)
    return out


def run_one(args):
    device, dtype = torch.device(args.device), DTYPES[args.feature_dtype]
    g = torch.Generator().manual_seed(0)
    start_rss = rss_gib()
    lengths = torch.randint(8, args.max_len + 1, (args.captions,), generator=g)
    images = [random_features(args.images, (r, args.dim), dtype, device, g) for r in args.levels]
    captions = []
    pad = (torch.arange(args.max_len)[None, :] >= lengths[:, None]).to(device)
    for _ in args.levels:
        level = random_features(args.captions, (args.max_len, args.dim), dtype, device, g)
        captions.append(level.masked_fill_(pad[:, :, None], 0.0))
    feature_gib = sum(t.numel() * t.element_size() for t in images + captions) / 2**30
    features_rss = rss_gib()
    scored = min(args.score_captions, args.captions)
    sub = {"images": images, "captions": [c[:scored] for c in captions],
           "lengths": lengths[:scored].to(device)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    began = time.perf_counter()
    levels = level_similarities(RandomScorer(args.direction), sub, args.image_tile,
                                args.caption_tile)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    repeats = -(-args.captions // scored)
    levels = [level.repeat(1, repeats)[:, :args.captions] for level in levels]
    sims = levels[0]
    for level in levels[1:]:
        sims = sims + level
    metrics = recall(sims)
    metrics.update(level_metrics(levels))
    full = seconds * args.captions / scored
    print(f"{args.images} images x {args.captions} captions, levels R {args.levels}, D {args.dim}, "
          f"{args.feature_dtype} features on {args.device}, direction {args.direction}: "
          f"scored {args.images} x {scored} in {seconds:.1f} s "
          f"(full {args.images} x {args.captions}: {full:.1f} s"
          f"{' extrapolated' if scored < args.captions else ''}); features {feature_gib:.2f} GiB; "
          f"RSS start {start_rss:.2f} GiB, with features {features_rss:.2f} GiB, "
          f"peak {peak_rss_gib():.2f} GiB (scoring + recall working set "
          f"{peak_rss_gib() - features_rss:+.2f} GiB)"
          + (f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
             if device.type == "cuda" else "") + f"; rsum {metrics['rsum']:.1f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--levels", default="784,196,49")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--feature-dtype", choices=sorted(DTYPES), default="fp16",
                        help="storage dtype (fp16 is evaluate's default on CUDA)")
    parser.add_argument("--direction", default="i2t", choices=["i2t", "t2i"])
    parser.add_argument("--score-captions", default="250",
                        help="captions scored; a comma-separated list runs one process each")
    parser.add_argument("--image-tile", type=int, default=None)
    parser.add_argument("--caption-tile", type=int, default=None)
    args = parser.parse_args(argv)
    args.levels = [int(r) for r in args.levels.split(",")]
    counts = [int(c) for c in args.score_captions.split(",")]
    if len(counts) > 1:
        argv = sys.argv[1:] if argv is None else list(argv)
        keep = [a for i, a in enumerate(argv) if a != "--score-captions"
                and (i == 0 or argv[i - 1] != "--score-captions")]
        for count in counts:
            subprocess.run([sys.executable, os.path.abspath(__file__), *keep,
                            "--score-captions", str(count)], check=True)
        return
    args.score_captions = counts[0]
    with torch.no_grad():
        run_one(args)


if __name__ == "__main__":
    main()
