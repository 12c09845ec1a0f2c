"""Retrieval evaluation: encode once, score every pair, apply the recall protocol.

The recall protocol: for each query the rank is the number of negatives
scoring at least as high as its best positive (ties never favour the positive).
Ranks are computed in chunks of queries on the device holding the score matrix.

Pipeline: `encode_features` (each image and caption once; features stay on the device,
float16 on CUDA) -> `level_similarities` (one [N_images, N_captions] matrix per level)
-> optional `ensemble_similarities` (mean over checkpoints) -> `recall` (Flickr30K 1K,
MSCOCO 5K) or `fold_recall` (MSCOCO 1K: five consecutive folds). `save_features` /
`load_features` / `feature_cache_path` cache encoded features per checkpoint and split.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from hat.distributed import active_world, broadcast_from_main, gather_shards, pad_dim_to, shard_range

METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
    "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr",
)
RANK_CHUNK = 1024
# config value of feature_dtype -> torch dtype (None: fp16 on CUDA, fp32 elsewhere)
FEATURE_DTYPES = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class EvalData:
    """One split to evaluate: loaders over its images (in order) and its captions, the
    image of each caption [N_captions], and the split's arrow files (what a feature cache
    is keyed by)."""

    images: object
    captions: object
    caption_to_image: torch.Tensor
    files: list = field(default_factory=list)


class NonFiniteScores(ValueError):
    """A score matrix holds NaN or infinite values: its ranks would mean nothing (a NaN
    compares false with everything, so every query would look ranked first)."""

    def __init__(self, n_nan: int, n_inf: int, total: int):
        self.n_nan, self.n_inf, self.total = n_nan, n_inf, total
        super().__init__(f"{n_nan} NaN and {n_inf} infinite scores of {total}")


def check_finite(sims: torch.Tensor) -> None:
    """Raise `NonFiniteScores` unless every score is finite."""
    if sims.is_floating_point() and not bool(torch.isfinite(sims).all()):
        n_nan = int(torch.isnan(sims).sum())
        raise NonFiniteScores(n_nan, int(torch.isinf(sims).sum()), sims.numel())


def _as_tensor(values) -> torch.Tensor:
    return values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))


def retrieval_ranks(sims, caption_to_image=None) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks: (i2t ranks [N_images], t2i ranks [N_captions]). Raises
    `NonFiniteScores` when a score is NaN or infinite."""
    sims = _as_tensor(sims)
    check_finite(sims)
    n_images, n_captions = sims.shape
    device = sims.device
    if caption_to_image is None:
        caption_to_image = torch.arange(n_captions, device=device) // 5
    caption_to_image = _as_tensor(caption_to_image).to(device=device, dtype=torch.long)
    if caption_to_image.shape != (n_captions,):
        raise ValueError(
            f"caption_to_image has {tuple(caption_to_image.shape)} entries for {n_captions} captions"
        )
    if caption_to_image.min() < 0 or caption_to_image.max() >= n_images:
        raise ValueError(f"caption_to_image refers to images outside 0..{n_images - 1}")
    if torch.bincount(caption_to_image, minlength=n_images).min() == 0:
        raise ValueError("every image needs at least one caption for image->text ranks")

    i2t = torch.empty(n_images, dtype=torch.long, device=device)
    for start in range(0, n_images, RANK_CHUNK):
        rows = sims[start:start + RANK_CHUNK]  # [Q, N_captions]
        query = torch.arange(start, start + rows.shape[0], device=device)
        positive = caption_to_image[None, :] == query[:, None]  # [Q, N_captions]
        best = rows.masked_fill(~positive, float("-inf")).max(dim=1, keepdim=True).values
        i2t[start:start + rows.shape[0]] = ((rows >= best) & ~positive).sum(dim=1)

    t2i = torch.empty(n_captions, dtype=torch.long, device=device)
    images = torch.arange(n_images, device=device)
    for start in range(0, n_captions, RANK_CHUNK):
        cols = sims[:, start:start + RANK_CHUNK]  # [N_images, Q]
        owner = caption_to_image[start:start + cols.shape[1]]
        positive = images[:, None] == owner[None, :]
        score = cols.gather(0, owner[None, :])  # [1, Q]
        t2i[start:start + cols.shape[1]] = ((cols >= score) & ~positive).sum(dim=0)
    return i2t, t2i


