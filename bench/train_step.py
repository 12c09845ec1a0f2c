"""Training speed and memory: HAT's batch scoring under autograd, and whole training steps.

    python bench/train_step.py                       # (a) scoring, CPU, B = 32, both directions
    python bench/train_step.py scoring --batch 58 --device cuda --budget-gb 80
    python bench/train_step.py step                  # (b) a HAT and a Multi-SEA step, demo configs, CPU
    python bench/train_step.py step --device cuda --paper --precision bf16 fp16
    python bench/train_step.py accumulation          # (c) HAT's batch of 58: 1 x 58 vs exact/split micro-batches
    python bench/train_step.py accumulation --device cuda --paper --precision bf16

(a) scoring: forward + backward of the three-level [B, B] score matrix and the VSE++ loss
(D = 768, R = 784/196/49, captions of 8-32 tokens, the same inputs for every method),
each method in a fresh process:
  recompute   scan_similarity(recompute=True): tiles recomputed in backward (the default)
  keep        scan_similarity(recompute=False): autograd keeps every tile (before issue 15)
  literal     the spec step by step, one caption at a time (bench/similarity.py's literal)
Time is the minimum over --repeat rounds; peak memory is what the process held at its peak
beyond what it held before the inputs were made (CPU: ru_maxrss; CUDA:
max_memory_allocated), so it counts the inputs, their gradients, the scores and the
working set. The largest batch that fits --budget-gb is estimated per method from two
batches (B and B/2) with memory = a*B + b*B^2 (inputs grow with B, score tiles with B^2).

(b) step: a whole optimizer step of HAT and of Multi-SEA through the runner's code (the
plug-in's model and loss, hat.loop.optimizer_step: autocast, GradScaler for fp16,
optimizer): images/s and peak memory; on CUDA also the model FLOPs utilisation: the
step's FLOPs (torch.utils.flop_counter, forward + backward) per second against the
device's peak dense throughput for the precision (--peak-tflops, or a table of known
devices), printed with the peak used.

(c) accumulation: HAT's optimizer step over a batch of 58 (the demo architecture on the
CPU, the paper's with --paper), through the runner's code (the plug-in's model, loss,
encode_batch and loss_from_features; hat.loop.optimizer_step with ``exact=`` as
_Fit.train_step passes it), one row per way of running it, each in a fresh process:
  1 x 58          the whole batch as one micro-batch (the reference)
  exact 4 micro   accumulation=exact, per_gpu_batchsize 15 (15+15+15+13)
  exact 8 micro   accumulation=exact, per_gpu_batchsize 8 (7 x 8 + 2)
  split 8 micro   accumulation=split, per_gpu_batchsize 8 (each micro-batch its own loss)
Time per optimizer step is the minimum over --steps steps after one warm-up step (on the
CPU also the process time, with --threads 1 by default: the work done, whatever else runs); peak
memory as in (b) (beyond what the process held before the model was built, so it counts
the model and the optimizer state), the step's working set (beyond what it held once the
model and the optimizer existed), and the timed steps' own peak: the high-water mark
during them above what the process holds between steps (the model, the optimizer state;
on the CPU after handing free memory back, Linux's clear_refs resetting the mark; on CUDA
max_memory_allocated after reset_peak_memory_stats). Ratio lines compare each row with the 1 x 58
row of the same run; the issue's targets (exact 8 micro: peak memory <= 0.4x, time <=
1.5x the 1 x 58 step's) are printed as met or not, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

LEVEL_REGIONS = (784, 196, 49)
METHODS = ("recompute", "keep", "literal")
TARGET_TIME, TARGET_GB = 1.3, 0.45  # issue 15, B = 32 on the CPU: vs keep, and the scoring's peak


def rss_gb() -> float:
    """This process's peak resident memory so far (GB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def current_rss_gb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def release_free_memory() -> None:
    """Hand the C allocator's free memory back to the system (glibc's malloc_trim), so that
    the resident size is what the process holds, not what it once held."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset this process's resident high-water mark (Linux: clear_refs 5); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_gb() -> float:
    """VmHWM: the resident high-water mark since the last `reset_peak_rss` (GB)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def scoring_inputs(batch, dim, seed, device, dtype=torch.float32):
    """Per level images [B, R, D] and captions [B, 32, D]; one caption length per caption
    (8..32, the same at every level, as a text encoder's layers give); padding zero."""
    g = torch.Generator(device=device).manual_seed(seed)
    lengths = torch.randint(8, 33, (batch,), generator=g, device=device)
    pad = torch.arange(32, device=device)[None, :] >= lengths[:, None]
    images, captions = [], []
    for regions in LEVEL_REGIONS:
        images.append(torch.randn(batch, regions, dim, generator=g, device=device, dtype=dtype).requires_grad_(True))
        words = torch.randn(batch, 32, dim, generator=g, device=device, dtype=dtype)
        captions.append(words.masked_fill_(pad[:, :, None], 0.0).requires_grad_(True))
    return images, captions, lengths


