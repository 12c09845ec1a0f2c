"""Retrieval evaluation that every model shares: encode once, rank, apply the recall protocol.

The recall protocol: for each query the rank is the number of negatives
scoring at least as high as its best positive (ties never favour the positive).
Ranks are computed in chunks of queries on the device holding the score matrix.

A model's plug-in (`hat.plugins.ModelPlugin.evaluate`) encodes a split's images and
captions once with `encode_loader` / `encode_images` (under torchrun each process
encodes its share), scores every pair its own way into a matrix [N_images, N_captions],
and ranks it here: `recall` (Flickr30K 1K, MSCOCO 5K) or `fold_metrics` / `fold_recall`
(MSCOCO 1K: five consecutive folds). `check_finite` refuses NaN/infinite scores;
`format_table` prints the metrics.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from hat.distributed import active_world, gather_shards, pad_dim_to, shard_range

METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
    "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr",
)
RANK_CHUNK = 1024


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


def format_table(metrics: dict, title: str = "", extra_rows=()) -> str:
    """A small fixed-width table of a metrics dict from `recall`, then ``extra_rows`` (a
    model's own lines, `hat.plugins.ModelPlugin.table_rows`)."""
    lines = [title] if title else []
    lines.append(f"{'':>6} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'medr':>6} {'meanr':>8}")
    for direction, label in (("i2t", "i2t"), ("t2i", "t2i")):
        lines.append(
            f"{label:>6} {metrics[f'{direction}_r1']:7.2f} {metrics[f'{direction}_r5']:7.2f} "
            f"{metrics[f'{direction}_r10']:7.2f} {metrics[f'{direction}_medr']:6.0f} "
            f"{metrics[f'{direction}_meanr']:8.2f}"
        )
    lines.append(f"{'rsum':>6} {metrics['rsum']:7.2f}")
    lines.extend(extra_rows)
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
    """Encode every image once -> each of ``model.encode_images``'s outputs over the whole
    split (concatenated along dim 0), in ``dtype``."""
    return encode_loader(loader, lambda images: [f.to(dtype) for f in model.encode_images(
        images.to(device, non_blocking=True))])


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode inside the block, back in the mode it had after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def eval_data(c: dict, data_root: str, split: str, tokenizer, pad_to=None) -> EvalData:
    """The loaders of a split as the runner evaluates it: images with the test-time
    transform, the protocol's captions, the caption -> image map, the split's files."""
    from datamodules import open_split
    from datamodules.arrow import split_paths
    from datamodules.datasets import SplitCaptions, SplitImages, caption_loader, image_loader, pad_id_of
    from datamodules.transforms import build_transform

    data = open_split(data_root, c["dataset"], split)
    captions = SplitCaptions(data, tokenizer, c["max_text_len"], c["captions_per_image"])
    transform = build_transform(c["image_transform"], c["image_size"], train=False)
    return EvalData(image_loader(SplitImages(data, transform), c["eval_batch_size"], c["num_workers"]),
                    caption_loader(captions, c["eval_batch_size"], c["num_workers"],
                                   pad_id=pad_id_of(tokenizer), pad_to=pad_to),
                    captions.caption_to_image, split_paths(data_root, c["dataset"], split))
