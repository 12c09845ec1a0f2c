"""Time hat.models.hat.alignment.scan_similarity against the floor and a literal per-caption loop.

    python bench/similarity.py                          # CPU target case: 100 x 500, R 196/784/49
    python bench/similarity.py --device cuda --images 1000 --captions 5000 --dtype fp16
    python bench/similarity.py --device cuda --three-level --images 5000 --captions 25000 \
        --dtype fp16 --no-literal                       # COCO 5K three-level matrix

For each level shape (R regions, D = 768, captions of 8-32 tokens) and direction, on the
same inputs in the same run:
  floor    one torch.mm of every real token dot product t_w . v_r of the gallery into a
           preallocated output (tiled over images when the output would pass 2^27
           scores): the work any exact method must do.
  scan     scan_similarity with its default tiles.
  literal  SCAN as the paper states it, step by step, one caption at a time (batched over images, context
           vectors materialised), in fp32 and in fp64 as the released code runs it; timed
           on the first --literal-captions / --literal64-captions captions and
           extrapolated linearly to the gallery when fewer (marked with *).
Times are the minimum over --repeat rounds; floor and scan are interleaved in each round
and "median" is the median over rounds of scan / floor in the same round, the figure to
trust on a shared, busy machine. --three-level times the summed three-level matrix (what
evaluation computes) and reports its peak memory.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hat.models.hat.alignment import COS_EPS, LEAKY_SLOPE, NORM_EPS, scan_similarity  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOOR_TILE = 2**27  # scores per floor matmul output
TARGETS = {"i2t": 1.6, "t2i": 2.5}


def make_gallery(n_images, n_captions, regions, dim, min_len, max_len, seed, device, dtype):
    """images [I, R, D], captions [C, max_len, D] (padding zero), lengths [C] in min..max."""
    g = torch.Generator(device=device).manual_seed(seed)  # generated on the device
    images = torch.randn(n_images, regions, dim, generator=g, device=device, dtype=dtype)
    captions = torch.randn(n_captions, max_len, dim, generator=g, device=device, dtype=dtype)
    lengths = torch.randint(min_len, max_len + 1, (n_captions,), generator=g, device=device)
    pad = torch.arange(max_len, device=device)[None, :] >= lengths[:, None]
    return images, captions.masked_fill_(pad[:, :, None], 0.0), lengths


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor_fn(images, captions, lengths):
    """One matmul of the real tokens [T, D] against all regions [I*R, D]."""
    n_images, regions, dim = images.shape
    mask = torch.arange(captions.shape[1], device=captions.device)[None, :] < lengths[:, None]
    tokens = captions[mask]  # [T, D] real tokens only
    regions_flat = images.reshape(-1, dim)
    step = max(regions, (FLOOR_TILE // max(tokens.shape[0], 1)) // regions * regions)
    out = torch.empty(tokens.shape[0], min(step, regions_flat.shape[0]), device=images.device,
                      dtype=images.dtype)

    def run():
        for r0 in range(0, regions_flat.shape[0], step):
            block = regions_flat[r0:r0 + step]
            torch.mm(tokens, block.t(), out=out[:, :block.shape[0]])
    return run


def _leaky(x):
    return F.leaky_relu(x, LEAKY_SLOPE)


def _cos_rows(x, y):
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(COS_EPS)


def literal(images, captions, lengths, direction, lam=9.0):
    """SCAN as the paper states it, step by step, a Python loop over captions -> [I, C]."""
    out = images.new_empty(images.shape[0], captions.shape[0])
    for j, n in enumerate(lengths.tolist()):
        t = captions[j, :n]  # [n, D]
        if direction == "i2t":
            s = images @ t.T  # s_wr  [I, R, n]
            sp = _leaky(s) / (_leaky(s).norm(dim=1, keepdim=True) + NORM_EPS)  # over regions
            a = torch.softmax(lam * sp, dim=2)  # over words
            context = a @ t  # c_r  [I, R, D]
            out[:, j] = _cos_rows(images, context).mean(dim=1)
        else:
            s = t @ images.transpose(1, 2)  # s_rw  [I, n, R]
            sp = _leaky(s) / (_leaky(s).norm(dim=1, keepdim=True) + NORM_EPS)  # over words
            a = torch.softmax(lam * sp, dim=2)  # over regions
            context = a @ images  # c_w  [I, n, D]
            out[:, j] = _cos_rows(t[None], context).mean(dim=1)
    return out


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def bench_level(args, device, dtype, regions):
    images, captions, lengths = make_gallery(args.images, args.captions, regions, args.dim,
                                             args.min_len, args.max_len, args.seed, device, dtype)
    floor = floor_fn(images, captions, lengths)
    times = {"floor": [], **{d: [] for d in args.directions}}
    results = {}
    for _ in range(args.repeat):  # floor and scan interleaved: a busy machine slows both
        times["floor"].append(timed(floor, device)[0])
        for direction in args.directions:
            seconds, results[direction] = timed(
                lambda: scan_similarity(images, captions, lengths, direction), device)
            times[direction].append(seconds)
    rows = []
    for direction in args.directions:
        per_round = sorted(t / f for t, f in zip(times[direction], times["floor"]))
        row = {"R": regions, "dir": direction, "floor": min(times["floor"]),
               "scan": min(times[direction]), "median": per_round[len(per_round) // 2]}
        for key, count, ref_dtype in (("lit32", args.literal_captions, torch.float32),
                                      ("lit64", args.literal64_captions, torch.float64)):
            count = min(count, args.captions)
            if args.no_literal or count <= 0:
                continue
            sub = (images.to(ref_dtype), captions[:count].to(ref_dtype), lengths[:count])
            seconds, ref = timed(lambda: literal(*sub, direction), device)
            row[key] = seconds * args.captions / count
            row[key + "_n"] = count
            if key == "lit64":
                row["err"] = (results[direction][:, :count].double() - ref).abs().max().item()
        rows.append(row)
    return rows


HEADER = (f"{'R':>4} {'dir':>4} {'floor s':>8} {'scan s':>8} {'x floor':>8} {'median':>7} "
          f"{'target':>7} {'lit32 s':>9} {'speedup':>8} {'lit64 s':>9} {'speedup':>8} "
          f"{'max|err|':>9}")


def print_rows(rows, args, notes):
    for r in rows:
        ratio = r["scan"] / r["floor"]
        line = (f"{r['R']:>4} {r['dir']:>4} {r['floor']:8.3f} {r['scan']:8.3f} {ratio:7.2f}x "
                f"{r['median']:6.2f}x {'<=' + str(TARGETS[r['dir']]) + 'x':>7}")
        for key in ("lit32", "lit64"):
            if key in r:
                star = "*" if r[key + "_n"] < args.captions else " "
                if star == "*":
                    notes.add(f"* {key}: timed on {r[key + '_n']} of {args.captions} captions, "
                              f"extrapolated linearly")
                line += f" {r[key]:8.2f}{star} {r[key] / r['scan']:7.1f}x"
            else:
                line += f" {'-':>9} {'-':>8}"
        line += f" {r['err']:9.1e}" if "err" in r else f" {'-':>9}"
        print(line, flush=True)


def three_level(args, device, dtype):
    """Summed three-level matrix of the gallery, as evaluation computes it; the half
    precision result is checked against fp32 on a corner of the gallery."""
    levels = [make_gallery(args.images, args.captions, r, args.dim, args.min_len, args.max_len,
                           args.seed + k, device, dtype) for k, r in enumerate(args.levels)]
    for direction in args.directions:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def run(galleries):
            total = None
            for images, captions, lengths in galleries:
                level = scan_similarity(images, captions, lengths, direction)
                total = level if total is None else total + level
            return total
        seconds, total = timed(lambda: run(levels), device)
        peak = (f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
                if device.type == "cuda" else
                f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
        rows, cols = min(50, args.images), min(250, args.captions)
        corner = [(i[:rows].float(), c[:cols].float(), n[:cols]) for i, c, n in levels]
        error = (total[:rows, :cols] - run(corner)).abs().max().item()
        print(f"three-level {direction} {args.images} x {args.captions} "
              f"(R {'/'.join(map(str, args.levels))}, {args.dtype}): {seconds:.2f} s, {peak}, "
              f"max|{args.dtype} - fp32| on {rows} x {cols}: {error:.1e}, "
              f"finite {bool(torch.isfinite(total).all())}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--captions", type=int, default=500)
    parser.add_argument("--levels", default="196,784,49", help="regions per level, comma-separated")
    parser.add_argument("--directions", default="i2t,t2i")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--min-len", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--literal-captions", type=int, default=100,
                        help="captions timed for the fp32 literal loop (rest extrapolated)")
    parser.add_argument("--literal64-captions", type=int, default=20,
                        help="captions timed for the fp64 literal loop (rest extrapolated)")
    parser.add_argument("--no-literal", action="store_true")
    parser.add_argument("--three-level", action="store_true",
                        help="time the summed three-level matrix instead of the per-level table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.levels = [int(r) for r in args.levels.split(",")]
    args.directions = args.directions.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.images} images x {args.captions} captions, D {args.dim}, caption lengths "
          f"{args.min_len}-{args.max_len}, {args.dtype}, "
          f"{'one run' if args.three_level else f'{args.repeat} rounds'}, load average "
          f"{load}", flush=True)
    with torch.no_grad():
        if args.three_level:
            three_level(args, device, dtype)
            return
        print(HEADER, flush=True)
        notes = set()
        for regions in args.levels:
            print_rows(bench_level(args, device, dtype, regions), args, notes)
        for note in sorted(notes):
            print(note)
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"x floor = min scan / min floor; median = median over rounds of scan / floor in "
              f"the same round; max|err| = vs the fp64 literal; load average now {load}")


if __name__ == "__main__":
    main()