def scoring_worker(args) -> dict:
    """One method, one direction, in this process: time and peak memory of forward +
    backward of the summed three-level scores and the VSE++ loss."""
    from hat.models.hat.alignment import scan_similarity
    from hat.models.hat.loss import vse_loss
    from similarity import literal

    device = torch.device(args.device)
    torch.set_grad_enabled(True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = current_rss_gb()
    images, captions, lengths = scoring_inputs(args.batch, args.dim, args.seed, device)

    def level(v, t):
        if args.method == "literal":
            return literal(v, t, lengths, args.direction)
        return scan_similarity(v, t, lengths, args.direction, recompute=args.method == "recompute")

    times, loss_value = [], None
    for _ in range(args.repeat):
        for tensor in images + captions:
            tensor.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        scores = sum(level(v, t) for v, t in zip(images, captions))
        loss = vse_loss(scores, 0.2, True)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        loss_value = float(loss)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 1e9
    else:
        peak = rss_gb() - base
    grads = [t.grad.double() for t in images + captions]  # after the peak is read (copies)
    return {"time": min(times), "peak_gb": peak, "loss": loss_value,
            "grad_norm": float(sum(g.square().sum() for g in grads) ** 0.5),
            "grad_sum": float(sum(g.sum() for g in grads))}


def run_worker(args, **overrides) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "scoring-worker"]
    for key, value in {**vars(args), **overrides}.items():
        if key in ("command", "directions", "methods", "budget_gb"):
            continue
        command += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed: {' '.join(command)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def largest_batch(small: dict, large: dict, batch: int, budget_gb: float) -> int:
    """The largest B with a*B + b*B^2 <= budget, (a, b) fitted on B/2 and B."""
    half = batch // 2
    # m(B) = a B + b B^2 through (half, small) and (batch, large)
    b = (large["peak_gb"] / batch - small["peak_gb"] / half) / (batch - half)
    a = large["peak_gb"] / batch - b * batch
    if b <= 0:  # no quadratic growth measured: linear through the larger batch
        return int(budget_gb / (large["peak_gb"] / batch))
    return int((-a + (a * a + 4 * b * budget_gb) ** 0.5) / (2 * b))


def scoring(args) -> int:
    print(f"scoring under autograd: B = {args.batch}, D = {args.dim}, R = {'/'.join(map(str, LEVEL_REGIONS))}, "
          f"captions of 8-32 tokens, device {args.device}, min of {args.repeat} round(s), a fresh process each")
    rows, ok = [], True
    for direction in args.directions:
        results = {}
        for method in args.methods:
            results[method] = run_worker(args, method=method, direction=direction)
            fits = ""
            if args.budget_gb:
                half = run_worker(args, method=method, direction=direction, batch=args.batch // 2)
                fits = largest_batch(half, results[method], args.batch, args.budget_gb)
            results[method]["fits"] = fits
            rows.append((direction, method, results[method]))
            print(f"  {direction} {method:9s} {results[method]['time']:8.2f} s  {results[method]['peak_gb']:6.3f} GB"
                  f"{f'  largest batch in {args.budget_gb:g} GB: {fits}' if fits != '' else ''}", flush=True)
        if "recompute" in results and "keep" in results:
            r, k = results["recompute"], results["keep"]
            ratio = r["time"] / k["time"]
            same = abs(r["grad_norm"] - k["grad_norm"]) <= 1e-5 * abs(k["grad_norm"])
            verdict = ratio <= TARGET_TIME and r["peak_gb"] <= TARGET_GB
            ok &= verdict and same
            print(f"  {direction}: recompute / keep time {ratio:.2f}x (target <= {TARGET_TIME}x), peak "
                  f"{r['peak_gb']:.3f} GB vs {k['peak_gb']:.3f} GB (target <= {TARGET_GB} GB), loss "
                  f"{r['loss']:.6f} vs {k['loss']:.6f}, gradient norm {'equal' if same else 'DIFFERENT'} "
                  f"(rel 1e-5)", flush=True)
    return 0 if ok else 1


# Peak dense tensor throughput (TFLOPS) by device name and precision; --peak-tflops overrides.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def step_config(model: str, paper: bool, batch: int | None) -> dict:
    """The configuration of the benchmarked step: the demo's (tiny models, 64 px) or the
    paper's (HAT: Swin-B + BERT-base, batch 58; Multi-SEA: its ViT-B/16 + RoBERTa, per-GPU
    batch 20), built offline (architecture only: weights do not change the speed)."""
    from hat.defaults import default_config

    config = default_config(model, "f30k" if paper else "demo")
    if batch:
        config["per_gpu_batchsize"] = batch
    elif paper and model == "multisea":
        config["per_gpu_batchsize"] = 20
    config["batch_size"] = None
    return config


def synthetic_batch(config: dict, plugin, batch: int, seed: int = 0) -> dict:
    """Images [B, 3, S, S] and captions of 8..max_text_len tokens (padded as the plug-in pads)."""
    from datamodules.datasets import pad_token_ids

    g = torch.Generator().manual_seed(seed)
    size, max_len = config["image_size"], config["max_text_len"]
    lengths = torch.randint(8, max_len + 1, (batch,), generator=g).tolist()
    tokens = [[101] + torch.randint(1000, 20000, (n - 2,), generator=g).tolist() + [102] for n in lengths]
    input_ids, attention_mask = pad_token_ids(tokens, 0, plugin.pad_to)
    return {"images": torch.randn(batch, 3, size, size, generator=g), "input_ids": input_ids,
            "attention_mask": attention_mask, "image_index": torch.arange(batch)}


def step_worker(args) -> dict:
    """Time, peak memory and FLOPs of whole optimizer steps of one model at one precision."""
    from torch.utils.flop_counter import FlopCounterMode

    from hat.loop import amp_dtype_of, optimizer_step
    from hat.plugins import get_plugin

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = step_config(args.model, args.paper, args.batch)
    config["precision"] = args.precision
    plugin = get_plugin(args.model)(config)
    torch.manual_seed(0)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss_gb() * 1e9
    model = plugin.build(pretrained=False).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    epoch = config["max_epoch"] - 1
    plugin.start_epoch(model, epoch)  # the main phase: what trains after the freezing
    optimizer = plugin.optimizer(model)
    amp_dtype = amp_dtype_of(args.precision)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    batch_size = config["per_gpu_batchsize"]
    batch = synthetic_batch(config, plugin, batch_size)
    micro_batch_size = args.micro or batch_size
    exact = None
    if args.accumulation == "exact":  # as _Fit.train_step builds it (one process: no gather)
        exact = (lambda net, micro, first: plugin.encode_batch(net, model, micro, first),
                 lambda features, micros: plugin.loss_from_features(model, features, micros, epoch))
    model_bytes = (torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss_gb() * 1e9) - base

    def step():
        optimizer_step(model, lambda net, micro: plugin.loss(net, model, micro, epoch), batch,
                       optimizer, device, micro_batch_size, amp_dtype, scaler, config["clip_norm"],
                       model.parameters(), exact=exact)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up (allocations, kernels, lazy optimizer state)
    sync()
    # the steps' own peak: above what the process holds between steps (model, gradients'
    # absence, optimizer state), measured from here on
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        release_free_memory()
        resident = current_rss_gb() * 1e9 if reset_peak_rss() else float("nan")
    times, cpu_times = [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    seconds = sum(times) / args.steps
    peak = ((torch.cuda.max_memory_allocated(device) - base) / 1e9 if device.type == "cuda"
            else rss_gb() - base / 1e9)
    step_peak = ((torch.cuda.max_memory_allocated(device) - resident) / 1e9 if device.type == "cuda"
                 else peak_rss_since_reset_gb() - resident / 1e9)
    flops = None
    if args.flops:  # model FLOPs: one step counted with the scoring not recomputed
        if hasattr(model, "recompute_scores"):
            model.recompute_scores = False
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        flops = counter.get_total_flops()
    return {"seconds": seconds, "min_seconds": min(times), "images_per_s": batch_size / seconds, "peak_gb": peak,
            "step_peak_gb": step_peak, "min_cpu_seconds": min(cpu_times), "threads": torch.get_num_threads(),
            "model_gb": model_bytes / 1e9, "flops": flops, "batch": batch_size, "micro": micro_batch_size,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def peak_tflops(device_name: str, precision: str, given: float | None):
    if given:
        return given, "--peak-tflops"
    for name, table in PEAK_TFLOPS.items():
        if name in device_name and precision in table:
            return table[precision], f"{name} {precision} dense peak"
    return None, "unknown device: pass --peak-tflops"


def run_step_worker(args, model: str, precision: str, micro: int | None = None, accumulation: str = "split") -> dict:
    command = [sys.executable, os.path.abspath(__file__), "step-worker", "--model", model, "--precision", precision,
               "--device", args.device, "--steps", str(args.steps), "--accumulation", accumulation]
    command += (["--paper"] if args.paper else []) + (["--batch", str(args.batch)] if args.batch else [])
    command += ["--micro", str(micro)] if micro else []
    command += (["--flops"] if args.flops else []) + (["--channels-last"] if args.channels_last else [])
    command += ["--threads", str(args.threads)] if getattr(args, "threads", None) else []
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed: {' '.join(command)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def steps(args) -> int:
    recipe = "paper" if args.paper else "demo"
    print(f"whole training steps ({recipe} configs, synthetic batches), device {args.device}, mean of "
          f"{args.steps} steps after one warm-up, a fresh process each")
    for model in args.models:
        for precision in args.precision:
            r = run_step_worker(args, model, precision)
            line = (f"  {model:8s} {precision}  batch {r['batch']:3d}  {r['seconds']:7.3f} s/step  "
                    f"{r['images_per_s']:8.1f} images/s  peak {r['peak_gb']:6.2f} GB")
            if r["flops"]:
                achieved = r["flops"] / r["seconds"] / 1e12
                line += f"  {r['flops'] / 1e12:.2f} TFLOP/step, {achieved:.2f} TFLOPS"
                peak, source = peak_tflops(r["device_name"], precision, args.peak_tflops)
                if args.device.startswith("cuda"):
                    line += (f", MFU {100 * achieved / peak:.1f}% of {peak:g} TFLOPS ({source}, {r['device_name']})"
                             if peak else f" ({source})")
            print(line, flush=True)
    return 0


ACCUMULATION_ROWS = (("1 x 58", None, "split"), ("exact 4 micro", 15, "exact"), ("exact 8 micro", 8, "exact"),
                     ("split 8 micro", 8, "split"))
TARGET_ACC_MEMORY, TARGET_ACC_TIME = 0.4, 1.5  # issue 23: exact 8 micro vs 1 x 58


def accumulation(args) -> int:
    """(c) HAT's batch of 58 in one micro-batch, and exact / split over 4 and 8 micro-batches."""
    recipe = "paper" if args.paper else "demo"
    print(f"HAT optimizer steps over a batch of {args.batch} ({recipe} architecture, synthetic batch), device "
          f"{args.device}, {args.precision}, {args.threads or 'default'} thread(s), min of {args.steps} steps after "
          f"one warm-up, a fresh process per row; on the CPU also the step's CPU time (process time: with one "
          f"thread the work done, whatever else the machine runs)")
    rows = {}
    for name, micro, mode in ACCUMULATION_ROWS:
        micro = micro if micro is None or micro < args.batch else None
        r = rows[name] = run_step_worker(args, "hat", args.precision, micro, mode)
        counts = [min(r["micro"], r["batch"] - start) for start in range(0, r["batch"], r["micro"])]
        cpu = f" (CPU {r['min_cpu_seconds']:.3f} s)" if args.device == "cpu" else ""
        print(f"  {name:14s} {'+'.join(map(str, counts)):17s} {r['min_seconds']:8.3f} s/step{cpu}  "
              f"{r['batch'] / r['min_seconds']:7.1f} images/s  peak {r['peak_gb']:6.3f} GB  "
              f"(step's working set {r['peak_gb'] - r['model_gb']:6.3f} GB, model {r['model_gb']:.3f} GB; "
              f"the timed steps' own peak {r['step_peak_gb']:6.3f} GB)", flush=True)
    one = rows["1 x 58"]
    for name, _, _ in ACCUMULATION_ROWS[1:]:
        r = rows[name]
        memory, seconds = r["peak_gb"] / one["peak_gb"], r["min_seconds"] / one["min_seconds"]
        working = (r["peak_gb"] - r["model_gb"]) / (one["peak_gb"] - one["model_gb"])
        own = r["step_peak_gb"] / one["step_peak_gb"]
        cpu = r["min_cpu_seconds"] / one["min_cpu_seconds"]
        cpu_text = f", CPU time {cpu:.2f} x" if args.device == "cpu" else ""
        line = (f"  {name}: peak memory {memory:.2f} x, time {seconds:.2f} x{cpu_text} the 1 x {args.batch} step "
                f"(working set {working:.2f} x, the steps' own peak {own:.2f} x)")
        if name == "exact 8 micro":
            line += (f"; targets: peak <= {TARGET_ACC_MEMORY}x: whole process "
                     f"{'met' if memory <= TARGET_ACC_MEMORY else 'NOT met'}, the steps' own "
                     f"{'met' if own <= TARGET_ACC_MEMORY else 'NOT met'}; time <= "
                     f"{TARGET_ACC_TIME}x {'met' if seconds <= TARGET_ACC_TIME else 'NOT met'}")
            if args.device == "cpu":
                line += f" (CPU time {'met' if cpu <= TARGET_ACC_TIME else 'NOT met'})"
        print(line, flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    score = sub.add_parser("scoring", help="(a) the batch scoring under autograd")
    worker = sub.add_parser("scoring-worker")
    for p in (score, worker):
        p.add_argument("--batch", type=int, default=32)
        p.add_argument("--dim", type=int, default=768)
        p.add_argument("--device", default="cpu")
        p.add_argument("--repeat", type=int, default=1)
        p.add_argument("--seed", type=int, default=0)
    score.add_argument("--directions", nargs="+", default=["i2t", "t2i"])
    score.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    score.add_argument("--budget-gb", type=float, default=0.0,
                       help="also estimate the largest batch that fits this much memory (runs B/2 too)")
    worker.add_argument("--method", choices=METHODS, required=True)
    worker.add_argument("--direction", choices=["i2t", "t2i"], required=True)
    step = sub.add_parser("step", help="(b) whole training steps of HAT and Multi-SEA")
    step_w = sub.add_parser("step-worker")
    for p in (step, step_w):
        p.add_argument("--device", default="cpu")
        p.add_argument("--paper", action="store_true", help="the paper's configs (default: the demo's)")
        p.add_argument("--batch", type=int, default=None, help="per-GPU batch (default: the recipe's)")
        p.add_argument("--steps", type=int, default=3)
        p.add_argument("--flops", action="store_true", default=None,
                       help="count FLOPs (torch.utils.flop_counter; default on CUDA)")
        p.add_argument("--channels-last", action="store_true")
    acc = sub.add_parser("accumulation", help="(c) HAT's batch of 58: one micro-batch vs exact / split accumulation")
    acc.add_argument("--device", default="cpu")
    acc.add_argument("--paper", action="store_true", help="the paper's architecture (default: the demo's)")
    acc.add_argument("--batch", type=int, default=58, help="the optimizer step's batch")
    acc.add_argument("--steps", type=int, default=3, help="timed steps per row (the minimum is printed)")
    acc.add_argument("--precision", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on CUDA)")
    acc.add_argument("--threads", type=int, default=1, help="CPU threads per worker (0: torch's default)")
    step_w.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    step_w.add_argument("--micro", type=int, default=None, help="micro-batch size (default: the whole batch)")
    step_w.add_argument("--accumulation", choices=["split", "exact"], default="split")
    step.add_argument("--models", nargs="+", default=["hat", "multisea"])
    step.add_argument("--precision", nargs="+", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, "
                                                                    "bf16 and fp16 on CUDA)")
    step.add_argument("--peak-tflops", type=float, default=None)
    step_w.add_argument("--model", required=True)
    step_w.add_argument("--precision", default="fp32")
    args = parser.parse_args(argv if argv is not None else (sys.argv[1:] or ["scoring"]))
    if args.command == "scoring-worker":
        print(json.dumps(scoring_worker(args)))
        return 0
    if args.command == "step-worker":
        print(json.dumps(step_worker(args)))
        return 0
    if args.command == "step":
        cuda = args.device.startswith("cuda")
        args.precision = args.precision or (["bf16", "fp16"] if cuda else ["fp32"])
        args.flops = cuda if args.flops is None else args.flops
        return steps(args)
    if args.command == "accumulation":
        args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
        args.flops, args.channels_last = False, False
        return accumulation(args)
    return scoring(args)


if __name__ == "__main__":
    sys.exit(main())
