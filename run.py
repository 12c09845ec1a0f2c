"""Train and evaluate HAT: the Sacred main.

    python run.py with demo                       # embedded demo, CPU, minutes
    python run.py with data_root=DATA             # Flickr30K, the paper's recipe
    python run.py with coco_config data_root=DATA test_only=True checkpoint=CKPT
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch
from sacred import SETTINGS
from sacred.observers import FileStorageObserver
from sacred.utils import SacredError, apply_backspaces_and_linefeeds

from config import ex
from datamodules import DataError, check_data_root, open_split
from datamodules.arrow import SPLIT_FILES
from datamodules.datasets import (CaptionPairs, SplitCaptions, SplitImages, caption_loader,
                                  image_loader, train_loader)
from datamodules.demo import ensure_demo_data
from datamodules.prepare import prepare_dataset
from datamodules.transforms import TRANSFORM_NAMES, build_transform
from hat.checkpoint import CheckpointError, load_model_weights, save_checkpoint
from hat.encoders import BackboneError, load_tokenizer
from hat.engine import train_one_epoch
from hat.evaluation import evaluate, format_table
from hat.model import build_hat

ex.captured_out_filter = apply_backspaces_and_linefeeds
SETTINGS.CAPTURE_MODE = "sys"  # tqdm and print both land in cout.txt


class UsageError(SacredError):
    """A one-line error about the user's input (printed without a traceback)."""

    def __init__(self, message):
        super().__init__(message, print_traceback=False)


UsageError.__module__ = "builtins"  # printed as "UsageError: ..."


@ex.config_hook
def attach_observer(config, command_name, logger):
    """Record every run under ``observer_dir`` (a FileStorageObserver, unless one is given
    with -F) and check the configuration before any work starts."""
    for observer in [o for o in ex.observers if getattr(o, "_hat_default", False)]:
        ex.observers.remove(observer)
    if command_name == "main":
        validate_config(config)
        has_file_observer = any(isinstance(o, FileStorageObserver) for o in ex.observers)
        if config["observer_dir"] and not has_file_observer:
            observer = FileStorageObserver(config["observer_dir"])
            observer._hat_default = True
            ex.observers.append(observer)
    return {}


def validate_config(config):
    def fail(key, allowed):
        raise UsageError(f"{key}={config[key]!r} is not valid; allowed: {allowed}")

    if config["dataset"] not in SPLIT_FILES:
        fail("dataset", sorted(SPLIT_FILES))
    if config["direction"] not in ("i2t", "t2i"):
        fail("direction", ["i2t", "t2i"])
    if config["image_transform"] not in TRANSFORM_NAMES:
        fail("image_transform", list(TRANSFORM_NAMES))
    if config["precision"] not in ("fp16", "bf16", "fp32"):
        fail("precision", ["fp16", "bf16", "fp32"])
    if config["test_only"] and not config["checkpoint"]:
        raise UsageError("test_only=True needs checkpoint=PATH (a .ckpt written by a run)")
    if config["dataset"] != "demo":
        try:
            check_data_root(config["data_root"], config["dataset"],
                            ("test",) if config["test_only"] else ("train", "val", "test"))
        except DataError as error:
            raise UsageError(str(error)) from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_directory(_run, checkpoint_dir, exp_name) -> str:
    if checkpoint_dir:
        return checkpoint_dir
    for observer in _run.observers:
        if isinstance(observer, FileStorageObserver) and observer.dir:
            return observer.dir
    return os.path.join("checkpoints", exp_name)


def swin_kwargs(c) -> dict:
    kwargs = {"drop_path_rate": c["drop_path_rate"]}
    for key in ("embed_dim", "depths", "num_heads", "window_size"):
        if c[f"swin_{key}"] is not None:
            kwargs[key] = c[f"swin_{key}"]
    return kwargs


def log_metrics(_run, prefix: str, metrics: dict, step: int) -> None:
    for key, value in metrics.items():
        _run.log_scalar(f"{prefix}.{key}", value, step)


@ex.main
def main(_config, _run):
    try:
        return train_and_test(_config, _run)
    except (DataError, CheckpointError, BackboneError) as error:
        raise UsageError(str(error)) from None


