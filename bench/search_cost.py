"""Query cost of searching a picture collection (issue 25): exact HAT and Multi-SEA scoring,
the opt-in shortlist (hat/search/shortlist.py), FAISS, and the shortlist's agreement.

    python bench/search_cost.py exact --shapes demo        # ms per query, N 1k / 10k (15 s)
    python bench/search_cost.py exact --shapes paper       # the paper's shapes (~4.5 min)
    python bench/search_cost.py faiss                      # IndexFlatIP vs IndexHNSWFlat, N 10k / 30k / 100k (~2 min)
    python bench/search_cost.py agreement --checkpoint runs/1/best.ckpt   # shortlist vs exact, demo test split
    python bench/search_cost.py agreement --checkpoint runs/1/best.ckpt --large-images 10000   # + 10k pictures

exact: ms per query of HAT's exact score (the plug-in's score_sets path: level_similarities
  -> summed_levels through HAT.score, lambda 9, in each direction) of a query of
  --query-tokens tokens (12 words + [CLS] + [SEP]) against N synthetic pictures
  (L2-normalised random features, fp32, per level [N, R, D]): one query alone, and a batch
  of --batch queries in one call (per query, amortised). Shapes: "demo" (the demo recipe:
  R 64/16/4, D 128) and "paper" (the project's paper recipe, Swin-B 224 + BERT-base: R
  784/196/49, D 768); "paper384" (Swin-B at 384 px: R 2304/576/144) on request. The
  features of N pictures at the paper's dimensions do not fit this machine (10,000: 29 GiB
  fp32), so at most --slab distinct pictures are held and N is scored as ceil(N / slab)
  passes over them (the kernel tiles the pictures independently: the same work as one
  call over N). A cell whose passes pass --budget wall seconds stops there and is
  extrapolated linearly (marked *). Then the shortlist's stages per query (M --m, m_1
  --m-first): the query's pooled vector, FAISS flat top-M / top-m_1 of N pooled vectors,
  SCAN level 3 of m_1 pictures, exact scores of M pictures (shortlisted_scores' own
  _scores_of, on held pictures), the totals of the pooled-only shortlist and of the
  cascade and their speed-up over exact scoring, and shortlisted_scores end to end where
  N is the number held. Then Multi-SEA's: ITC (pair_scores, topk) at N and the t2i ITM
  re-rank of the top_k (rerank._itm_scores through a random AFormer of the recipe's
  shape; it does not depend on N; the states of at most --slab pictures are held).
faiss: --faiss-dim-dimensional clustered synthetic vectors (unit norm, --clusters Gaussian
  clusters, queries drawn from the same clusters) at each --faiss-n: build time, memory
  (serialised index size and the process's RSS growth), ms per query (one at a time and
  a batch), and per efSearch the HNSW query time and its recall@10 (and recall@--m at
  efSearch max(ef, m)) against the exact flat top-k; then at the shortlist's depths (--m,
  --m-first, as faiss_top searches them) flat's and HNSW's one-query time and HNSW's
  recall. Prints the efSearch chosen for top-10 queries (the smallest reaching
  --recall-target at the largest N) and, per depth, the N (and N x D: exact search costs
  in proportion to it) from which HNSW is --pays-speedup times faster (flat fitted
  linearly in N, HNSW's time taken as constant).
agreement: a trained HAT checkpoint on the demo's test split (200 pictures, 1,000
  captions): for each first stage (the POOLINGS of hat/search/shortlist.py, level-3 SCAN
  alone, a random shortlist for reference, and the cascades: the chosen pooling's top
  m_1 (--agree-first: fractions of N or counts), then level-3 SCAN) and each M, the mean
  overlap of the shortlist's top-10 with the exact top-10 (captions searching pictures),
  the fraction of captions whose exact top-1 is in the shortlist, and t2i R@1 / R@10 of
  the shortlisted ranking, with M / N; then shortlisted_scores itself against the table.
  --large-images also scores a larger demo set generated with seed --large-seed (its
  test split; --large-queries captions, evenly spaced), where the defaults are checked
  with an HNSW first stage too. Skipped, with a message, without --checkpoint.
Times are the CPU time of the process with one thread (--clock; the default with
--threads 1: on a shared machine the wall time also counts waiting for a core, shown
beside it in the exact table), the minimum over --repeat rounds (one round where one
takes over a second), on --threads torch and FAISS threads (default 1).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hat.search import shortlist as S  # noqa: E402
from hat.models.hat.evaluation import level_similarities  # noqa: E402
from hat.models.hat.model import HAT, summed_levels  # noqa: E402
from hat.models.multisea.model import MultiSEA  # noqa: E402

# per shape: HAT's regions per level (the recipe's level_pairs' Swin stages) and width;
# Multi-SEA's image tokens (ViT patches + class token), caption length, AFormer and top_k
SHAPES = {
    "demo": {"regions": (64, 16, 4), "dim": 128, "ms_tokens": 65, "ms_text": 32, "ms_layers": 1,
             "ms_heads": 4, "ms_mlp": 2, "ms_agents": 16, "top_k": 16},
    "paper": {"regions": (784, 196, 49), "dim": 768, "ms_tokens": 197, "ms_text": 40, "ms_layers": 4,
              "ms_heads": 12, "ms_mlp": 4, "ms_agents": 40, "top_k": 64},
    "paper384": {"regions": (2304, 576, 144), "dim": 768, "ms_tokens": 577, "ms_text": 40, "ms_layers": 4,
                 "ms_heads": 12, "ms_mlp": 4, "ms_agents": 40, "top_k": 64},
}


class Scorer:
    """Stands in for a HAT model on synthetic features: its ``score`` is HAT.score (the
    summed SCAN levels in ``direction``), what level_similarities calls."""

    score = HAT.score

    def __init__(self, direction: str, lambda_softmax: float = 9.0):
        self.direction, self.lambda_softmax, self.recompute_scores = direction, lambda_softmax, True


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.process_time  # main sets it from --clock


def timed(fn, repeat: int):
    """(min seconds of ``clock`` over up to ``repeat`` rounds, the last result); one round
    when a round takes over a second."""
    best, result = math.inf, None
    for _ in range(repeat):
        start = clock()
        result = fn()
        best = min(best, clock() - start)
        if best > 1.0:
            break
    return best, result


def unit_randn(generator, *shape) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def synthetic_images(n: int, regions, dim: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [unit_randn(g, n, r, dim) for r in regions]


def synthetic_queries(q: int, tokens: int, dim: int, levels: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    return {"captions": [unit_randn(g, q, tokens, dim) for _ in range(levels)],
            "lengths": torch.full((q,), tokens, dtype=torch.long)}


def exact_passes(scorer, slab: list, queries: dict, n: int, budget: float):
    """(clock seconds, wall seconds, extrapolated) to score ``queries`` against ``n``
    pictures as passes over ``slab``; the passes stop once ``budget`` wall seconds are
    spent, and the times are extrapolated linearly to n."""
    size = len(slab[0])
    counts = [min(size, n - start) for start in range(0, n, size)]
    spent = wall = 0.0
    done = 0
    for count in counts:
        features = {"images": [level[:count] for level in slab], **queries}
        start, start_wall = clock(), time.perf_counter()
        summed_levels(level_similarities(scorer, features))
        spent += clock() - start
        wall += time.perf_counter() - start_wall
        done += count
        if wall > budget and done < n:
            return spent * n / done, wall * n / done, True
    return spent, wall, False


def exact_cell(scorer, slab, queries, n, budget, repeat):
    """exact_passes, best of up to ``repeat`` rounds (one where a round takes over a
    second), after a warm-up on a few pictures."""
    exact_passes(scorer, [level[:8] for level in slab], queries, 8, budget)
    best = (math.inf, math.inf, False)
    for _ in range(repeat):
        result = exact_passes(scorer, slab, queries, n, budget)
        best = min(best, result)
        if result[1] > 1.0 or result[2]:
            break
    return best


def fmt_ms(seconds: float, star: bool = False, per: int = 1) -> str:
    return f"{seconds * 1000 / per:10.1f}{'*' if star else ' '}"


def hat_exact(args, shape_name: str, shape: dict) -> None:
    regions, dim = shape["regions"], shape["dim"]
    slab_n = min(max(args.n), args.slab if shape_name != "demo" else max(args.n))
    slab = synthetic_images(slab_n, regions, dim, args.seed)
    per_picture = sum(regions) * dim * 4
    print(f"\n## HAT exact, {shape_name}: R {'/'.join(map(str, regions))}, D {dim}, query of {args.query_tokens} "
          f"tokens, batch {args.batch}; features {per_picture / 2**10:.0f} KiB per picture fp32 "
          f"({', '.join(f'{n:,}: {n * per_picture / 2**30:.2f} GiB' for n in args.n)}); "
          f"{slab_n:,} distinct pictures held", flush=True)
    print(f"{'dir':>4} {'N':>7} {'1 query ms':>11} {'(wall)':>11} {f'{args.batch} queries ms/q':>17} "
          f"{'(wall)':>11} {'> 1 s':>6}", flush=True)
    single = synthetic_queries(1, args.query_tokens, dim, len(regions), args.seed)
    batch = synthetic_queries(args.batch, args.query_tokens, dim, len(regions), args.seed)
    exact_ms = {}
    for direction in args.directions:
        scorer = Scorer(direction)
        for n in args.n:
            one, one_wall, star1 = exact_cell(scorer, slab, single, n, args.budget, args.repeat)
            many, many_wall, star2 = exact_cell(scorer, slab, batch, n, args.budget, args.repeat)
            exact_ms[(direction, n)] = (one, star1)
            print(f"{direction:>4} {n:>7,} {fmt_ms(one, star1)} {fmt_ms(one_wall, star1)} "
                  f"{fmt_ms(many, star2, args.batch):>17} {fmt_ms(many_wall, star2, args.batch)} "
                  f"{'yes' if one > 1.0 else 'no':>6}", flush=True)
    shortlist_cost(args, shape, slab, exact_ms)
    del slab


def shortlist_cost(args, shape: dict, slab: list, exact_ms: dict) -> None:
    """The shortlist's stages per query at each N: the query's pooled vector, FAISS flat
    top-M (pooled only) or top-m_first (the cascade) of N pooled vectors, SCAN level 3 of
    the m_first, exact scores of the M (through shortlisted_scores' own _scores_of, on
    pictures of the slab); and shortlisted_scores end to end where N is the slab."""
    import faiss

    regions, dim = shape["regions"], shape["dim"]
    slab_n, levels = len(slab[0]), len(regions)
    single = synthetic_queries(1, args.query_tokens, dim, levels, args.seed)
    query_vectors = S.pooled_text_vectors(single)
    pooled_dim = query_vectors.shape[1]
    slab_index, _ = S.build_faiss(S.pooled_image_vectors(slab), "flat")
    print(f"shortlist ({S.POOLING} pooling, D' {pooled_dim}; M {args.m}, m_first {args.m_first}): ms per query; "
          f"the exact M and the level-3 stage on pictures of the {slab_n:,} held", flush=True)
    print(f"{'dir':>4} {'N':>7} {'pool':>6} {'flat M':>7} {'exact M':>9} {'pooled total':>12} {'vs exact':>9} "
          f"{'flat m_1':>9} {'SCAN-3 m_1':>10} {'cascade total':>13} {'vs exact':>9} {'end to end':>10}", flush=True)
    rng = np.random.default_rng(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    for n in args.n:
        if n == slab_n:
            index = slab_index
        else:  # pooled vectors of N synthetic pictures: the first stage's cost depends on N and D' alone
            vectors = rng.standard_normal((n, pooled_dim), dtype=np.float32)
            index = faiss.IndexFlatIP(pooled_dim)
            index.add(vectors)
        m_first = min(args.m_first, n)
        pool_s, _ = timed(lambda: S.pooled_text_vectors(single), args.repeat * 3)
        flat_m, _ = timed(lambda: S.faiss_top(index, query_vectors, args.m), args.repeat * 3)
        flat_first, _ = timed(lambda: S.faiss_top(index, query_vectors, m_first), args.repeat * 3)
        exact_ids = torch.randperm(slab_n, generator=g)[:min(args.m, slab_n)]
        first_ids = torch.randperm(max(m_first, slab_n), generator=g)[:m_first] % slab_n
        for direction in args.directions:
            scorer, buffers = Scorer(direction), {}
            exact_s, _ = timed(lambda: S._scores_of(scorer, slab, single, 0, exact_ids, slice(None), None, None,
                                                    buffers), args.repeat)
            level3_s, _ = timed(lambda: S._scores_of(scorer, slab, single, 0, first_ids, slice(levels - 1, None),
                                                     None, None, buffers), args.repeat)
            pooled = pool_s + flat_m + exact_s
            cascade = pool_s + flat_first + level3_s + exact_s
            full, star = exact_ms[(direction, n)]
            end = "-"
            if n == slab_n:
                seconds, _ = timed(lambda: S.shortlisted_scores(scorer, slab, single, m=args.m, index=slab_index,
                                                                m_first=args.m_first), args.repeat)
                end = f"{seconds * 1e3:.1f}"
            mark = "*" if star else ""
            print(f"{direction:>4} {n:>7,} {pool_s * 1e3:6.1f} {flat_m * 1e3:7.1f} {exact_s * 1e3:9.1f} "
                  f"{pooled * 1e3:12.1f} {full / pooled:8.1f}x{mark:1} {flat_first * 1e3:9.1f} {level3_s * 1e3:10.1f} "
                  f"{cascade * 1e3:13.1f} {full / cascade:8.1f}x{mark:1} {end:>10}", flush=True)


class ITMStub(torch.nn.Module):
    """The parts of MultiSEA that ITC and the ITM re-rank use (pair_scores, itm_logits),
    a random AFormer of the recipe's shape."""

    def __init__(self, shape: dict):
        super().__init__()
        from hat.models.multisea.aformer import AFormer

        self.aformer = AFormer(shape["dim"], shape["ms_layers"], shape["ms_heads"], shape["ms_mlp"], 0.0,
                               shape["ms_agents"])
        self.itm_head = torch.nn.Linear(shape["dim"], 2)
        self.temp = torch.nn.Parameter(torch.tensor(0.3))

    itm_logits, pair_scores = MultiSEA.itm_logits, MultiSEA.pair_scores