def _summarise(ranks: torch.Tensor, prefix: str) -> dict:
    ranks = ranks.cpu().numpy()
    out = {f"{prefix}_r{k}": 100.0 * float((ranks < k).sum()) / len(ranks) for k in (1, 5, 10)}
    out[f"{prefix}_medr"] = float(math.floor(np.median(ranks)) + 1)
    out[f"{prefix}_meanr"] = float(ranks.mean() + 1)
    return out


def recall_sum(metrics: dict) -> float:
    """rSum: i2t R@1 + R@5 + R@10 + t2i R@1 + R@5 + R@10."""
    return sum(metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))


def recall(sims, caption_to_image=None) -> dict:
    """Recall@1/5/10, medr, meanr in both directions and rsum for sims [N_images, N_captions].

    caption_to_image [N_captions] gives each caption's image (default: j // 5).
    """
    i2t, t2i = retrieval_ranks(sims, caption_to_image)
    metrics = {**_summarise(i2t, "i2t"), **_summarise(t2i, "t2i")}
    metrics["rsum"] = recall_sum(metrics)
    return {key: metrics[key] for key in METRIC_KEYS}


def image_folds(n_images: int, n_folds: int, caption_to_image=None, n_captions: int | None = None,
                device=None):
    """The MSCOCO 1K cut: ``n_folds`` consecutive folds of the images with their captions.
    Yields (image rows: slice, caption columns: LongTensor, the fold's caption_to_image)."""
    if n_folds < 1 or n_images % n_folds:
        raise ValueError(f"{n_images} images cannot be cut into {n_folds} equal folds")
    if caption_to_image is None:
        caption_to_image = torch.arange(n_captions, device=device) // 5
    caption_to_image = _as_tensor(caption_to_image).to(device=device, dtype=torch.long)
    fold_size = n_images // n_folds
    for first in range(0, n_images, fold_size):
        columns = torch.nonzero((caption_to_image >= first)
                                & (caption_to_image < first + fold_size)).flatten()
        yield slice(first, first + fold_size), columns, caption_to_image[columns] - first


def mean_over_folds(folds: list[dict]) -> dict:
    """Every metric averaged over the folds; rsum = the sum of the averaged recalls."""
    metrics = {key: sum(f[key] for f in folds) / len(folds) for key in METRIC_KEYS}
    metrics["rsum"] = recall_sum(metrics)
    return metrics


def fold_recall(sims, n_folds: int = 5, caption_to_image=None) -> dict:
    """MSCOCO 1K protocol: cut the images into ``n_folds`` consecutive folds (with their
    captions), compute `recall` on each fold's sub-matrix and average every metric over
    the folds; rsum is the sum of the averaged recalls."""
    sims = _as_tensor(sims)
    return mean_over_folds([
        recall(sims[rows].index_select(1, columns), fold_to_image)
        for rows, columns, fold_to_image in image_folds(*sims.shape[:1], n_folds, caption_to_image,
                                                        sims.shape[1], sims.device)])


def fold_metrics(score_fold, n_folds: int, n_images: int, caption_to_image=None,
                 n_captions: int | None = None, device=None) -> dict:
    """``folds_*`` keys: every metric of ``score_fold(image rows, caption columns, the
    fold's caption_to_image) -> metrics dict`` averaged over the `image_folds`. When the
    images cannot be cut into ``n_folds`` equal folds (a test split of another size) this
    says so and returns {}: the other metrics are still reported."""
    try:
        folds = list(image_folds(n_images, n_folds, caption_to_image, n_captions, device))
    except ValueError as error:
        print(f"eval_folds={n_folds}: {error}; the fold metrics are left out", flush=True)
        return {}
    return {f"folds_{key}": value
            for key, value in mean_over_folds([score_fold(*fold) for fold in folds]).items()}


def summed_levels(levels: list) -> torch.Tensor:
    """The model's score: the level matrices added in HAT.score's order."""
    sims = levels[0]
    for level in levels[1:]:
        sims = sims + level
    return sims


