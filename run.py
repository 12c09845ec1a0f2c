"""Train and evaluate HAT: the Sacred main.

    python run.py with demo                       # embedded demo, CPU, minutes
    python run.py with data_root=DATA             # Flickr30K, the paper's recipe
    python run.py with coco_config data_root=DATA test_only=True checkpoint=CKPT
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import tempfile

import numpy as np
import torch
from sacred import SETTINGS
from sacred.observers import FileStorageObserver
from sacred.utils import SacredError, SacredInterrupt, apply_backspaces_and_linefeeds
from tqdm import tqdm

from config import ex
from datamodules import DataError, check_data_root, open_split
from datamodules.arrow import SPLIT_FILES, fewest_captions, split_paths
from datamodules.datasets import SplitCaptions, SplitImages, caption_loader, image_loader, train_loader
from datamodules.demo import CAPTIONS_PER_IMAGE as DEMO_CAPTIONS, ensure_demo_data
from datamodules.prepare import prepare_dataset
from datamodules.transforms import TRANSFORM_NAMES, build_transform
from hat.checkpoint import (CheckpointError, describe_error, load_model_weights, load_training_state,
                            read_checkpoint_file, save_checkpoint)
from hat.encoders import BackboneError, load_tokenizer, text_limits
from hat.distributed import (barrier, broadcast_from_main, gather_padded, init_distributed,
                             is_main_process, world)
from hat.engine import NonFiniteLoss, rng_state, set_rng_state
from hat.recipes import RECIPES
from hat.evaluation import (METRIC_KEYS, NonFiniteScores, cached_features, default_feature_dtype,
                            ensemble_similarities, feature_cache_path, format_table, level_similarities,
                            protocol_metrics)
from hat.run_folders import checkpoint_folder, find_resumable

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
        try:
            validate_config(config)
        except UsageError as error:  # before any work: one line, exit status 2
            print(f"ConfigError: {error}", file=sys.stderr)
            sys.exit(2)
        has_file_observer = any(isinstance(o, FileStorageObserver) for o in ex.observers)
        if config["observer_dir"] and not has_file_observer and is_main_process():
            observer = FileStorageObserver(config["observer_dir"])
            observer._hat_default = True
            ex.observers.append(observer)
    return {}


def validate_config(config):
    """Check the configuration before any work; raises UsageError naming key and value."""
    def fail(key, allowed):
        raise UsageError(f"{key}={config[key]!r} is not valid; allowed: {allowed}")

    choices = {"model": sorted(RECIPES), "dataset": sorted(SPLIT_FILES), "direction": ["i2t", "t2i"],
               "image_transform": list(TRANSFORM_NAMES), "precision": ["fp16", "bf16", "fp32"]}
    for key, allowed in choices.items():
        if config[key] not in allowed:
            fail(key, allowed)
    from hat.evaluation import METRIC_KEYS

    if not config["select_metric"] or any(k not in METRIC_KEYS for k in config["select_metric"]):
        fail("select_metric", f"a list of {list(METRIC_KEYS)}")
    for key in ("per_gpu_batchsize", "max_epoch", "max_text_len", "eval_batch_size", "embed_dim"):
        if not isinstance(config[key], int) or config[key] < 1:
            fail(key, "a positive integer")
    world_size = world()[1]
    if config["batch_size"] is not None and (not isinstance(config["batch_size"], int)
                                             or config["batch_size"] < 1
                                             or config["batch_size"] % world_size):
        fail("batch_size", f"None or a positive multiple of the world size {world_size}")
    if config["captions_per_image"] is not None and (not isinstance(config["captions_per_image"], int)
                                                     or config["captions_per_image"] < 1):
        fail("captions_per_image", "a positive integer or None")
    validate_device(config["device"], fail)
    if config["model"] == "multisea":
        validate_multisea_config(config, fail)
    else:
        validate_levels(config, fail)
        for key in ("margin", "lambda_softmax"):
            if not isinstance(config[key], (int, float)) or not config[key] > 0:
                fail(key, "a number > 0 (the triplet hinge needs a margin; SCAN a positive temperature)"
                     if key == "margin" else "a number > 0 (the SCAN softmax temperature)")
    text_tokens = text_limits(config["text_backbone"])[1]
    if text_tokens and config["max_text_len"] > text_tokens:
        fail("max_text_len", f"at most {text_tokens}: {config['text_backbone']} has {text_tokens} "
                             f"token positions")
    if not config["test_only"]:
        validate_batch(config, fail)
    if config["test_only"] and not (config["checkpoint"] or config["ensemble"]):
        raise UsageError("test_only=True needs checkpoint=PATH (a .ckpt written by a run, or a released one)")
    for key in ("checkpoint", "resume_from", "image_weights"):
        if config[key] and os.path.isdir(config[key]):
            raise UsageError(f"{key}={config[key]} is a directory; pass the path of a file in it "
                             f"(e.g. {os.path.join(config[key], 'best.ckpt')})")
        if config[key] and not os.path.isfile(config[key]):
            raise UsageError(f"{key}={config[key]} does not exist; pass the path of an existing file")
    validate_evaluation_config(config, fail)
    splits = ("test",) if config["test_only"] else ("train", "val", "test")
    if config["dataset"] != "demo":
        try:
            check_data_root(config["data_root"], config["dataset"], splits)
        except DataError as error:
            raise UsageError(str(error)) from None
    validate_caption_count(config, splits[1:] if len(splits) > 1 else splits)
    writable = ["observer_dir"] + ([] if config["test_only"] else ["checkpoint_dir"])
    for key in writable:
        if config[key]:
            check_writable(key, config[key])


def validate_device(name, fail) -> None:
    """``device`` names a device this machine has."""
    try:
        device = torch.device(name) if name != "auto" else None
    except (RuntimeError, TypeError):
        fail("device", "auto, cpu, cuda or cuda:N")
    if device is None or device.type == "cpu":
        return
    if device.type != "cuda":
        fail("device", "auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(f"device={name}: this machine has no usable CUDA device "
                         f"(torch.cuda.is_available() is False); use device=cpu or device=auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0..cuda:{torch.cuda.device_count() - 1}; pick one of those or device=auto")


def validate_batch(config, fail) -> None:
    """The losses take their negatives from the batch (gathered over processes): a batch
    of one caption makes them 0 on every step."""
    world_size = world()[1]
    if config["model"] == "hat" and config["batch_size"] is not None:
        key, batch = "batch_size", config["batch_size"]
    else:
        key, batch = "per_gpu_batchsize", config["per_gpu_batchsize"] * world_size
    if batch < 2:
        fail(key, "a batch of at least 2 pairs over all processes (the loss takes its negatives "
                  "from the batch: with one pair it is 0 on every step)")


def validate_caption_count(config, splits) -> None:
    """captions_per_image against the evaluated splits' fewest captions per image."""
    wanted = config["captions_per_image"]
    if wanted is None:
        return
    if config["dataset"] == "demo":
        fewest = [(DEMO_CAPTIONS, "every demo image")]
    else:
        try:
            found = [fewest_captions(config["data_root"], config["dataset"], split) for split in splits]
        except DataError:  # an unreadable file: its own one-line error comes when it is opened
            return
        fewest = [(count, f"image {image_id} in {path}") for count, image_id, path in filter(None, found)]
    for count, where in fewest:
        if count < wanted:
            raise UsageError(f"captions_per_image={wanted} is not valid: {where} has {count} caption(s); "
                             f"set captions_per_image={count} or None (every caption)")