def multisea_cost(args, shape_name: str, shape: dict) -> None:
    from hat.models.multisea.rerank import _itm_scores

    dim, k, tokens, text_len = shape["dim"], shape["top_k"], shape["ms_tokens"], shape["ms_text"]
    model = ITMStub(shape).eval()
    g = torch.Generator().manual_seed(args.seed)
    n_max = max(args.n)
    image_feats = torch.randn(n_max, dim, generator=g)
    pool = min(n_max, args.slab)
    image_states = torch.randn(pool, tokens, dim, generator=g)
    print(f"\n## Multi-SEA, {shape_name}: D {dim}, image tokens {tokens}, text {text_len} tokens, AFormer "
          f"{shape['ms_layers']} layer(s) x {shape['ms_heads']} heads, top_k {k}; ms per query (t2i: a caption "
          f"searching pictures); {pool:,} pictures' states held", flush=True)
    print(f"{'N':>7} {'Q':>3} {'ITC+topk':>10} {f'ITM of {k}':>10} {'total':>10}", flush=True)
    itm = {}  # Q -> seconds per query of the re-rank (its pairs do not depend on N)
    for n in args.n:
        for q in (1, args.ms_batch):
            text_feats = torch.randn(q, dim, generator=g)
            text_states = torch.randn(q, text_len, dim, generator=g)
            text_mask = torch.zeros(q, text_len, dtype=torch.long)
            text_mask[:, :args.query_tokens] = 1

            def itc():
                return model.pair_scores(image_feats[:n], text_feats).topk(k, dim=0).indices.t()  # [q, k]

            with torch.no_grad():
                itc_s, top = timed(itc, args.repeat * 3)
                if q not in itm:
                    image_rows = top.reshape(-1) % pool
                    text_rows = torch.arange(q).repeat_interleave(k)
                    itm[q] = timed(lambda: _itm_scores(model, "t2i", image_rows, text_rows, image_states,
                                                       text_states, text_mask, 128), args.repeat)[0]
            print(f"{n:>7,} {q:>3} {fmt_ms(itc_s, per=q)} {fmt_ms(itm[q], per=q)} {fmt_ms(itc_s + itm[q], per=q)}",
                  flush=True)