def protocol_metrics(levels: list, caption_to_image=None, per_level: bool = False,
                     n_folds: int | None = None) -> tuple[dict, torch.Tensor]:
    """(metrics, summed matrix) of per-level score matrices: the recalls of their sum,
    optionally ``level{k}_*`` (each level alone) and ``folds_*`` (`fold_metrics`: the
    MSCOCO 1K protocol)."""
    sims = summed_levels(levels)
    metrics = recall(sims, caption_to_image)
    if per_level:
        metrics.update(level_metrics(levels, caption_to_image))
    if n_folds:
        metrics.update(fold_metrics(
            lambda rows, columns, fold_to_image: recall(sims[rows].index_select(1, columns), fold_to_image),
            n_folds, sims.shape[0], caption_to_image, sims.shape[1], sims.device))
    return metrics, sims


def level_metrics(level_sims, caption_to_image=None, n_folds: int | None = None) -> dict:
    """Per-level recalls as flat keys ``level{k}_{metric}``, k = 1.. in level order
    (low, mid, high for HAT's default level_pairs)."""
    out = {}
    for k, sims in enumerate(level_sims, start=1):
        metrics = (recall(sims, caption_to_image) if n_folds is None
                   else fold_recall(sims, n_folds, caption_to_image))
        out.update({f"level{k}_{key}": value for key, value in metrics.items()})
    return out


def format_table(metrics: dict, title: str = "") -> str:
    """A small fixed-width table of a metrics dict from `recall`; per-level rows are
    added when the dict holds ``level{k}_*`` keys."""
    lines = [title] if title else []
    lines.append(f"{'':>6} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'medr':>6} {'meanr':>8}")
    for direction, label in (("i2t", "i2t"), ("t2i", "t2i")):
        lines.append(
            f"{label:>6} {metrics[f'{direction}_r1']:7.2f} {metrics[f'{direction}_r5']:7.2f} "
            f"{metrics[f'{direction}_r10']:7.2f} {metrics[f'{direction}_medr']:6.0f} "
            f"{metrics[f'{direction}_meanr']:8.2f}"
        )
    lines.append(f"{'rsum':>6} {metrics['rsum']:7.2f}")
    k = 1
    while f"level{k}_rsum" in metrics:
        m = {key: metrics[f"level{k}_{key}"] for key in METRIC_KEYS}
        lines.append(f"level {k}: i2t {m['i2t_r1']:.2f}/{m['i2t_r5']:.2f}/{m['i2t_r10']:.2f} "
                     f"t2i {m['t2i_r1']:.2f}/{m['t2i_r5']:.2f}/{m['t2i_r10']:.2f} "
                     f"rsum {m['rsum']:.2f}")
        k += 1
    return "\n".join(lines)