def check_writable(key: str, folder: str) -> None:
    """``folder`` (or the nearest existing folder above it) accepts new files."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(f"{existing} is a file")
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"{key}={folder} is not writable ({describe_error(error, 120)}); "
                         f"pass a folder you can write to") from None


def validate_levels(config, fail):
    """HAT's level pairs against the backbones' depths."""
    num_stages = len(config["swin_depths"] or (2, 2, 18, 2))
    text_depth = text_limits(config["text_backbone"])[0]
    for pair in config["level_pairs"]:
        if len(pair) != 2 or not 1 <= pair[0] <= num_stages:
            fail("level_pairs", f"[image stage 1..{num_stages}, text layer] pairs")
        if not 1 <= pair[1] <= (text_depth or pair[1]):
            fail("level_pairs", f"text layers 1..{text_depth} of {config['text_backbone']}")


def validate_multisea_config(config, fail):
    """Multi-SEA's keys: fp32 training, micro-batches, ITM layers, single checkpoints."""
    if config["precision"] != "fp32":
        fail("precision", "['fp32'] with model=multisea (its recipe trains in fp32)")
    if not isinstance(config["batch_size"], int) or config["batch_size"] % (config["per_gpu_batchsize"]
                                                                            * world()[1]):
        fail("batch_size", f"a multiple of per_gpu_batchsize x world size "
                           f"({config['per_gpu_batchsize']} x {world()[1]}) with model=multisea")
    if not config["itm_layers"] or any(not 1 <= layer <= config["fusion_layers"]
                                       for layer in config["itm_layers"]):
        fail("itm_layers", f"AFormer layers 1..{config['fusion_layers']} (fusion_layers)")
    for key in ("top_k", "queue_size", "fusion_layers", "num_agents"):
        if not isinstance(config[key], int) or config[key] < 1:
            fail(key, "a positive integer")
    if config["ensemble"]:
        fail("ensemble", "[] with model=multisea (ensembles average HAT's level scores)")


