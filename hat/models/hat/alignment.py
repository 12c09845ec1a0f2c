"""SCAN-style cross attention between image regions and caption words (HAT).

One score per (image, caption) pair and level. Both directions use the Gram-matrix
identities, so the attended context vectors are never materialised:

* i2t (regions are queries):  cos(v_r, c_r) = (sum_w a_rw s_wr) / (|v_r| sqrt(a_r^T G a_r)),
  G = T T^T the caption's word Gram matrix [n, n].
* t2i (words are queries):    cos(t_w, c_w) = (sum_r a_wr s_rw) / (|t_w| sqrt(a_w^T H a_w)),
  H = V V^T the image's region Gram matrix [R, R].

Both become one kernel, `_attend`, on a block of raw scores [B, Q, K]: B Gram matrices
(captions for i2t, images for t2i), Q the attended tokens of each (words / regions, the
softmax axis), K the queries (image tile regions / caption chunk words). With the
unnormalised weights e = exp(lambda s') and Z = sum e, the softmax's 1/Z cancels:
    cos = (e . s) / max(|query| sqrt(e^T G e), 1e-8 Z)
and Z comes out of the Gram product for free (one extra row of G: the word mask).
exp needs no max-subtraction: s' = l / (|l| + 1e-8) lies in [-1, 1], so the logits lie
in [-lambda, lambda] (shifted by their maximum only when lambda > 20).

Padding is exact without any mask on the score blocks: padded words are set to zero, so
their raw scores are 0; they add nothing to e.s, to e^T G e (their G rows are zero) or to
the L2 norm over words, the mask row of G keeps them out of Z, and in t2i their cosine is
0 (|t_w| = 0) and the mean divides by the real length. (Under autograd those t2i cosines
are masked anyway: their 1/(1e-8 Z) gradient would overflow half precision.)

Cost per block beyond the token GEMM (Q*K*D): the Gram product Q*Q*K (i2t: n <= 32 words,
~3% of the GEMM; t2i: R regions, R/D of the GEMM: 26% at R = 196, ~100% at R = 784, the
same as materialising c_w) and about ten elementwise passes over the [B, Q, K] block.

Work is done in tiles: captions are sorted by length and cut into chunks (each chunk is
padded only to its own longest caption), images into tiles; the tile sizes bound peak
memory (never proportional to N_images x N_captions x R). Without autograd the tile
kernel works in place in reusable buffers; with autograd it is the same sequence of
operations out of place (training). Half-precision inputs: on CUDA the token GEMM runs
in fp16/bf16 with fp32 accumulation and fp32 output; on CPU they are upcast per tile;
everything after the GEMM is fp32, and the result is fp32.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

LEAKY_SLOPE = 0.1
NORM_EPS = 1e-8  # added to the L2 norm of the attention logits
COS_EPS = 1e-8  # cos(x, y) = x.y / max(|x||y|, COS_EPS)
UNSHIFTED_LAMBDA_MAX = 20.0  # logits in [-lambda, lambda]: exp cannot overflow fp32 below this
HALF_DTYPES = (torch.float16, torch.bfloat16)

# Default tile: about TILE_SCORES[device] raw scores (B * Q * K) per block. On CPU a
# block's three fp32 buffers (12 MB) stay in L3 and each kernel is long enough for two
# threads (2^18 is as fast on an idle machine, slower on a busy one); on CUDA, and under
# autograd on any device, a block is 512 MB of fp32 scores (about 2 GB of working memory).
TILE_SCORES = {"cpu": 2**20, "cuda": 2**27}
CHUNK_TOKENS = {"cpu": 640, "cuda": 16384}  # padded caption tokens per caption chunk
# Autograd with recomputation (scan_similarity's default): backward's tiles hold about
# this many raw scores; a tile's graph is all that scoring holds beyond its inputs, its
# output and their gradients. On the CPU cache-sized tiles are also the fastest
# (bench/train_step.py: B = 32, 2^17..2^19 alike, 2^21 slower).
RECOMPUTE_SCORES = {"cpu": 2**18, "cuda": 2**24}


def _safe_norm(values: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 norm over ``dim`` (kept) whose gradient is 0, not NaN, where all values are 0
    (padding words)."""
    square_sum = values.square().sum(dim=dim, keepdim=True)
    nonzero = square_sum > 0
    return torch.where(nonzero, torch.where(nonzero, square_sum, 1.0).sqrt(), 0.0)