def default_feature_dtype(device) -> torch.dtype:
    """float16 on CUDA (half the memory; the scoring accumulates in fp32), else float32."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


@torch.no_grad()
def encode_loader(loader, encode, pad_dims=()) -> list[torch.Tensor]:
    """Run ``encode(batch) -> tuple of tensors`` over ``loader`` and concatenate each
    output along dim 0; outputs whose index is in ``pad_dims`` (a collection, or a
    predicate ``(index, count) -> bool``) have a dim 1 (caption length) that may differ
    between batches and are zero-padded to the longest.

    Under torchrun the dataset is cut into one contiguous share per rank
    (`hat.distributed.shard_range`); each rank encodes its share only and the outputs
    are gathered, so every rank returns the full, ordered result."""
    sharded = active_world()[1] > 1
    if sharded:  # (any iterable of batches works on one process)
        from torch.utils.data import DataLoader, Subset

        total = len(loader.dataset)
        start, stop = shard_range(total)
        # an empty share encodes one placeholder item, dropped by gather_shards
        indices = list(range(start, stop)) or [total - 1]
        loader = DataLoader(Subset(loader.dataset, indices), batch_size=loader.batch_size,
                            num_workers=loader.num_workers, collate_fn=loader.collate_fn)
    outputs = None
    for batch in loader:
        result = encode(batch)
        if outputs is None:
            outputs = [[] for _ in result]
        for store, tensor in zip(outputs, result):
            store.append(tensor)
    if outputs is None:
        raise ValueError("nothing to encode: the evaluation loader is empty")
    padded = pad_dims if callable(pad_dims) else (lambda index, count: index in pad_dims)
    merged = []
    for index, store in enumerate(outputs):
        pad_dim = 1 if padded(index, len(outputs)) else None
        if pad_dim is not None:
            longest = max(tensor.shape[1] for tensor in store)
            store = [pad_dim_to(tensor, 1, longest) for tensor in store]
        merged.append(gather_shards(torch.cat(store), total, pad_dim) if sharded else torch.cat(store))
    return merged


def encode_images(model, loader, device, dtype=torch.float32) -> list[torch.Tensor]:
    """Encode every image once -> the model's image outputs (HAT: per level
    [N_images, R_level, D]) in ``dtype``."""
    return encode_loader(loader, lambda images: [f.to(dtype) for f in model.encode_images(
        images.to(device, non_blocking=True))])


def encode_captions(model, loader, device, dtype=torch.float32):
    """Encode every caption once -> (per level [N_captions, L_max, D] in ``dtype``,
    lengths [N_captions])."""
    def encode(batch):
        mask = batch["attention_mask"].to(device)
        features = model.encode_captions(batch["input_ids"].to(device), mask)
        return [*(f.to(dtype) for f in features), mask.sum(dim=1)]

    *levels, lengths = encode_loader(loader, encode, pad_dims=lambda index, count: index < count - 1)
    return levels, lengths


def encode_features(model, image_loader, caption_loader, device, dtype=None) -> dict:
    """{"images": per level [N_images, R, D], "captions": per level [N_captions, L, D],
    "lengths": [N_captions]}, each image and caption encoded once, in eval mode, stored
    in ``dtype`` (default: float16 on CUDA, float32 elsewhere)."""
    dtype = dtype or default_feature_dtype(device)
    with eval_mode(model):
        images = encode_images(model, image_loader, device, dtype)
        captions, lengths = encode_captions(model, caption_loader, device, dtype)
    return {"images": images, "captions": captions, "lengths": lengths}


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode inside the block, back in the mode it had after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def file_identity(path: str) -> str:
    """A file's absolute path, size and modification time: how the file looks, not what
    it holds (the feature cache keys by content, `hat.fingerprint`)."""
    stat = os.stat(path)
    return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


FINGERPRINT_MEMO = "fingerprints.json"  # in the cache folder: content digests of the key's files
_PENDING_MEMOS: dict = {}  # cache path -> its digest memo, saved by cached_features


def feature_cache_path(cache_dir: str, checkpoint: str, split: str, extra=(), data_files=()) -> str:
    """Cache file for the features of ``checkpoint`` on ``split``: keyed by the content
    digest (`hat.fingerprint`) of the checkpoint and of ``data_files`` (the split's arrow
    files), the split and ``extra`` (anything else that changes the features: dataset,
    image size, max_text_len, architecture, feature dtype). The digests are memoised in
    ``cache_dir``/fingerprints.json, so unchanged files are hashed once; the memo is
    written by `cached_features` when it reads or writes the returned path (a run that
    stops before leaves the folder as it was)."""
    from hat.fingerprint import FingerprintMemo

    memo = FingerprintMemo(os.path.join(cache_dir, FINGERPRINT_MEMO))
    key = "|".join([memo.digest(checkpoint), split, *map(memo.digest, data_files), *map(str, extra)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(checkpoint))[0]
    path = os.path.join(cache_dir, f"{stem}-{split}-{digest}.features.pt")
    _PENDING_MEMOS[path] = memo
    return path


def save_features(path: str, features: dict) -> str:
    """Write encoded features (moved to CPU, dtype kept) atomically."""
    from hat.checkpoint import atomic_save

    return atomic_save({"format": "hat-features", "version": 1,
                        "images": [f.cpu() for f in features["images"]],
                        "captions": [f.cpu() for f in features["captions"]],
                        "lengths": features["lengths"].cpu()}, path)


def load_features(path: str, device, dtype=None) -> dict:
    """Read features written by `save_features` onto ``device`` (in ``dtype`` if given)."""
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != "hat-features":
        raise ValueError(f"{path} is not a hat-features file")
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    return {"images": [cast(f) for f in state["images"]],
            "captions": [cast(f) for f in state["captions"]], "lengths": state["lengths"]}


def _dataset_size(loader) -> int | None:
    dataset = getattr(loader, "dataset", None)  # (a plain list of batches has none)
    return len(dataset) if dataset is not None else None


def _checked_cache(cache_path: str, n_images: int | None, n_captions: int | None) -> dict | None:
    """The features in ``cache_path`` (on the CPU) if it holds ``n_images`` images and
    ``n_captions`` captions (None: any count); None, with a note, when it is absent,
    cannot be read or holds another set."""
    if not os.path.isfile(cache_path):
        return None
    try:
        features = load_features(cache_path, "cpu")
    except Exception as error:  # truncated by hand, another format: encode again
        print(f"feature_cache: {cache_path} cannot be read ({error.__class__.__name__}); "
              f"encoding again", flush=True)
        return None
    counts = (len(features["images"][0]), len(features["lengths"]))
    if any(want is not None and want != have for want, have in zip((n_images, n_captions), counts)):
        print(f"feature_cache: {cache_path} holds {counts[0]} images / {counts[1]} captions, the "
              f"split {n_images} / {n_captions}; encoding again", flush=True)
        return None
    return features


def _counts(features: dict) -> str:
    return f"features of {len(features['images'][0])} images / {len(features['lengths'])} captions"


def cached_features(model, image_loader, caption_loader, device, dtype=None,
                    cache_path: str | None = None) -> dict:
    """`encode_features`, read from / written to ``cache_path`` when one is given (one
    line says which), and then the digest memo of a path from `feature_cache_path`. Under
    torchrun rank 0 decides whether the cache is used (so every rank encodes, or none)
    and rank 0 alone writes it and the memo. A cache that cannot be written
    (full disk, read-only folder) is a one-line warning: the features are returned as
    encoded, and the atomic write leaves no partial file."""
    main = active_world()[0] == 0
    memo = _PENDING_MEMOS.pop(cache_path, None) if cache_path else None
    if cache_path:
        cached = (_checked_cache(cache_path, _dataset_size(image_loader), _dataset_size(caption_loader))
                  if main else None)
        if broadcast_from_main(cached is not None):
            if main:
                print(f"feature_cache: read {_counts(cached)} from {cache_path}", flush=True)
                if memo is not None:
                    memo.save()
            cached = cached if main else load_features(cache_path, "cpu")
            dtype = dtype or default_feature_dtype(device)
            return {"images": [f.to(device, dtype) for f in cached["images"]],
                    "captions": [f.to(device, dtype) for f in cached["captions"]],
                    "lengths": cached["lengths"].to(device)}
    features = encode_features(model, image_loader, caption_loader, device, dtype)
    if cache_path and main:
        try:
            save_features(cache_path, features)
        except (OSError, RuntimeError) as error:  # the cache is optional: score without it
            reason = " ".join(f"{error.__class__.__name__}: {error}".split())
            print(f"feature_cache: cannot write {cache_path} ({reason}); scored without caching: "
                  f"free disk space or set feature_cache= to a writable folder", flush=True)
        else:
            print(f"feature_cache: wrote {_counts(features)} to {cache_path}", flush=True)
            if memo is not None:
                memo.save()
    return features


@torch.no_grad()
def level_similarities(model, features: dict, image_tile=None, caption_tile=None) -> list:
    """One score matrix [N_images, N_captions] (fp32) per level, through ``model.score``
    (the model's direction and lambda)."""
    n_images = len(features["images"][0])
    start, stop = shard_range(n_images)  # under torchrun each rank scores its share of images
    rows = slice(start, stop) if stop > start else slice(n_images - 1, n_images)
    return [gather_shards(model.score([images[rows]], [captions], features["lengths"],
                                      image_tile=image_tile, caption_tile=caption_tile).float(),
                          n_images)
            for images, captions in zip(features["images"], features["captions"])]


def ensemble_similarities(members: list) -> list:
    """Mean over ensemble members (e.g. HAT (*) = the i2t model and the t2i model) of
    their per-level score matrices: members[m][level] -> [level] (sum over levels = the
    mean of the members' summed matrices)."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    return [torch.stack(level).mean(dim=0) for level in zip(*members)]


def evaluate(model, image_loader, caption_loader, caption_to_image, device,
             image_tile=None, caption_tile=None, *, feature_dtype=None, cache_path=None,
             per_level: bool = False) -> tuple[dict, torch.Tensor]:
    """Encode once (or read ``cache_path``), score all pairs (sum of the level scores),
    apply the protocol. per_level=True adds ``level{k}_*`` recalls to the metrics."""
    features = cached_features(model, image_loader, caption_loader, device, feature_dtype,
                               cache_path)
    levels = level_similarities(model, features, image_tile, caption_tile)
    del features
    return protocol_metrics(levels, caption_to_image, per_level)