def validate_evaluation_config(config, fail):
    """The test-time keys: ensemble members, their directions, folds, feature dtype."""
    ensemble, directions = config["ensemble"], config["ensemble_directions"]
    if not isinstance(ensemble, (list, tuple)):
        fail("ensemble", "a list of checkpoint paths, e.g. ensemble=\"['i2t.ckpt','t2i.ckpt']\"")
    if ensemble:
        if not config["test_only"] or config["checkpoint"]:
            raise UsageError("ensemble=[...] evaluates existing checkpoints: use it with test_only=True "
                             "and without checkpoint=")
        for path in ensemble:
            if not os.path.isfile(str(path)):
                raise UsageError(f"ensemble: {path} does not exist; pass the paths of existing checkpoints")
    if not isinstance(directions, (list, tuple)) or any(d not in ("i2t", "t2i") for d in directions) \
            or (directions and len(directions) != max(len(ensemble), 1)):
        fail("ensemble_directions", "[] (each checkpoint's recorded direction) or one of 'i2t'/'t2i' "
                                    "per ensemble member")
    if config["eval_folds"] is not None and (not isinstance(config["eval_folds"], int)
                                             or config["eval_folds"] < 1):
        fail("eval_folds", "None or a positive integer (5: the MSCOCO 1K protocol)")
    if config["feature_dtype"] not in FEATURE_DTYPES:
        fail("feature_dtype", list(FEATURE_DTYPES))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def observer_folder(_run) -> str | None:
    """The run's FileStorageObserver folder (None when the run is not recorded)."""
    for observer in _run.observers:
        if isinstance(observer, FileStorageObserver) and observer.dir:
            return observer.dir
    return None


def log_metrics(_run, prefix: str, metrics: dict, step: int) -> None:
    for key, value in metrics.items():
        _run.log_scalar(f"{prefix}.{key}", value, step)


@ex.main
def main(_config, _run):
    with StopSignals() as signals:
        try:
            return train_and_test(_config, _run, signals)
        except (DataError, CheckpointError, BackboneError) as error:
            raise UsageError(str(error)) from None