def train_and_test(c, _run) -> dict:
    """Train (unless test_only), then evaluate the best (or the given) checkpoint on test."""
    seed_everything(c["seed"])
    device = pick_device(c["device"])
    amp_dtype = None
    if device.type == "cuda" and c["precision"] != "fp32":
        amp_dtype = torch.float16 if c["precision"] == "fp16" else torch.bfloat16

    data_root = c["data_root"]
    if c["dataset"] == "demo":
        data_root = ensure_demo_data(data_root, c["demo_train_images"], c["demo_eval_images"],
                                     c["image_size"], seed=0)

    tokenizer = load_tokenizer(c["text_backbone"])
    # test_only builds the architecture alone: every weight comes from the checkpoint
    model = build_hat(
        c["image_backbone"], c["text_backbone"], c["level_pairs"], embed_dim=c["embed_dim"],
        lambda_softmax=c["lambda_softmax"], direction=c["direction"], image_size=c["image_size"],
        image_pretrained=c["image_pretrained"] and not c["test_only"],
        text_pretrained=c["text_pretrained"] and not c["test_only"],
        image_weights=c["image_weights"], image_backbone_kwargs=swin_kwargs(c),
    ).to(device)
    test_transform = build_transform(c["image_transform"], c["image_size"], train=False)

    def eval_split(split: str):
        data = open_split(data_root, c["dataset"], split)
        captions = SplitCaptions(data, tokenizer, c["max_text_len"], c["captions_per_image"])
        metrics, _ = evaluate(
            model,
            image_loader(SplitImages(data, test_transform), c["eval_batch_size"], c["num_workers"]),
            caption_loader(captions, c["eval_batch_size"], c["num_workers"]),
            captions.caption_to_image, device, c["image_tile"], c["caption_tile"],
        )
        return metrics

    def test(checkpoint_path: str):
        loaded = load_model_weights(model, checkpoint_path)
        _run.info["checkpoint"] = os.path.abspath(checkpoint_path)
        _run.info["checkpoint_format"] = loaded["format"]
        metrics = eval_split("test")
        print(format_table(metrics, f"test split of {c['dataset']}, checkpoint {checkpoint_path}"),
              flush=True)
        log_metrics(_run, "test", metrics, 0)
        return metrics

    if c["test_only"]:
        return test(c["checkpoint"])
    return test(fit(c, _run, model, tokenizer, data_root, device, amp_dtype, eval_split))


def fit(c, _run, model, tokenizer, data_root, device, amp_dtype, eval_split) -> str:
    """Train with validation each epoch; returns the path of the best checkpoint."""
    train_data = CaptionPairs(open_split(data_root, c["dataset"], "train"), tokenizer,
                              build_transform(c["image_transform"], c["image_size"], train=True),
                              c["max_text_len"])
    loader = train_loader(train_data, c["per_gpu_batchsize"], c["num_workers"], c["seed"])
    optimizer = torch.optim.Adam(model.parameters(), lr=c["learning_rate"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, c["lr_step_epochs"], c["lr_gamma"])
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    out_dir = run_directory(_run, c["checkpoint_dir"], c["exp_name"])
    best_path, last_path = os.path.join(out_dir, "best.ckpt"), os.path.join(out_dir, "last.ckpt")
    _run.info["checkpoint"] = os.path.abspath(best_path)
    print(f"training on {len(train_data)} captions of {len(train_data.split)} images, "
          f"device {device}, checkpoints in {out_dir}", flush=True)
    best_score = None
    for epoch in range(c["max_epoch"]):
        model.set_backbones_trainable(image=epoch >= c["freeze_image_epochs"],
                                      text=epoch >= c["freeze_text_epochs"])
        lr = optimizer.param_groups[0]["lr"]
        loss = train_one_epoch(model, loader, optimizer, device, epoch, c["margin"],
                               hardest_negative=epoch >= c["vse_warmup_epochs"],
                               same_image_mask=c["same_image_mask"], scaler=scaler,
                               amp_dtype=amp_dtype, progress=c["progress"])
        scheduler.step()
        metrics = eval_split("val")
        score = sum(metrics[key] for key in c["select_metric"])
        _run.log_scalar("train.loss", loss, epoch)
        _run.log_scalar("train.lr", lr, epoch)
        log_metrics(_run, "val", metrics, epoch)
        improved = best_score is None or score > best_score
        print(f"epoch {epoch}: loss {loss:.4f} lr {lr:.2e} val i2t R@1 {metrics['i2t_r1']:.2f} "
              f"t2i R@1 {metrics['t2i_r1']:.2f} rsum {metrics['rsum']:.2f}"
              f"{' (best)' if improved else ''}", flush=True)
        save_checkpoint(last_path, model, optimizer, scheduler, epoch, c, metrics)
        if improved:
            best_score = score
            save_checkpoint(best_path, model, optimizer, scheduler, epoch, c, metrics)
    return best_path


@ex.command
def prepare_data(dataset, raw_root, data_root, skip_missing_images, progress):
    """Write the arrow files of dataset=f30k|coco from raw_root (the images and the
    Karpathy JSON) into data_root; splits already complete are skipped."""
    try:
        return prepare_dataset(dataset, raw_root, data_root, skip_missing_images, progress=progress)
    except DataError as error:
        raise UsageError(str(error)) from None


if __name__ == "__main__":
    ex.run_commandline()
