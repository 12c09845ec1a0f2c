"""Load-test the search server: concurrent clients get exactly the sequential answers.

    python bench/search_load.py                        # 2,000 demo pictures, a demo-architecture HAT
    python bench/search_load.py --index ~/Pictures/.hat-index [--clients 16 --queries 50]
    python bench/search_load.py --batch-queries       # the server's joint batches (serve --batch-queries)

Without --index it builds (or brings up to date, so a second run reuses it) the index of
--pictures demo pictures in --work: the demo set's train split (`datamodules.demo`,
generated once into its cache) written as JPEG files, encoded with --checkpoint or a
demo-architecture model of --model with random weights (as tests/search/conftest.py
builds them: its scores are distinct, which is all a load test needs).

Then it starts the real server (``python -m hat.search serve INDEX --port 0``, a process
of its own, on 127.0.0.1 only), and:

1. asks every distinct (query, k) once, one request at a time: the sequential answers
   (queries: --distinct captions of the demo set, or of the index's own pictures' demo
   captions, k cycling through 5, 10 and 20) and their latency;
2. runs --clients threads, each with its own keep-alive connection, sending --queries
   requests each (the distinct requests in a shuffled order of their own; bounded: every
   client stops after its count, every request after --timeout seconds);
3. checks zero errors and every answer equal to its sequential one (the same paths, the
   same float scores: the JSON parsed), and prints p50 / p99 latency and queries/s of
   both phases, and the server's batches and scoring calls (``/api/health``: how many
   batches and index.search calls answered how many requests, the largest batch).

Exit status 0 when every answer was right (with --batch-queries: the same paths, scores
within 1e-5 relative, as that mode promises; how many were bit for bit equal is
printed), 1 otherwise, 2 for a usage error. The server
runs with OMP_NUM_THREADS=--threads (default 1: on a small machine that is busy with
anything else, OpenMP's spinning threads slow the tiny models many times over).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TINY = {  # the demo-architecture models of tests/search/conftest.py
    "hat": {"swin_depths": [1, 1, 1, 1], "embed_dim": 32, "eval_batch_size": 16},
    "multisea": {"vision_depth": 2, "embed_dim": 32, "fusion_heads": 2, "fusion_layers": 2, "queue_size": 32,
                 "top_k": 8, "itm_layers": [2], "eval_batch_size": 16,
                 "image_backbone_kwargs": {"patch_size": 16, "embed_dim": 32, "num_heads": 2}},
}
KS = (5, 10, 20)


def demo_checkpoint(path: str, model: str, seed: int = 0) -> str:
    """A demo-architecture ``model`` with random weights (``seed``) saved as a project
    checkpoint at ``path`` (kept: a second run reuses it, and so its index)."""
    if os.path.isfile(path):
        return path
    import torch

    from hat.checkpoint import save_checkpoint
    from hat.defaults import default_config
    from hat.plugins import get_plugin

    config = default_config(model, "demo", **TINY[model])
    torch.manual_seed(seed)
    save_checkpoint(path, get_plugin(model)(config).build(pretrained=False), config=config)
    return path


def demo_pictures(folder: str, count: int):
    """The first ``count`` (at most 2000) pictures of the default demo set's train split
    (generated once into the demo cache) as JPEG files in ``folder`` (the bytes the arrow
    file holds; files already there are kept) -> the split."""
    from datamodules.arrow import open_split
    from datamodules.demo import ensure_demo_data

    split = open_split(ensure_demo_data(train_images=2000, eval_images=200), "demo", "train")
    os.makedirs(folder, exist_ok=True)
    for index in range(count):
        path = os.path.join(folder, f"demo{index:05d}.jpg")
        if not os.path.isfile(path):
            with open(path + ".tmp", "wb") as handle:
                handle.write(split.image_bytes(index))
            os.replace(path + ".tmp", path)
    return split


def build_demo_index(args) -> tuple[str, list[str]]:
    """(the index folder, captions to ask) of the demo pictures in --work."""
    from hat.search import build_index

    work = os.path.abspath(os.path.expanduser(args.work))
    os.makedirs(work, exist_ok=True)
    split = demo_pictures(os.path.join(work, "pictures"), args.pictures)
    checkpoint = args.checkpoint or demo_checkpoint(os.path.join(work, f"{args.model}-demo.ckpt"), args.model)
    started = time.perf_counter()
    report = build_index(checkpoint, os.path.join(work, "pictures"), out=os.path.join(work, f"index-{args.model}"),
                         progress=False)
    print(f"{report.summary()} [{time.perf_counter() - started:.1f} s]", flush=True)
    rng = random.Random(args.seed)
    chosen = rng.sample(range(args.pictures), min(args.distinct, args.pictures))
    return report.out, [split.captions(i)[rng.randrange(len(split.captions(i)))] for i in chosen]


def demo_captions(count: int, seed: int) -> list[str]:
    """``count`` captions of the demo test split (the queries for an index given with --index)."""
    from datamodules.arrow import open_split
    from datamodules.demo import ensure_demo_data

    split = open_split(ensure_demo_data(train_images=8, eval_images=200), "demo", "test")
    rng = random.Random(seed)
    return [split.captions(i % len(split))[rng.randrange(5)] for i in rng.sample(range(10 * len(split)), count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(name: str, latencies: list[float], wall: float) -> str:
    return (f"{name}: {len(latencies)} requests in {wall:.1f} s = {len(latencies) / wall:.1f} queries/s; latency "
            f"p50 {1000 * percentile(latencies, 50):.0f} ms, p99 {1000 * percentile(latencies, 99):.0f} ms, "
            f"max {1000 * max(latencies):.0f} ms")


class Client:
    """One keep-alive HTTP connection to the server (a new one after an error)."""

    def __init__(self, port: int, timeout: float):
        self.port, self.timeout, self.connection = port, timeout, None

    def get(self, target: str) -> tuple[int, bytes]:
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            self.connection.request("GET", target)
            response = self.connection.getresponse()
            return response.status, response.read()
        except Exception:
            self.close()
            raise

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def target_of(query: str, k: int) -> str:
    return "/api/search?" + urllib.parse.urlencode({"q": query, "k": k})


def start_server(index: str, threads: int, device: str, joint: bool) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "hat.search", "serve", index, "--host", "127.0.0.1", "--port", "0",
               "--device", device, *(["--batch-queries"] if joint else [])]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    line = proc.stdout.readline()  # "serving N pictures of ROOT (model=...) on http://127.0.0.1:PORT/ ..."
    found = re.search(r"on http://127\.0\.0\.1:(\d+)/", line)
    if not found:
        proc.kill()
        raise SystemExit(f"error: the server did not start (exit {proc.wait()}): {line.strip()}")
    print(line.strip(), flush=True)
    # the access log goes on on stdout: drained, or the full pipe would stop the server
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, int(found.group(1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", help="an index to serve (default: build the demo one in --work)")
    parser.add_argument("--checkpoint", help="the checkpoint of the demo index (default: a demo-architecture one)")
    parser.add_argument("--model", choices=sorted(TINY), default="hat", help="the demo checkpoint's model")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "hat-search-load"),
                        help="where the demo pictures, checkpoint and index go (reused by the next run)")
    parser.add_argument("--pictures", type=int, default=2000, help="demo pictures in the index (at most 2000)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--queries", type=int, default=50, help="requests per client")
    parser.add_argument("--distinct", type=int, default=200, help="distinct queries asked")
    parser.add_argument("--threads", type=int, default=1, help="the server's OMP_NUM_THREADS")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-queries", action="store_true", help="serve with --batch-queries (joint batches)")
    args = parser.parse_args(argv)
    if not 1 <= args.pictures <= 2000 or args.clients < 1 or args.queries < 1 or args.distinct < 1:
        parser.error("--pictures 1..2000, --clients, --queries and --distinct >= 1")

    if args.index:
        index, captions = args.index, demo_captions(args.distinct, args.seed)
    else:
        index, captions = build_demo_index(args)
    asked = [(query, KS[i % len(KS)]) for i, query in enumerate(captions)]
    proc, port = start_server(index, args.threads, args.device, args.batch_queries)
    status = 1
    try:
        status = load(args, port, asked)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        print(f"server stopped (exit {code})", flush=True)
    return status


def load(args, port: int, asked: list[tuple[str, int]]) -> int:
    client = Client(port, args.timeout)
    health = json.loads(client.get("/api/health")[1])
    print(f"index: {health['pictures']} pictures, model={health['model']}, batches: {health['scoring']['mode']}",
          flush=True)

    # 1. the sequential answers, one request at a time
    expected, latencies = {}, []
    started = time.perf_counter()
    for query, k in asked:
        t = time.perf_counter()
        code, body = client.get(target_of(query, k))
        latencies.append(time.perf_counter() - t)
        if code != 200:
            print(f"error: the sequential request {query!r} k={k} answered {code}: {body[:200]!r}")
            return 1
        expected[query, k] = json.loads(body)
    print(summary("sequential", latencies, time.perf_counter() - started), flush=True)
    before = json.loads(client.get("/api/health")[1])["scoring"]
    client.close()

    # 2. concurrent clients
    results, errors, lock = [], [], threading.Lock()
    barrier = threading.Barrier(args.clients)

    def run(number: int):
        rng = random.Random(args.seed * 1000 + number)
        order = [asked[rng.randrange(len(asked))] for _ in range(args.queries)]
        own = Client(port, args.timeout)
        barrier.wait()
        for query, k in order:
            t = time.perf_counter()
            try:
                code, body = own.get(target_of(query, k))
                answer = json.loads(body) if code == 200 else None
            except Exception as error:  # noqa: BLE001 (counted)
                with lock:
                    errors.append(f"{type(error).__name__}: {error}")
                continue
            elapsed = time.perf_counter() - t
            with lock:
                if code != 200:
                    errors.append(f"HTTP {code}: {body[:200]!r}")
                results.append((query, k, answer, elapsed))
        own.close()

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(args.clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=args.timeout * args.queries)
    wall = time.perf_counter() - started
    after = json.loads(Client(port, args.timeout).get("/api/health")[1])["scoring"]
    answers = [(answer, expected[query, k]) for query, k, answer, _ in results if answer is not None]
    identical = sum(answer == want for answer, want in answers)
    same_paths = sum([r["path"] for r in answer["results"]] == [r["path"] for r in want["results"]]
                     and answer["note"] == want["note"] for answer, want in answers)
    drift = max((abs(a["score"] - b["score"]) / max(abs(b["score"]), 1e-30) for answer, want in answers
                 for a, b in zip(answer["results"], want["results"])), default=0.0)
    answered = len(answers)
    total = args.clients * args.queries
    print(summary(f"concurrent ({args.clients} clients x {args.queries})",
                  [elapsed for *_, elapsed in results], wall), flush=True)
    calls, queries = after["calls"] - before["calls"], after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    print(f"batching ({after['mode']}): {queries} requests taken in {batches} batches ({queries / max(batches, 1):.1f} "
          f"per batch, the largest {after['largest_batch']}), scored by {calls} index.search calls; sequentially "
          f"{before['calls']} calls for {before['requests']} requests", flush=True)
    print(f"errors: {len(errors)}; answered {answered} of {total}; equal to the sequential answer bit for bit: "
          f"{identical}, the same pictures in the same order: {same_paths}; largest relative score difference: "
          f"{drift:.2g}", flush=True)
    for line in errors[:5]:
        print(f"  {line}")
    right = identical == answered if after["mode"] == "exact" else (same_paths == answered and drift <= 1e-5)
    return 0 if not errors and answered == total and right else 1


if __name__ == "__main__":
    sys.exit(main())