def train_and_test(c, _run, signals) -> dict:
    """Train (unless test_only), then evaluate the best (or the given) checkpoint on test."""
    seed_everything(c["seed"])
    device = pick_device(c["device"])
    init_distributed(device.type)
    if device.type == "cuda" and world()[1] > 1:
        device = torch.device("cuda", world()[2])
    amp_dtype = None
    if device.type == "cuda" and c["precision"] != "fp32":
        amp_dtype = torch.float16 if c["precision"] == "fp16" else torch.bfloat16

    data_root = c["data_root"]
    if c["dataset"] == "demo":
        data_root = ensure_demo_data(data_root, c["demo_train_images"], c["demo_eval_images"],
                                     c["image_size"], seed=0)

    tokenizer = load_tokenizer(c["text_backbone"])
    recipe = RECIPES[c["model"]](c)
    # test_only builds the architecture alone: every weight comes from the checkpoint
    model = recipe.build_model(pretrained=not c["test_only"]).to(device)
    test_transform = build_transform(c["image_transform"], c["image_size"], train=False)
    pad = {"pad_id": tokenizer.pad_token_id or 0, "pad_to": recipe.pad_to}

    def loaders(split: str):
        data = open_split(data_root, c["dataset"], split)
        captions = SplitCaptions(data, tokenizer, c["max_text_len"], c["captions_per_image"])
        return (image_loader(SplitImages(data, test_transform), c["eval_batch_size"], c["num_workers"]),
                caption_loader(captions, c["eval_batch_size"], c["num_workers"], **pad),
                captions.caption_to_image)

    def eval_split(split: str):
        return recipe.evaluate(model, *loaders(split), device)

    def test(checkpoints: list[str]):
        """Evaluate one checkpoint, or the mean of several checkpoints' level matrices
        (an ensemble), on the test split: summed-level recalls, per-level recalls and
        the 1K-fold protocol as configured."""
        what = checkpoints[0] if len(checkpoints) == 1 else f"ensemble of {len(checkpoints)}"
        print(f"testing {what} on the test split of {c['dataset']}", flush=True)
        images, texts, caption_to_image = loaders("test")
        try:
            if c["model"] == "multisea":  # ITC shortlist + ITM re-rank
                loaded = load_model_weights(model, checkpoints[0])
                _run.info["checkpoint"] = os.path.abspath(checkpoints[0])
                _run.info["checkpoint_format"] = loaded["format"]
                metrics = recipe.evaluate(model, images, texts, caption_to_image, device, c["eval_folds"])
                return report_test(metrics, what)
            levels = test_levels(checkpoints, images, texts)
            metrics, _ = protocol_metrics(levels, caption_to_image, c["per_level"], c["eval_folds"])
        except NonFiniteScores as error:
            raise UsageError(f"test split, checkpoint {what}: {error}; its weights are broken (a run "
                             f"that diverged or a corrupted file): evaluate another checkpoint") from None
        return report_test(metrics, what)

    def test_levels(checkpoints: list[str], images, texts) -> list:
        """HAT: the level matrices of one checkpoint, or the mean over an ensemble's."""
        members, info = [], []
        feature_dtype = FEATURE_DTYPES[c["feature_dtype"]] or default_feature_dtype(device)
        for index, path in enumerate(checkpoints):
            state = read_checkpoint_file(path)
            loaded = load_model_weights(model, path, state)
            model.direction = member_direction(c, index, state)
            del state
            cache = None
            if c["feature_cache"]:  # keyed by everything the features depend on
                cache = feature_cache_path(c["feature_cache"], path, "test", extra=(
                    c["dataset"], c["image_size"], c["image_transform"], c["max_text_len"],
                    c["captions_per_image"], feature_dtype), data_files=split_paths(data_root, c["dataset"], "test"))
            features = cached_features(model, images, texts, device, feature_dtype, cache)
            members.append(level_similarities(model, features, c["image_tile"], c["caption_tile"]))
            del features
            info.append({"checkpoint": os.path.abspath(path), "format": loaded["format"],
                         "direction": model.direction})
            print(f"scored {path} ({loaded['format']}, direction {model.direction})", flush=True)
        _run.info["checkpoint"] = info[0]["checkpoint"] if len(info) == 1 else [m["checkpoint"] for m in info]
        _run.info["checkpoint_format"] = info[0]["format"]
        if len(info) > 1:
            _run.info["ensemble"] = info
        return members[0] if len(members) == 1 else ensemble_similarities(members)

    def report_test(metrics: dict, what: str) -> dict:
        print(format_table(metrics, f"test split of {c['dataset']}, {what}"), flush=True)
        if "folds_rsum" in metrics:
            print(format_table({key: metrics[f"folds_{key}"] for key in METRIC_KEYS},
                               f"mean over {c['eval_folds']} consecutive folds"), flush=True)
        log_metrics(_run, "test", metrics, 0)
        return metrics

    if c["test_only"]:
        return test(c["ensemble"] or [c["checkpoint"]])
    best = fit(c, _run, recipe, model, tokenizer, data_root, device, amp_dtype, eval_split, pad, signals)
    return test([best])


def member_direction(c, index: int, state) -> str:
    """Scoring direction of checkpoint ``index`` (its contents: ``state``):
    ensemble_directions[index] if given; an ensemble member's recorded direction
    (project checkpoints); else ``direction``."""
    if c["ensemble_directions"]:
        return c["ensemble_directions"][index]
    if c["ensemble"] and isinstance(state, dict):
        return (state.get("config") or {}).get("direction", c["direction"])
    return c["direction"]