def _gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """dtype of the token GEMM: half stays half on CUDA (fp32 accumulation); CPU: fp32."""
    if dtype in HALF_DTYPES and device.type != "cuda":
        return torch.float32
    return dtype


@functools.lru_cache(maxsize=None)
def has_fp32_output_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` has a kernel for ``dtype`` inputs
    on ``device`` (probed once, on 2 x 2 inputs; a failure of a real product, such as out
    of memory, is then never mistaken for a missing kernel)."""
    probe = torch.zeros(2, 2, dtype=dtype, device=device)
    try:
        torch.mm(probe, probe, out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _token_scores(rows: torch.Tensor, cols: torch.Tensor, grad: bool, out=None) -> torch.Tensor:
    """rows [M, D] x cols [K, D] -> raw scores [M, K]; fp32 for half inputs."""
    if rows.dtype in HALF_DTYPES:
        if not grad and has_fp32_output_mm(rows.device, rows.dtype):
            # CUDA: fp16/bf16 tensor cores, fp32 accumulation and fp32 output
            return torch.mm(rows, cols.t(), out_dtype=torch.float32)
        # autograd (mm.dtype has no derivative) or no fp32-output kernel: half output
        return torch.mm(rows, cols.t()).float()
    return torch.mm(rows, cols.t(), out=out)


class _Buffers:
    """Reusable flat buffers for the tile temporaries (CPU, no autograd).

    Tiles allocate many-MB temporaries of slightly varying sizes thousands of times;
    glibc keeps such freed blocks fragmented in its heap (GBs over a Flickr30K score),
    so on CPU they live in a few buffers instead. Disabled: every call returns None and
    the operations allocate as usual (autograd, CUDA's caching allocator)."""

    def __init__(self, enabled: bool, device, dtype):
        self.enabled, self.device, self.dtype, self.store = enabled, device, dtype, {}

    def __call__(self, name: str, *shape: int, dtype=None):
        if not self.enabled:
            return None
        dtype = dtype or self.dtype
        numel = math.prod(shape)
        buffer = self.store.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            size = numel if buffer is None else max(numel, buffer.numel() * 5 // 4)
            buffer = self.store[name] = torch.empty(size, device=self.device, dtype=dtype)
        return buffer[:numel].view(shape)


def _converted(tensor, dtype, out):
    """``tensor`` in ``dtype``; a copy into ``out`` when given and a conversion is needed."""
    if tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype) if out is None else out.copy_(tensor)


def _attend(raw, gram, query_sq_norms, group, lambda_softmax, inplace, buffers=None):
    """The tile kernel, for both directions.

    raw [B, Q, K] raw token scores; gram [B, Q+1, Q]: B Gram matrices of the attended
    tokens plus one row weighting them in Z (the word mask for i2t, ones for t2i);
    query_sq_norms [K] squared norms of the queries; the L2 norm of step 2 runs over
    consecutive groups of ``group`` entries along K (one image's regions for i2t, one
    caption's words for t2i). Returns cos [B, K]. ``inplace`` overwrites ``raw`` (and
    then the result lives in ``buffers`` when those are enabled).
    """
    b, q, k = raw.shape
    out = buffers or _Buffers(False, None, None)
    logits = out("logits", b, q, k, dtype=raw.dtype)
    if logits is None:
        logits = F.leaky_relu(raw, LEAKY_SLOPE)  # [B, Q, K]
    else:
        torch.ops.aten.leaky_relu.out(raw, LEAKY_SLOPE, out=logits)
    grouped = logits.view(b, q, k // group, group)
    if inplace:
        norm = torch.linalg.vector_norm(grouped, dim=3, keepdim=True,
                                        out=out("norm", b, q, k // group, 1, dtype=raw.dtype))
        grouped.mul_(norm.add_(NORM_EPS).reciprocal_().mul_(lambda_softmax))
    else:
        norm = _safe_norm(grouped, dim=3) + NORM_EPS  # [B, Q, K/group, 1]
        logits = (grouped * (lambda_softmax / norm)).view(b, q, k)
    if lambda_softmax > UNSHIFTED_LAMBDA_MAX:
        peak = logits.amax(dim=1, keepdim=True)
        logits = logits.sub_(peak) if inplace else logits - peak
    weights = logits.exp_() if inplace else logits.exp()  # e = Z a  [B, Q, K]
    gram_weights = torch.bmm(gram, weights, out=out("gram", b, q + 1, k, dtype=raw.dtype))
    total = gram_weights[:, q]  # Z  [B, K]
    if inplace:
        context_sq = torch.sum(gram_weights[:, :q].mul_(weights), dim=1,
                               out=out("context", b, k, dtype=raw.dtype))  # Z^2 |c|^2  [B, K]
        numerator = torch.sum(raw.mul_(weights), dim=1,
                              out=out("numerator", b, k, dtype=raw.dtype))  # Z (query . c)
        denom = context_sq.mul_(query_sq_norms).sqrt_()
        denom = torch.maximum(denom, total.mul_(COS_EPS), out=denom)
        return numerator.div_(denom)
    context_sq = (gram_weights[:, :q] * weights).sum(dim=1)
    numerator = (raw * weights).sum(dim=1)
    denom_sq = (context_sq * query_sq_norms).maximum((COS_EPS * total).square())
    return numerator / denom_sq.sqrt()


def _caption_chunks(lengths: list[int], caption_tile, tokens: int):
    """Captions sorted by length, cut into chunks: (first, last) positions in the sorted
    order. caption_tile fixes the number per chunk; otherwise a chunk holds about
    ``tokens`` padded tokens."""
    chunks, start = [], 0
    while start < len(lengths):
        if caption_tile is not None:
            stop = min(start + int(caption_tile), len(lengths))
        else:
            stop = start + 1
            while stop < len(lengths) and (stop + 1 - start) * lengths[stop] <= tokens:
                stop += 1
        chunks.append((start, stop))
        start = stop
    return chunks


def _chunk_words(captions, chunk, dtype, buffers):
    """The chunk's captions [C, n, D] in ``dtype``, padding set to zero."""
    index, mask = chunk[0], chunk[1]
    words = torch.index_select(captions[:, :mask.shape[1]], 0, index,
                               out=buffers("words", *mask.shape, captions.shape[2],
                                           dtype=captions.dtype))
    words = _converted(words, dtype, buffers("words_c", *words.shape))
    return words.masked_fill_(~mask[:, :, None], 0.0)  # a fresh tensor or a buffer


def scan_similarity(
    images: torch.Tensor,
    captions: torch.Tensor,
    caption_lengths: torch.Tensor,
    direction: str = "i2t",
    lambda_softmax: float = 9.0,
    image_tile: int | None = None,
    caption_tile: int | None = None,
    recompute: bool = True,
) -> torch.Tensor:
    """Score every image against every caption at one level.

    images [N_images, R, D]; captions [N_captions, L, D]; caption_lengths [N_captions]
    counts the real tokens ([CLS] and [SEP] included); later positions are padding and
    do not influence the result. Returns [N_images, N_captions] in the inputs' dtype
    (float32 for float16/bfloat16 inputs). image_tile / caption_tile: images and
    captions per tile (None: sizes that keep a tile near TILE_SCORES scores).

    Under autograd, ``recompute`` (the default) bounds memory: the forward is the
    evaluation's kernel (in place, nothing kept but the inputs) and backward computes
    each tile again with autograd, differentiates it and adds its share to the input
    gradients, so that memory holds one tile's graph (RECOMPUTE_SCORES scores) instead
    of every tile's. The gradients are those of ``recompute=False``, where autograd
    keeps every tile (memory grows with N_images x N_captions).
    """
    if direction not in ("i2t", "t2i"):
        raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")
    if images.dim() != 3 or captions.dim() != 3 or images.shape[2] != captions.shape[2]:
        raise ValueError(
            f"expected images [N, R, D] and captions [M, L, D], got {tuple(images.shape)} "
            f"and {tuple(captions.shape)}"
        )
    lengths = torch.as_tensor(caption_lengths, device=captions.device).long().reshape(-1)
    if lengths.numel() != captions.shape[0]:
        raise ValueError(f"{lengths.numel()} caption_lengths for {captions.shape[0]} captions")
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > captions.shape[1]):
        raise ValueError(f"caption_lengths must lie in 1..{captions.shape[1]}")
    grad = torch.is_grad_enabled() and (images.requires_grad or captions.requires_grad)
    if grad and recompute:
        return _RecomputedScan.apply(images, captions, lengths, direction, float(lambda_softmax), image_tile,
                                     caption_tile)
    # CPU without autograd: cache-sized tiles. CUDA, or autograd keeping every tile's
    # intermediates (small tiles would only add overhead): large tiles.
    budget = "cpu" if images.device.type == "cpu" and not grad else "cuda"
    plan = _plan(images, captions, lengths, TILE_SCORES[budget], CHUNK_TOKENS[budget], image_tile, caption_tile)
    if plan is None:
        return images.new_zeros(images.shape[0], captions.shape[0], dtype=_compute_dtype(images, captions))
    chunks, image_tile = plan
    dtypes = _dtypes(images, captions)
    scan = _scan_i2t if direction == "i2t" else _scan_t2i
    with torch.autocast(images.device.type, enabled=False):
        return scan(images, captions, chunks, image_tile, lambda_softmax, *dtypes, grad)


def _compute_dtype(images, captions) -> torch.dtype:
    dtype = torch.promote_types(images.dtype, captions.dtype)
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _dtypes(images, captions) -> tuple[torch.dtype, torch.dtype]:
    """(GEMM dtype, compute dtype) of a level's inputs."""
    dtype = torch.promote_types(images.dtype, captions.dtype)
    return _gemm_dtype(dtype, images.device), _compute_dtype(images, captions)


def _plan(images, captions, lengths, budget: int, chunk_tokens: int, image_tile, caption_tile):
    """The tiling: (caption chunks, images per tile), or None when there is nothing to score.
    A chunk is (column indices [C], word mask [C, n], real lengths [C]) of captions sorted
    by length; ``budget`` raw scores per block set the default tile sizes."""
    n_images, regions, _ = images.shape
    device = images.device
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].tolist()
    tokens = max(64, min(chunk_tokens, budget // regions))
    chunks = []
    for start, stop in _caption_chunks(sorted_lengths, caption_tile, tokens):
        real = torch.as_tensor(sorted_lengths[start:stop], device=device)
        mask = torch.arange(sorted_lengths[stop - 1], device=device)[None, :] < real[:, None]
        chunks.append((order[start:stop].to(device), mask, real))
    if n_images == 0 or not chunks:
        return None
    if image_tile is None:  # the largest chunk's block stays near the budget
        widest = max(mask.numel() for _, mask, _ in chunks)  # padded tokens of a chunk
        image_tile = max(1, budget // (regions * widest))
    return chunks, int(image_tile)


def _word_gram(words: torch.Tensor, mask: torch.Tensor, dtype) -> torch.Tensor:
    """G = T T^T of each caption plus its word mask as one more row: [C, n+1, n]."""
    words = words.to(dtype)
    return torch.cat([torch.bmm(words, words.transpose(1, 2)), mask[:, None, :].to(dtype)], dim=1)


def _i2t_block(image_rows, flat_words, gram, regions, lambda_softmax, gemm_dtype, compute_dtype, grad,
               buffers) -> torch.Tensor:
    """Scores [I, C] of an image tile (its regions [I*R, D]) against a caption chunk
    (words [C*n, D], padding zero; ``gram`` [C, n+1, n] from `_word_gram`)."""
    width, dim = image_rows.shape
    n_chunk, n_words = gram.shape[0], gram.shape[2]
    tile = _converted(image_rows, gemm_dtype, buffers("tile", width, dim))  # [I*R, D]
    region_sq = torch.linalg.vector_norm(tile, dim=1, dtype=compute_dtype).square()
    raw = _token_scores(flat_words, tile, grad, buffers("raw", n_chunk * n_words, width))
    raw = raw.to(compute_dtype).view(n_chunk, n_words, width)  # [C, n, I*R]
    cosine = _attend(raw, gram, region_sq, regions, lambda_softmax, not grad, buffers)  # [C, I*R]
    return cosine.view(n_chunk, width // regions, regions).mean(dim=2).t()


def _scan_i2t(images, captions, chunks, image_tile, lambda_softmax, gemm_dtype, compute_dtype,
              grad):
    """Captions outer (one word Gram matrix per chunk), image tiles inner."""
    n_images, regions, dim = images.shape
    images_flat = images.reshape(n_images * regions, dim)  # [N*R, D]
    buffers = _Buffers(not grad and images.device.type == "cpu", images.device, compute_dtype)
    sims = images.new_zeros(n_images, captions.shape[0], dtype=compute_dtype)
    for chunk in chunks:
        index, mask, _ = chunk
        words = _chunk_words(captions, chunk, gemm_dtype, buffers)  # [C, n, D]
        flat_words = words.reshape(-1, dim)  # [C*n, D]
        gram = _word_gram(words, mask, compute_dtype)
        for i0 in range(0, n_images, image_tile):
            i1 = min(i0 + image_tile, n_images)
            block = _i2t_block(images_flat[i0 * regions:i1 * regions], flat_words, gram, regions, lambda_softmax,
                               gemm_dtype, compute_dtype, grad, buffers)  # [I, C]
            sims[i0:i1].index_copy_(1, index, block)
    return sims


def _t2i_rows(tile_images, captions, chunks, lambda_softmax, gemm_dtype, compute_dtype, grad, buffers,
              out: torch.Tensor) -> torch.Tensor:
    """Scores of an image tile [I, R, D] against every caption, written into ``out``
    [I, N_captions]: one region Gram matrix, the caption chunks gathered in turn."""
    n_tile, regions, dim = tile_images.shape
    tile = _converted(tile_images, gemm_dtype, buffers("tile", n_tile, regions, dim))
    tile_c = tile.to(compute_dtype)  # [I, R, D]
    region_gram = torch.bmm(tile_c, tile_c.transpose(1, 2),
                            out=buffers("region_gram", n_tile, regions, regions))  # H
    gram = buffers("gram_rows", n_tile, regions + 1, regions)  # [I, R+1, R]
    if gram is None:
        gram = torch.cat([region_gram, tile_c.new_ones(n_tile, 1, regions)], dim=1)
    else:
        gram[:, :regions].copy_(region_gram)
        gram[:, regions].fill_(1.0)
    flat_regions = tile.reshape(n_tile * regions, dim)  # [I*R, D]
    for chunk in chunks:
        index, mask, real = chunk
        n_chunk, n_words = mask.shape
        flat_words = _chunk_words(captions, chunk, gemm_dtype, buffers).reshape(-1, dim)
        word_sq = torch.linalg.vector_norm(flat_words, dim=1, dtype=compute_dtype).square()
        raw = _token_scores(flat_regions, flat_words, grad,
                            buffers("raw", flat_regions.shape[0], n_chunk * n_words))
        raw = raw.to(compute_dtype).view(n_tile, regions, n_chunk * n_words)  # [I, R, C*n]
        cosine = _attend(raw, gram, word_sq, n_words, lambda_softmax, not grad, buffers)  # [I, C*n]
        cosine = cosine.view(n_tile, n_chunk, n_words)  # padded words: exactly 0 ...
        if grad:  # ... but with a 1/(1e-8 Z) gradient, which half precision overflows
            cosine = cosine.masked_fill(~mask, 0.0)
        block = cosine.sum(dim=2) / real  # [I, C]
        out.index_copy_(1, index, block.to(compute_dtype))
    return out


def _scan_t2i(images, captions, chunks, image_tile, lambda_softmax, gemm_dtype, compute_dtype,
              grad):
    """Image tiles outer (one region Gram matrix per tile), caption chunks inner (gathered
    again for every image tile: no copy of the captions is kept)."""
    n_images = images.shape[0]
    buffers = _Buffers(not grad and images.device.type == "cpu", images.device, compute_dtype)
    sims = images.new_zeros(n_images, captions.shape[0], dtype=compute_dtype)
    for i0 in range(0, n_images, image_tile):
        i1 = min(i0 + image_tile, n_images)
        _t2i_rows(images[i0:i1], captions, chunks, lambda_softmax, gemm_dtype, compute_dtype, grad, buffers,
                  sims[i0:i1])
    return sims


class _RecomputedScan(torch.autograd.Function):
    """scan_similarity with recompute=True under autograd: the forward keeps only the
    inputs; backward computes one tile at a time with autograd (RECOMPUTE_SCORES scores
    per tile) and adds its gradients into the inputs' gradients."""

    @staticmethod
    def forward(ctx, images, captions, lengths, direction, lambda_softmax, image_tile, caption_tile):
        ctx.save_for_backward(images, captions, lengths)
        ctx.settings = (direction, lambda_softmax, image_tile, caption_tile)
        return scan_similarity(images, captions, lengths, direction, lambda_softmax, image_tile, caption_tile)

    @staticmethod
    def backward(ctx, grad_sims):
        images, captions, lengths = ctx.saved_tensors
        direction, lambda_softmax, image_tile, caption_tile = ctx.settings
        need_images, need_captions = ctx.needs_input_grad[:2]
        kind = "cpu" if images.device.type == "cpu" else "cuda"
        plan = _plan(images, captions, lengths, RECOMPUTE_SCORES[kind], CHUNK_TOKENS["cuda"], image_tile,
                     caption_tile)
        # the tiles' gradients add up in the compute dtype (fp32 for half inputs)
        compute_dtype = _compute_dtype(images, captions)
        grad_images = torch.zeros_like(images, dtype=compute_dtype) if need_images else None
        grad_captions = torch.zeros_like(captions, dtype=compute_dtype) if need_captions else None
        if plan is not None:
            backward = _i2t_backward if direction == "i2t" else _t2i_backward
            with torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
                backward(images.detach(), captions.detach(), *plan, lambda_softmax, grad_sims, grad_images,
                         grad_captions)
        return (grad_images.to(images.dtype) if need_images else None,
                grad_captions.to(captions.dtype) if need_captions else None, None, None, None, None, None)


def _tile_grads(output, grad_output, inputs: list) -> list:
    """d(output . grad_output) / d(each input that requires grad); None for the others."""
    wanted = [x for x in inputs if x.requires_grad]
    grads = iter(torch.autograd.grad(output, wanted, grad_output) if wanted else ())
    return [next(grads) if x.requires_grad else None for x in inputs]


def _i2t_backward(images, captions, chunks, image_tile, lambda_softmax, grad_sims, grad_images, grad_captions):
    """Per caption chunk: its words' graph (gather, Gram matrix) once; per image tile: the
    tile's graph, differentiated and freed; the words' gradient at the end of the chunk."""
    n_images, regions, dim = images.shape
    gemm_dtype, compute_dtype = _dtypes(images, captions)
    images_flat = images.reshape(n_images * regions, dim)
    grad_images_flat = grad_images.view(n_images * regions, dim) if grad_images is not None else None
    off = _Buffers(False, None, None)
    grad_sims = grad_sims.to(compute_dtype)
    for index, mask, _ in chunks:
        n_words = mask.shape[1]
        leaf = captions[:, :n_words].index_select(0, index).requires_grad_(grad_captions is not None)
        words = leaf.to(gemm_dtype).masked_fill(~mask[:, :, None], 0.0)  # [C, n, D]
        flat_words, gram = words.reshape(-1, dim), _word_gram(words, mask, compute_dtype)
        chunk_inputs = [x.detach().requires_grad_(leaf.requires_grad) for x in (flat_words, gram)]
        grad_words = torch.zeros_like(flat_words, dtype=compute_dtype)  # tiles summed in fp32 (half inputs)
        grad_gram = torch.zeros_like(gram)
        for i0 in range(0, n_images, image_tile):
            i1 = min(i0 + image_tile, n_images)
            rows = images_flat[i0 * regions:i1 * regions].requires_grad_(grad_images is not None)
            block = _i2t_block(rows, *chunk_inputs, regions, lambda_softmax, gemm_dtype, compute_dtype, True, off)
            g_rows, g_words, g_gram = _tile_grads(block, grad_sims[i0:i1].index_select(1, index),
                                                  [rows, *chunk_inputs])
            if g_rows is not None:
                grad_images_flat[i0 * regions:i1 * regions] += g_rows.to(grad_images_flat.dtype)
            if g_words is not None:
                grad_words += g_words
                grad_gram += g_gram
            del block
        if grad_captions is not None:
            (g_leaf,) = torch.autograd.grad([flat_words, gram], [leaf],
                                            [grad_words.to(flat_words.dtype), grad_gram])
            grad_captions[:, :n_words].index_add_(0, index, g_leaf.to(grad_captions.dtype))


def _t2i_backward(images, captions, chunks, image_tile, lambda_softmax, grad_sims, grad_images, grad_captions):
    """Per image tile: its graph against every caption chunk, differentiated and freed."""
    n_images = images.shape[0]
    gemm_dtype, compute_dtype = _dtypes(images, captions)
    off = _Buffers(False, None, None)
    grad_sims = grad_sims.to(compute_dtype)
    for i0 in range(0, n_images, image_tile):
        i1 = min(i0 + image_tile, n_images)
        tile = images[i0:i1].requires_grad_(grad_images is not None)
        leaf = captions.detach().requires_grad_(grad_captions is not None)
        rows = _t2i_rows(tile, leaf, chunks, lambda_softmax, gemm_dtype, compute_dtype, True, off,
                         tile.new_zeros(i1 - i0, captions.shape[0], dtype=compute_dtype))
        g_tile, g_captions = _tile_grads(rows, grad_sims[i0:i1], [tile, leaf])
        if g_tile is not None:
            grad_images[i0:i1] = g_tile
        if g_captions is not None:
            grad_captions += g_captions
        del rows


def scan_attention(image_tokens: torch.Tensor, caption_tokens: torch.Tensor, direction: str = "i2t",
                   lambda_softmax: float = 9.0) -> torch.Tensor:
    """The SCAN attention weights of one (image, caption) pair at one level, as a word x
    region map [n, R] (what the gallery draws; `scan_similarity` never forms them).

    image_tokens [R, D]; caption_tokens [n, D]: the caption's real tokens only ([CLS] and
    [SEP] included, no padding). i2t: entry (w, r) is a_rw, the share of region r's
    attention (a softmax over the words) that goes to word w. t2i: entry (w, r) is a_wr,
    word w's attention over the regions (each row sums to 1)."""
    if direction not in ("i2t", "t2i"):
        raise ValueError(f"direction must be 'i2t' or 't2i', got {direction!r}")
    images, words = image_tokens.float(), caption_tokens.float()
    raw = F.leaky_relu(words @ images.t(), LEAKY_SLOPE)  # [n, R]
    # i2t: each word's scores normalised over the regions, softmax over the words;
    # t2i: each region's scores normalised over the words, softmax over the regions
    norm_dim, softmax_dim = (1, 0) if direction == "i2t" else (0, 1)
    normalised = raw / (torch.linalg.vector_norm(raw, dim=norm_dim, keepdim=True) + NORM_EPS)
    return torch.softmax(lambda_softmax * normalised, dim=softmax_dim)