def exact(args) -> None:
    for name in args.shapes:
        hat_exact(args, name, SHAPES[name])
    for name in args.shapes:
        if name != "paper384":
            multisea_cost(args, name, SHAPES[name])
    print("* extrapolated linearly from the passes that fit the --budget; '> 1 s': one query over a second; "
          "'vs exact': the exact one-query time / the shortlist's total")


# -- FAISS ---------------------------------------------------------------------------

def clustered(n: int, dim: int, centres: np.ndarray, rng) -> np.ndarray:
    """Unit vectors around random centres (cosine to the centre about 0.7)."""
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 8192):
        stop = min(start + 8192, n)
        block = centres[rng.integers(0, len(centres), stop - start)]
        block = block + rng.standard_normal((stop - start, dim), dtype=np.float32) / np.sqrt(dim)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def one_at_a_time(index, queries, k, ef=None) -> float:
    """Seconds per query of faiss_top, one query at a time."""
    start = clock()
    for row in range(len(queries)):
        S.faiss_top(index, queries[row:row + 1], k, ef_search=ef)
    return (clock() - start) / len(queries)


def faiss_bench(args) -> dict:
    import faiss

    rng = np.random.default_rng(args.seed)
    dim = args.faiss_dim
    centres = rng.standard_normal((args.clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    queries = clustered(args.faiss_queries, dim, centres, rng)
    print(f"\n## FAISS {faiss.__version__}: D {dim}, {args.clusters} clusters, {args.faiss_queries} queries, "
          f"HNSW M {args.hnsw_m} efConstruction {S.HNSW_EF_CONSTRUCTION}, {faiss.omp_get_max_threads()} thread(s)",
          flush=True)
    print(f"{'N':>8} {'index':>6} {'build s':>8} {'size MB':>8} {'RSS +MB':>8} {'1 query ms':>11} "
          f"{f'batch {args.faiss_queries} ms/q':>17} {'efSearch':>8} {'recall@10':>9} {f'recall@{args.m}':>10}",
          flush=True)
    results = {}
    for n in args.faiss_n:
        vectors = clustered(n, dim, centres, rng)
        before = rss_mb()
        start = clock()
        flat, _ = S.build_faiss(vectors, "flat")
        flat_build = clock() - start
        flat_rss = rss_mb() - before
        truth10 = flat.search(queries, 10)[1]
        truth_m = flat.search(queries, args.m)[1]
        flat_one = min(one_at_a_time(flat, queries, 10) for _ in range(args.repeat))
        flat_batch = min(timed(lambda: flat.search(queries, 10), 1)[0] for _ in range(args.repeat)) / len(queries)
        size = faiss.serialize_index(flat).nbytes / 2**20
        print(f"{n:>8,} {'flat':>6} {flat_build:8.2f} {size:8.1f} {flat_rss:8.1f} {flat_one * 1e3:11.3f} "
              f"{flat_batch * 1e3:17.3f} {'-':>8} {1.0:9.3f} {1.0:10.3f}", flush=True)
        before = rss_mb()
        start = clock()
        hnsw, _ = S.build_faiss(vectors, "hnsw", hnsw_m=args.hnsw_m)
        hnsw_build = clock() - start
        hnsw_rss = rss_mb() - before
        size = faiss.serialize_index(hnsw).nbytes / 2**20
        rows = {}
        for ef in args.ef:
            one = min(one_at_a_time(hnsw, queries, 10, ef) for _ in range(args.repeat))
            batch = min(timed(lambda: S.faiss_top(hnsw, queries, 10, ef_search=ef), 1)[0]
                        for _ in range(args.repeat)) / len(queries)
            r10 = recall_at(S.faiss_top(hnsw, queries, 10, ef_search=ef)[1], truth10)
            rm = recall_at(S.faiss_top(hnsw, queries, args.m, ef_search=ef)[1], truth_m)
            rows[ef] = {"one": one, "batch": batch, "recall10": r10, "recall_m": rm}
            label = f"{hnsw_build:8.2f} {size:8.1f} {hnsw_rss:8.1f}" if ef == args.ef[0] else f"{'':8} {'':8} {'':8}"
            print(f"{n:>8,} {'hnsw':>6} {label} {one * 1e3:11.3f} {batch * 1e3:17.3f} {ef:>8} {r10:9.3f} {rm:10.3f}",
                  flush=True)
        depths = {}
        for depth in sorted({args.m, args.m_first}):  # the shortlist's own depths, as faiss_top searches them
            truth = flat.search(queries, depth)[1]
            sample = queries[:args.depth_queries]
            depths[depth] = {"flat": min(one_at_a_time(flat, sample, depth) for _ in range(args.repeat)),
                             "hnsw": min(one_at_a_time(hnsw, sample, depth) for _ in range(args.repeat)),
                             "recall": recall_at(S.faiss_top(hnsw, queries, depth)[1], truth)}
        results[n] = {"flat_one": flat_one, "flat_build": flat_build, "hnsw_build": hnsw_build, "hnsw": rows,
                      "depths": depths}
        del flat, hnsw, vectors
    print(f"the shortlist's depths (M {args.m}, m_first {args.m_first}), one query at a time, HNSW at efSearch "
          f"max({S.HNSW_EF_SEARCH}, depth) as faiss_top searches:")
    print(f"{'N':>8} {'depth':>6} {'flat ms':>8} {'hnsw ms':>8} {'recall@depth':>12}")
    for n, result in results.items():
        for depth, row in result["depths"].items():
            print(f"{n:>8,} {depth:>6} {row['flat'] * 1e3:8.2f} {row['hnsw'] * 1e3:8.2f} {row['recall']:12.3f}",
                  flush=True)
    largest = results[max(results)]["hnsw"]
    reaching = [ef for ef in args.ef if largest[ef]["recall10"] >= args.recall_target]
    ef = reaching[0] if reaching else args.ef[-1]
    print(f"top-10 queries: efSearch {ef} is the smallest with recall@10 >= {args.recall_target} at {max(results):,} "
          f"({largest[ef]['recall10']:.3f})" + ("" if reaching else " (none reached it: the largest)")
          + f"; hat/search/shortlist.py HNSW_EF_SEARCH = {S.HNSW_EF_SEARCH}")
    ns = np.array(sorted(results), dtype=float)
    for depth in sorted({args.m, args.m_first}):
        flat_ms = np.array([results[int(n)]["depths"][depth]["flat"] * 1e3 for n in ns])
        hnsw_ms = np.array([results[int(n)]["depths"][depth]["hnsw"] * 1e3 for n in ns])
        slope, intercept = np.polyfit(ns, flat_ms, 1)  # exact search: linear in N
        target = args.pays_speedup * hnsw_ms.mean()  # HNSW at a fixed depth: about constant in N
        cross = (target - intercept) / slope
        measured = [f"{int(n):,}: {f / h:.1f}x" for n, f, h in zip(ns, flat_ms, hnsw_ms)]
        print(f"depth {depth}: flat ~ {intercept:.2f} + {slope * 1e3:.3f} ms per 1,000 vectors, HNSW ~ "
              f"{hnsw_ms.mean():.1f} ms (flat / HNSW {', '.join(measured)}): HNSW >= {args.pays_speedup:g}x faster "
              f"from N ~ {cross:,.0f} at D {dim}, N x D ~ {cross * dim:.1e}", flush=True)
    print(f"hat/search/shortlist.py: HNSW from N x D >= HNSW_MIN_SCALARS = {S.HNSW_MIN_SCALARS:.1e} "
          f"(N {S.HNSW_MIN_SCALARS / dim:,.0f} at D {dim})")
    return results


# -- agreement -------------------------------------------------------------------------

def demo_features(retriever, data_root: str, n_queries: int | None = None):
    """(image features, caption features, caption -> image) of the test split in
    data_root; with ``n_queries`` only that many of its captions, evenly spaced."""
    from torch.utils.data import Subset

    from datamodules import open_split
    from datamodules.datasets import SplitCaptions, SplitImages, caption_loader, image_loader, pad_id_of
    from datamodules.transforms import build_transform

    plugin, model, c = retriever.plugin, retriever.model, retriever.config
    split = open_split(data_root, c["dataset"], "test")
    transform = build_transform(c["image_transform"], c["image_size"], train=False)
    images = plugin.encode_image_set(model, image_loader(SplitImages(split, transform), c["eval_batch_size"], 0),
                                     retriever.device)
    captions = SplitCaptions(split, retriever.tokenizer, c["max_text_len"], c["captions_per_image"])
    chosen = torch.arange(len(captions))
    if n_queries is not None and n_queries < len(captions):
        chosen = torch.linspace(0, len(captions) - 1, n_queries).round().long()
    loader = caption_loader(Subset(captions, chosen.tolist()), c["eval_batch_size"], 0,
                            pad_id=pad_id_of(retriever.tokenizer), pad_to=plugin.pad_to)
    return images, plugin.encode_caption_set(model, loader, retriever.device), captions.caption_to_image[chosen]


def first_stages(model, images, captions) -> dict:
    """name -> [Q, N] first-stage scores (higher first) of every pooling, of level-3 SCAN
    alone and of a random order."""
    out = {}
    for pooling in S.POOLINGS:
        index, _ = S.build_faiss(S.pooled_image_vectors(images, pooling), "flat")
        scores, ids = S.faiss_top(index, S.pooled_text_vectors(captions, pooling), index.ntotal)
        full = torch.empty(len(ids), index.ntotal)
        full.scatter_(1, torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(scores))
        out[f"pooled {pooling}"] = full
    last = level_similarities(model, {"images": images[-1:], "captions": captions["captions"][-1:],
                                      "lengths": captions["lengths"]})[0]
    out["SCAN level 3"] = last.t()
    g = torch.Generator().manual_seed(0)
    out["random"] = torch.rand(last.t().shape, generator=g)
    return out


def agreement_rows(exact: torch.Tensor, stage: torch.Tensor, ms, caption_to_image, middle=None,
                   m_first: int | None = None) -> list:
    """exact, stage [Q, N]: per M (overlap@10, top-1 in shortlist, R@1, R@10 of the
    shortlisted ranking). ``middle`` [Q, N] and ``m_first``: the shortlist is the top M by
    ``middle`` among the top m_first by ``stage``."""
    n = exact.shape[1]
    top10 = exact.topk(10, dim=1).indices
    top1 = top10[:, :1]
    rows = []
    for m in ms:
        if middle is not None:
            first = stage.topk(min(m_first, n), dim=1).indices
            candidates = first.gather(1, middle.gather(1, first).topk(min(m, first.shape[1]), dim=1).indices)
        else:
            candidates = stage.topk(min(m, n), dim=1).indices
        ranked = candidates.gather(1, exact.gather(1, candidates).argsort(dim=1, descending=True))
        short10 = ranked[:, :10]
        overlap = (short10[:, :, None] == top10[:, None, :]).any(dim=2).float().sum(dim=1) / 10
        in_list = (candidates == top1).any(dim=1).float()
        truth = caption_to_image[:, None]
        rows.append({"m": m, "overlap": overlap.mean().item(), "top1": in_list.mean().item(),
                     "r1": (ranked[:, :1] == truth).any(dim=1).float().mean().item() * 100,
                     "r10": (short10 == truth).any(dim=1).float().mean().item() * 100})
    return rows


def agreement_table(model, images, captions, caption_to_image, ms, first_fractions, title: str) -> dict:
    scores = summed_levels(level_similarities(model, {"images": images, **captions})).t()  # [Q, N]
    n, q = scores.shape[1], scores.shape[0]
    print(f"\n## agreement, {title}: {n} pictures, {q} captions searching them (t2i), direction "
          f"{model.direction}; exact t2i R@1 "
          f"{(scores.argmax(dim=1) == caption_to_image).float().mean().item() * 100:.1f}", flush=True)
    print(f"{'first stage':>38} {'M':>5} {'M/N':>6} {'overlap@10':>10} {'top-1 in':>9} {'R@1':>6} {'R@10':>6}",
          flush=True)
    stages, summary = first_stages(model, images, captions), {}
    sizes = sorted({max(round(f * n), 1) if f <= 1 else int(f) for f in first_fractions})
    cascades = [(f"pooled {S.POOLING} {size} > SCAN level 3", size) for size in sizes if size < n]
    for name, stage in [*stages.items(), *((label, None) for label, _ in cascades)]:
        if stage is None:
            m_first = dict(cascades)[name]
            rows = agreement_rows(scores, stages[f"pooled {S.POOLING}"], [m for m in ms if m < m_first],
                                  caption_to_image, stages["SCAN level 3"], m_first)
        else:
            rows = agreement_rows(scores, stage, ms, caption_to_image)
        summary[name] = rows
        for row in rows:
            print(f"{name:>38} {row['m']:>5} {row['m'] / n:6.3f} {row['overlap']:10.3f} {row['top1']:9.3f} "
                  f"{row['r1']:6.1f} {row['r10']:6.1f}", flush=True)
    # the module's own path (the chosen pooling, the first cascade) against the rows above
    m = ms[len(ms) // 2]
    wider = [cascade for cascade in cascades if cascade[1] > m]
    label, m_first = max(wider, key=lambda c: c[1]) if wider else (f"pooled {S.POOLING}", None)
    got = S.shortlisted_scores(model, images, captions, m=m, k=10, m_first=m_first)
    ref = scores.gather(1, got.candidates)
    picked = next(row for row in summary[label] if row["m"] == m)
    overlap = (got.indices[:, :, None] == scores.topk(10, dim=1).indices[:, None, :]).any(2).float().sum(1).mean() / 10
    print(f"shortlisted_scores (M {m}, m_first {m_first}: '{label}'): overlap@10 {overlap.item():.3f} "
          f"(table {picked['overlap']:.3f}); its scores vs the exact matrix: max |diff| "
          f"{(ref - got.candidate_scores).abs().max().item():.1e}", flush=True)
    if n > S.DEFAULT_M:  # the defaults with an HNSW first stage on these (unequal-norm) pooled vectors
        vectors, queries = S.pooled_image_vectors(images), S.pooled_text_vectors(captions)
        flat, _ = S.build_faiss(vectors, "flat")
        hnsw, _ = S.build_faiss(vectors, "hnsw")
        depths = sorted({S.DEFAULT_M, min(S.DEFAULT_M_FIRST, n)})
        recalls = [recall_at(S.faiss_top(hnsw, queries, d)[1], S.faiss_top(flat, queries, d)[1]) for d in depths]
        top10 = scores.topk(10, dim=1).indices
        overlaps = []
        for index in (flat, hnsw):
            got = S.shortlisted_scores(model, images, captions, index=index)
            overlaps.append(((got.indices[:, :, None] == top10[:, None, :]).any(2).float().sum(1).mean() / 10).item())
        print(f"HNSW (M {S.HNSW_M}, equal_norms) over these pooled vectors: recall@depth vs flat "
              f"{', '.join(f'{d}: {r:.4f}' for d, r in zip(depths, recalls))}; shortlisted_scores at the defaults "
              f"(M {S.DEFAULT_M}, m_first {S.DEFAULT_M_FIRST}) overlap@10 flat {overlaps[0]:.3f}, HNSW "
              f"{overlaps[1]:.3f}", flush=True)
    return summary


def agreement(args) -> None:
    if not args.checkpoint:
        print("\n## agreement: skipped (pass --checkpoint, a trained HAT demo checkpoint, e.g. runs/1/best.ckpt)")
        return
    from datamodules.demo import ensure_demo_data
    from hat.retrieval import load_model

    retriever = load_model(args.checkpoint)
    if retriever.config["model"] != "hat":
        print(f"\n## agreement: skipped ({args.checkpoint} is a {retriever.config['model']} checkpoint: Multi-SEA's "
              f"shortlist is its ITC top_k, which a flat index finds exactly)")
        return
    c = retriever.config
    root = args.data_root or ensure_demo_data(None, c["demo_train_images"], c["demo_eval_images"], c["image_size"],
                                              c["seed"])
    start = time.perf_counter()
    images, captions, caption_to_image = demo_features(retriever, root)
    print(f"\nencoded the demo test split of {root} in {time.perf_counter() - start:.1f} s "
          f"(checkpoint {args.checkpoint})", flush=True)
    agreement_table(retriever.model, images, captions, caption_to_image, args.agree_m, args.agree_first,
                    "demo test split")
    if args.large_images:
        root = ensure_demo_data(args.large_root, 10, args.large_images, c["image_size"], args.large_seed)
        images, captions, caption_to_image = demo_features(retriever, root, args.large_queries)
        ms = sorted({max(10, round(f * args.large_images)) for f in (0.01, 0.025, 0.05, 0.1, 0.25, 0.5)}
                    | {S.DEFAULT_M})
        agreement_table(retriever.model, images, captions, caption_to_image, ms, args.agree_first,
                        f"demo set seed {args.large_seed}, test split")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("section", nargs="?", default="all", choices=("exact", "faiss", "agreement", "all"))
    parser.add_argument("--shapes", default="demo,paper", help="of " + ", ".join(SHAPES))
    parser.add_argument("--directions", default="i2t,t2i")
    parser.add_argument("--n", default="1000,10000", help="pictures, comma-separated")
    parser.add_argument("--slab", type=int, default=1000, help="distinct pictures held (paper shapes)")
    parser.add_argument("--query-tokens", type=int, default=14, help="12 words + [CLS] + [SEP]")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ms-batch", type=int, default=4, help="Multi-SEA: queries re-ranked together")
    parser.add_argument("--m", type=int, default=S.DEFAULT_M, help="shortlist: pictures scored exactly")
    parser.add_argument("--m-first", type=int, default=S.DEFAULT_M_FIRST,
                        help="cascade: pictures the first stage passes to SCAN level 3")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default=None,
                        help="cpu: the process's CPU time (default with one thread); wall: elapsed time")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per exact cell before extrapolating")
    parser.add_argument("--faiss-n", default="10000,30000,100000")
    parser.add_argument("--faiss-dim", type=int, default=768)
    parser.add_argument("--faiss-queries", type=int, default=200)
    parser.add_argument("--depth-queries", type=int, default=50, help="queries timed at the shortlist's depths")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--hnsw-m", type=int, default=S.HNSW_M)
    parser.add_argument("--ef", default="16,32,64,128,256")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--pays-speedup", type=float, default=2.0,
                        help="HNSW pays where exact search at the shortlist's depth takes this many times longer")
    parser.add_argument("--checkpoint", default=None, help="a trained HAT demo checkpoint (agreement)")
    parser.add_argument("--data-root", default=None, help="the demo set (default: ensure_demo_data's)")
    parser.add_argument("--agree-m", default="20,50,100")
    parser.add_argument("--agree-first", default=f"0.25,0.5,{S.DEFAULT_M_FIRST}",
                        help="cascades: the pooled first stage's top (a fraction of N, or a count), then SCAN "
                             "level 3")
    parser.add_argument("--large-images", type=int, default=0, help="agreement on a larger demo test split too")
    parser.add_argument("--large-queries", type=int, default=500)
    parser.add_argument("--large-seed", type=int, default=1)
    parser.add_argument("--large-root", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for key in ("n", "faiss_n", "ef", "agree_m"):
        setattr(args, key, [int(v) for v in getattr(args, key).split(",")])
    args.agree_first = [float(v) for v in args.agree_first.split(",") if v]
    args.shapes, args.directions = args.shapes.split(","), args.directions.split(",")
    import faiss

    global clock
    clock = CLOCKS[args.clock or ("cpu" if args.threads == 1 else "wall")]
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    cpu = clock is time.process_time
    print(f"# cpu ({os.cpu_count()} cores), torch {torch.__version__} {torch.get_num_threads()} thread(s), faiss "
          f"{faiss.__version__}, numpy {np.__version__}, load average {load}; times: "
          f"{'CPU time of the process' if cpu else 'wall-clock'}"
          f"{' (columns marked wall: elapsed, which also counts waiting for a core)' if cpu else ''}", flush=True)
    with torch.no_grad():
        if args.section in ("exact", "all"):
            exact(args)
        if args.section in ("faiss", "all"):
            faiss_bench(args)
        if args.section in ("agreement", "all"):
            agreement(args)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# load average now {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
