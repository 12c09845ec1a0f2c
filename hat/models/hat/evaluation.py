"""HAT's half of evaluation: its encoded levels, their score matrices and the summed protocol.

A HAT model encodes every image into one feature set per level ([N_images, R, D]) and
every caption into one per level ([N_captions, L, D]) with its lengths. `encode_features`
does that once per split (`cached_features`: optionally read from / written to a feature
cache keyed by the content of the checkpoint and the split's files); `level_similarities`
turns the features into one [N_images, N_captions] matrix per level; the model's score
is their sum (`hat.models.hat.model.summed_levels`), which the recall protocol of
`hat.evaluation` ranks. An ensemble (HAT (*): the i2t and the t2i model) averages the
members' level matrices (`ensemble_similarities`); ``per_level`` also ranks each level
alone (``level{k}_*`` keys, printed by `level_rows`).
"""
from __future__ import annotations

import hashlib
import os

import torch

from hat.distributed import active_world, broadcast_from_main, gather_shards, shard_range
from hat.evaluation import METRIC_KEYS, default_feature_dtype, encode_images, encode_loader, eval_mode, \
    fold_metrics, fold_recall, recall
from hat.models.hat.model import summed_levels

# config value of feature_dtype -> torch dtype (None: fp16 on CUDA, fp32 elsewhere)
FEATURE_DTYPES = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# -- encoding ----------------------------------------------------------------------

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


# -- the feature cache -------------------------------------------------------------

FINGERPRINT_MEMO = "fingerprints.json"  # in the cache folder: content digests of the key's files


_PENDING_MEMOS: dict = {}  # cache path -> the digest memo its key was computed with, saved by cached_features


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
    _PENDING_MEMOS[path] = memo  # the newest key of a path wins
    return path


def file_identity(path: str) -> str:
    """A file's absolute path, size and modification time: how the file looks, not what
    it holds (the feature cache keys by content, `hat.fingerprint`)."""
    stat = os.stat(path)
    return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"


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


def _save_memo(memo) -> None:
    if memo is not None:
        memo.save()


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
                _save_memo(memo)
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
            _save_memo(memo)
    return features


# -- scoring and the summed protocol -------------------------------------------------

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


def checkpoint_levels(model, data, device, feature_dtype=None, cache_path=None, image_tile=None,
                      caption_tile=None) -> list:
    """The level matrices of ``model`` (its weights as they are) on the split in ``data``
    (a `hat.evaluation.EvalData`): encoded once (or read from ``cache_path``), then scored."""
    features = cached_features(model, data.images, data.captions, device, feature_dtype, cache_path)
    return level_similarities(model, features, image_tile, caption_tile)


def ensemble_similarities(members: list) -> list:
    """Mean over ensemble members (e.g. HAT (*) = the i2t model and the t2i model) of
    their per-level score matrices: members[m][level] -> [level] (sum over levels = the
    mean of the members' summed matrices)."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    return [torch.stack(level).mean(dim=0) for level in zip(*members)]


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


def level_rows(metrics: dict) -> list[str]:
    """One line per level of a metrics dict holding ``level{k}_*`` keys (none without)."""
    lines, k = [], 1
    while f"level{k}_rsum" in metrics:
        m = {key: metrics[f"level{k}_{key}"] for key in METRIC_KEYS}
        lines.append(f"level {k}: i2t {m['i2t_r1']:.2f}/{m['i2t_r5']:.2f}/{m['i2t_r10']:.2f} "
                     f"t2i {m['t2i_r1']:.2f}/{m['t2i_r5']:.2f}/{m['t2i_r10']:.2f} "
                     f"rsum {m['rsum']:.2f}")
        k += 1
    return lines