FEATURE_DTYPES = {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingInterrupted(SacredInterrupt, SacredError):
    """SIGINT/SIGTERM: the run stopped where it was safe to (see StopSignals)."""

    STATUS = "INTERRUPTED"

    def __init__(self, message):
        SacredError.__init__(self, message, print_traceback=False)


TrainingInterrupted.__module__ = "builtins"


class StopSignals:
    """SIGINT/SIGTERM for the whole run; the run always ends INTERRUPTED, exit status 1.

    While ``deferred`` (the training loop, validation included) the first signal asks
    the loop to stop at the next safe point: after the current step or after the
    validation under way, once last.ckpt is written. Anywhere else (building the model,
    the final test, test_only), and at a second signal, the run stops at once; nothing
    half-written is left (every file is written to a temporary name and renamed)."""

    def __init__(self):
        self.received = None
        self.deferred = False

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.deferred and self.received is None:
            self.received = name
            print(f"{name}: stopping after this step or validation, once last.ckpt is written "
                  f"(send it again to stop at once)", flush=True)
            return
        self.received = name
        raise TrainingInterrupted(f"{name}: stopped at once{' (training)' if self.deferred else ''}; "
                                  f"nothing half-written was left")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def fit(c, _run, recipe, model, tokenizer, data_root, device, amp_dtype, eval_split, pad, signals) -> str:
    """Train with validation each epoch; returns the path of the best checkpoint.

    The checkpoints go to a folder of this run's own (hat/run_folders.py). ``last.ckpt``
    is written every ``checkpoint_every_steps`` steps and after every epoch; it holds
    everything an exact resume needs (see hat/checkpoint.py)."""
    train_data = recipe.training_data(open_split(data_root, c["dataset"], "train"), tokenizer,
                                      build_transform(c["image_transform"], c["image_size"], train=True))
    rank, world_size, _ = world()
    loader = train_loader(train_data, c["batch_size"] or c["per_gpu_batchsize"] * world_size,
                          c["num_workers"], c["seed"], rank, world_size, **pad)
    steps_per_epoch = len(train_data) // loader.batch_sampler.batch_size
    recipe.setup_training(model, steps_per_epoch, amp_dtype)
    optimizer, scheduler, scaler = recipe.optimizer, recipe.scheduler, recipe.scaler
    run_dir = observer_folder(_run)
    out_dir = broadcast_from_main(checkpoint_folder(c, run_dir, _run._id) if is_main_process() else None)
    best_path, last_path = os.path.join(out_dir, "best.ckpt"), os.path.join(out_dir, "last.ckpt")
    progress = {"epoch": 0, "step": 0, "loss_sum": 0.0, "skipped": 0, "best_score": None}

    def save(path, metrics=None):
        if not is_main_process():  # rank 0 writes the checkpoints
            return
        save_checkpoint(path, model, optimizer, scheduler, progress["epoch"], c, metrics,
                        step=progress["step"], loss_sum=progress["loss_sum"],
                        skipped=progress["skipped"], best_score=progress["best_score"],
                        scaler=scaler.state_dict() if scaler is not None else None, rng=rng_state())

    resume_path = find_resume_checkpoint(c, _run, exclude=(out_dir, run_dir))
    if resume_path:
        state = load_training_state(resume_path, model, optimizer, scheduler, c["model"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        progress.update({key: state[key] for key in progress if key != "epoch"}, epoch=state["epoch"])
        set_rng_state(state["rng"])
        previous_best = os.path.join(os.path.dirname(resume_path), "best.ckpt")
        if is_main_process() and os.path.isfile(previous_best) and not os.path.exists(best_path):
            shutil.copyfile(previous_best, best_path + ".tmp")
            os.replace(best_path + ".tmp", best_path)
        _run.info["resumed_from"] = {"checkpoint": os.path.abspath(resume_path),
                                     "epoch": progress["epoch"], "step": progress["step"]}
        print(f"resuming from {resume_path}: epoch {progress['epoch']}, step {progress['step']}",
              flush=True)
    _run.info["checkpoint"] = os.path.abspath(best_path)
    print(f"training on {len(train_data)} {'images' if c['model'] == 'multisea' else 'captions'} of "
          f"{len(train_data.split)} images, "
          f"device {device}, checkpoints in {out_dir}", flush=True)

    network, trainable = model, None
    signals.deferred = True
    while progress["epoch"] < c["max_epoch"]:
        epoch = progress["epoch"]
        model.train()
        recipe.start_epoch(model, epoch)
        names = tuple(name for name, param in model.named_parameters() if param.requires_grad)
        if world_size > 1 and names != trainable:  # DDP syncs what trains
            trainable = names
            network = torch.nn.parallel.DistributedDataParallel(model)
        loader.batch_sampler.set_epoch(epoch, progress["step"])
        lr = optimizer.param_groups[0]["lr"]
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not c["progress"], mininterval=5,
                   initial=progress["step"], total=progress["step"] + len(loader))
        for batch in bar:
            try:
                loss, skipped = recipe.step(network, model, batch, device, epoch,
                                            gather_padded if world_size > 1 else None)
            except NonFiniteLoss as error:
                raise UsageError(f"non-finite loss ({error}) at epoch {epoch}, step "
                                 f"{progress['step']}; last good checkpoint: {last_good(last_path)} "
                                 f"(lower learning_rate, or resume_from it)") from None
            progress["step"] += 1
            progress["loss_sum"] += loss
            progress["skipped"] += int(skipped)
            if c["log_every_steps"] and progress["step"] % c["log_every_steps"] == 0:
                _run.log_scalar("train.step_loss", loss, epoch * steps_per_epoch + progress["step"])
            bar.set_postfix(loss=f"{progress['loss_sum'] / progress['step']:.3f}", refresh=False)
            every = c["checkpoint_every_steps"]
            if signals.received or (every and progress["step"] % every == 0):
                save(last_path)
            if signals.received:
                raise TrainingInterrupted(f"{signals.received} at epoch {epoch}, step "
                                          f"{progress['step']}; resume with resume_from={last_path}")
        bar.close()
        loss = progress["loss_sum"] / max(progress["step"], 1)
        recipe.end_epoch()
        print(f"epoch {epoch}: validating", flush=True)
        try:
            metrics = eval_split("val")
        except NonFiniteScores as error:
            raise UsageError(f"val split at epoch {epoch}, the model being trained: {error}; the "
                             f"training diverged (last good checkpoint: {last_good(last_path)}): lower "
                             f"learning_rate") from None
        score = sum(metrics[key] for key in c["select_metric"])
        _run.log_scalar("train.loss", loss, epoch)
        _run.log_scalar("train.lr", lr, epoch)
        if scaler is not None:
            _run.log_scalar("train.amp_skipped_steps", progress["skipped"], epoch)
        log_metrics(_run, "val", metrics, epoch)
        improved = progress["best_score"] is None or score > progress["best_score"]
        print(f"epoch {epoch}: loss {loss:.4f} lr {lr:.2e} val i2t R@1 {metrics['i2t_r1']:.2f} "
              f"t2i R@1 {metrics['t2i_r1']:.2f} rsum {metrics['rsum']:.2f}"
              f"{' (best)' if improved else ''}", flush=True)
        progress.update(epoch=epoch + 1, step=0, loss_sum=0.0, skipped=0)
        if improved:
            progress["best_score"] = score
            save(best_path, metrics)
        save(last_path, metrics)
        if signals.received:  # it came during validation
            raise TrainingInterrupted(f"{signals.received} at the end of epoch {epoch}; resume with "
                                      f"resume_from={last_path}")
    if not os.path.exists(last_path):  # resumed from a run whose training had ended
        save(last_path)
    signals.deferred = False
    barrier()  # every rank evaluates best.ckpt, written by rank 0
    return best_path


def last_good(last_path: str) -> str:
    return last_path if os.path.exists(last_path) else "none yet"


def find_resume_checkpoint(c, _run, exclude=()) -> str | None:
    """resume_from=PATH, or with resume=True the last.ckpt written most recently by a
    run with the same configuration, in observer_dir, checkpoint_dir or the unrecorded
    runs' folder (None: start from scratch)."""
    if c["resume_from"]:
        return c["resume_from"]
    if not c["resume"]:
        return None
    found = find_resumable(c, exclude)
    if found is None:
        print("resume=True: no earlier run with this configuration; starting from scratch", flush=True)
        return None
    folder, last = found
    name = os.path.basename(os.path.normpath(folder))
    _run.info["resumed_run"] = int(name) if name.isdigit() else name
    _run.info["resumed_folder"] = os.path.abspath(folder)
    return last


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
