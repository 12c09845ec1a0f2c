"""Train and evaluate a retrieval model (HAT by default, Multi-SEA with multisea): the
Sacred main.

    python run.py with demo                       # embedded demo, CPU, minutes
    python run.py with data_root=DATA             # Flickr30K, the paper's recipe
    python run.py with coco_config data_root=DATA test_only=True checkpoint=CKPT

Data flows one way: arrow files -> datamodules (datasets, transforms, loaders) -> the
model's plug-in (hat/models/<model>/plugin.py: model, loss, optimizer) -> the training
loop (hat/loop.py) -> evaluation (the plug-in's evaluate, hat/evaluation.py) -> report.
This file is the wiring: configuration in, Sacred records out.
"""
from __future__ import annotations

import difflib
import logging
import os
import random
import sys

import numpy as np
import torch

import hat  # noqa: F401  (first: it silences sacred's pkg_resources warning)
from sacred import SETTINGS
from sacred.observers import FileStorageObserver
from sacred.utils import SacredError, SacredInterrupt, apply_backspaces_and_linefeeds
from transformers.utils import logging as hf_logging

from config import NAMED_CONFIGS, ex
from datamodules import DataError, open_split
from datamodules.arrow import split_paths
from datamodules.datasets import (SplitCaptions, SplitImages, caption_loader, image_loader, pad_id_of,
                                  train_loader)
from datamodules.demo import ensure_demo_data
from datamodules.prepare import prepare_dataset
from datamodules.transforms import build_transform, view_transform
from hat import checks
from hat.backbones import BackboneError, load_tokenizer
from hat.checkpoint import CheckpointError, load_model_weights, recorded_config
from hat.curves import ScalarLog, curves_title, plot_curves, tensorboard_folder
from hat.defaults import default_config
from hat.distributed import broadcast_from_main, init_distributed, is_main_process, quiet_unless_main, world
from hat.evaluation import METRIC_KEYS, EvalData, NonFiniteScores, format_table
from hat.gallery import write_gallery
from hat.loop import LoopSettings, StopRequested, StopSignals, TrainingFailed, fit
from hat.plugins import ConfigProblem, EvalOptions, get_plugin, model_names
from hat.run_folders import checkpoint_folder, resume_checkpoint

class _ObservedOrOnPurpose(logging.Filter):
    """Drop Sacred's "No observers have been added to this run": the training commands
    record every run (observer_dir), and prepare_data writes arrow files, not a run."""

    def filter(self, record) -> bool:
        return "No observers have been added" not in record.getMessage()


ex.captured_out_filter = apply_backspaces_and_linefeeds
logging.getLogger(ex.path).addFilter(_ObservedOrOnPurpose())
hf_logging.disable_progress_bar()  # transformers' "Loading weights" bars: noise in cout.txt
SETTINGS.CAPTURE_MODE = "sys"  # tqdm and print both land in cout.txt


class UsageError(SacredError):
    """A one-line error about the user's input (printed without a traceback)."""

    def __init__(self, message):
        super().__init__(message, print_traceback=False)


class TrainingInterrupted(SacredInterrupt, SacredError):
    """SIGINT/SIGTERM: the run stopped where it was safe to (hat.loop.StopSignals)."""

    STATUS = "INTERRUPTED"

    def __init__(self, message):
        SacredError.__init__(self, message, print_traceback=False)


UsageError.__module__ = TrainingInterrupted.__module__ = "builtins"  # printed as "UsageError: ..."


COMMAND_LINE = {}  # the options of this command line (-F, -u, with ...), seen by the option hook
NOTES = []  # what the configuration hook has to tell the run (printed into its output)


@ex.option_hook
def remember_options(options):
    """Keep the command line's options; refuse an unknown key in one line, naming the
    closest valid one."""
    COMMAND_LINE.clear()
    COMMAND_LINE.update(options or {})
    problem = unknown_key(COMMAND_LINE.get("UPDATE") or [])
    if problem:
        print(f"ConfigError: {problem}", file=sys.stderr)
        sys.exit(2)


def unknown_key(updates: list[str]) -> str | None:
    """A one-line message for the first ``with`` key that the selected model's
    configuration does not have (None: every key is known)."""
    selected = {"model": "hat", "dataset": "f30k"}
    for update in updates:  # named configs and key=value, in order: the last one wins
        values = NAMED_CONFIGS.get(update, {}) if "=" not in update else dict([update.split("=", 1)])
        selected.update({k: v.strip("'\"") for k, v in values.items() if k in selected and isinstance(v, str)})
    if selected["model"] not in model_names():
        return None  # validate_config names the valid models
    known = set(default_config(selected["model"], selected["dataset"]))
    for update in updates:
        key = update.split("=", 1)[0].split(".", 1)[0] if "=" in update else None
        if key is None or key in known:
            continue
        owners = [name for name in model_names() if name != selected["model"] and key in default_config(name)]
        if owners:
            return f"{key} is a key of model={owners[0]}, not of model={selected['model']}; leave it out"
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"unknown config key {key}; {hint}(python run.py print_config lists the keys)"
    return None


@ex.config_hook
def check_and_observe(config, command_name, logger):
    """test_only: take the checkpoint's recorded configuration; resolve precision=auto;
    check the configuration before any work; record every run under ``observer_dir`` (a
    FileStorageObserver, unless -F names one)."""
    for observer in [o for o in ex.observers if getattr(o, "_hat_default", False)]:
        ex.observers.remove(observer)
    updates = {}
    NOTES.clear()
    if command_name == "gallery":  # an evaluation of checkpoint= that writes the gallery
        updates = {"test_only": True, "gallery": True}
        config = {**config, **updates}
    if command_name in ("main", "gallery"):
        try:
            updates.update(recorded_updates(config))
            config = {**config, **updates}
            validate_config(config)
            checks.check_offline_backbones(config)  # offline without the weights: one line, at once
        except (UsageError, ConfigProblem, CheckpointError) as error:  # before any work: one line, exit status 2
            print(f"ConfigError: {error}", file=sys.stderr)
            sys.exit(2)
        file_observer = any(isinstance(o, FileStorageObserver) for o in ex.observers) or COMMAND_LINE.get(
            "--file_storage")
        if config["observer_dir"] and not file_observer and is_main_process():
            observer = FileStorageObserver(config["observer_dir"])
            observer._hat_default = True
            ex.observers.append(observer)
    if config["model"] in model_names():  # what the run records is what runs: auto becomes fp16/bf16/fp32
        updates["precision"] = checks.resolve_precision(config)
    return updates


def recorded_updates(config) -> dict:
    """A run of project checkpoints (test_only, the gallery, an ensemble, fine-tuning from
    checkpoint=): the configuration they record, for the keys not given on the command
    line (hat.checks.checkpoint_config_updates); an ensemble's members share one
    architecture. Released files record nothing."""
    paths = [str(p) for p in (config.get("ensemble") or [config["checkpoint"]]) if p and os.path.isfile(str(p))]
    if not paths or config["model"] not in model_names():
        return {}
    members = [(path, recorded_config(path)) for path in paths]
    members = [(path, recorded) for path, recorded in members if recorded]
    if not members:
        return {}
    # given: keys on the command line, and keys (named configs, in-process updates) that
    # differ from the defaults of this model and dataset
    given = {update.split("=", 1)[0] for update in COMMAND_LINE.get("UPDATE") or [] if "=" in update}
    defaults = default_config(config["model"], config["dataset"], demo_recipe=config["demo_recipe"])
    given |= {key for key, value in config.items() if key not in defaults or defaults[key] != value}
    given |= {"model"} if config["model"] != "hat" else set()
    checks.check_one_architecture(config["model"], members)
    updates, notes = checks.checkpoint_config_updates(config, members[0][1], given, path=members[0][0],
                                                      fine_tune=not config["test_only"])
    NOTES[:] = notes
    return updates


def with_recorded_model(argv: list[str]) -> list[str]:
    """``argv`` with ``model=M`` added when it names a project checkpoint of model M
    (checkpoint=, or the first of ensemble=) and selects no model itself: a Multi-SEA
    checkpoint needs no ``with multisea`` (the model's keys exist only when it is selected,
    so this is decided before Sacred builds the configuration)."""
    if "with" not in argv:
        return argv
    updates = argv[argv.index("with") + 1:]
    if any(u.startswith("model=") or "model" in NAMED_CONFIGS.get(u, {}) for u in updates):
        return argv
    for update in updates:
        key, _, value = update.partition("=")
        value = value.strip("'\"")
        if key == "ensemble":
            value = value.strip("[]").split(",")[0].strip().strip("'\"")
        if key in ("checkpoint", "ensemble") and os.path.isfile(value):
            try:
                recorded = recorded_config(value) or {}
            except CheckpointError:
                return argv  # the configuration hook says what is wrong with it
            if recorded.get("model") in model_names() and recorded["model"] != "hat":
                return [*argv, f"model={recorded['model']}"]
    return argv


def validate_config(config) -> None:
    """hat.checks.validate_config with its problems as one-line UsageErrors."""
    try:
        checks.validate_config(config)
    except ConfigProblem as error:
        raise UsageError(str(error)) from None


@ex.main
def main(_config, _run):
    return guarded(_config, _run)


@ex.command
def gallery(_config, _run):
    """Evaluate checkpoint= on the test split and write gallery.html and retrievals.json
    (n_queries sample captions and images, chosen with seed) into the run's folder, or
    gallery_dir: python run.py gallery with checkpoint=CKPT data_root=DATA n_queries=20"""
    return guarded(_config, _run)


def guarded(c, _run) -> dict:
    """train_and_test with its problems as one-line errors and signals as INTERRUPTED;
    either way the run's record keeps the end of its output and the message."""
    for note in NOTES:
        print(note, flush=True)
    with StopSignals() as signals, quiet_unless_main():
        try:
            return train_and_test(c, _run, signals)
        except (DataError, CheckpointError, BackboneError, ConfigProblem, TrainingFailed) as error:
            raise record_end(_run, UsageError(str(error))) from None
        except StopRequested as error:
            raise record_end(_run, TrainingInterrupted(str(error))) from None
        except BaseException:
            record_end(_run)
            raise


def record_end(_run, error: BaseException | None = None):
    """Sacred closes a run's captured output before it reports a failure or an interrupt,
    so cout.txt would lack what was printed since the last heartbeat (everything, for a
    run shorter than one) and the error line Sacred prints after it. Collect that output
    now, append the error line, and keep the message in run.json (``message``) for the
    observers to write; returns ``error``."""
    try:
        _run._get_captured_output()  # Sacred has no public call for "collect the output so far"
    except (AttributeError, ValueError, OSError):
        pass
    if error is not None:
        line = f"{type(error).__name__}: {error}"
        _run.captured_out = (_run.captured_out or "") + line + "\n"
        for observer in _run.observers:
            if isinstance(getattr(observer, "run_entry", None), dict):
                observer.run_entry["message"] = line
    return error


def train_and_test(c, _run, signals) -> dict:
    """Train (unless test_only), then evaluate the best (or the given) checkpoint on test."""
    random.seed(c["seed"])
    np.random.seed(c["seed"])
    torch.manual_seed(c["seed"])
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if c["device"] == "auto"
                          else c["device"])
    init_distributed(device.type)
    rank, world_size, local_rank = world()
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
    data_root = c["data_root"]
    if c["dataset"] == "demo":
        data_root = ensure_demo_data(data_root, c["demo_train_images"], c["demo_eval_images"],
                                     c["image_size"], seed=0)

    tokenizer = load_tokenizer(c["text_backbone"])
    plugin = get_plugin(c["model"])(c)
    # test_only and fine-tuning from checkpoint= build the architecture alone: every
    # weight comes from the checkpoint, so no backbone is downloaded
    model = plugin.build(pretrained=not (c["test_only"] or c["checkpoint"])).to(device)
    pad = {"pad_id": pad_id_of(tokenizer), "pad_to": plugin.pad_to}

    def split_data(split: str) -> EvalData:
        return eval_data(c, data_root, split, tokenizer, plugin.pad_to)

    run_dir = observer_folder(_run)
    out_dir = None  # the checkpoints' folder of a training run
    if c["test_only"]:
        checkpoints = plugin.test_checkpoints()
        log = scalar_log(c, _run, run_dir)
    else:
        train_split = open_split(data_root, c["dataset"], "train")
        train_data = plugin.training_data(train_split, tokenizer,
                                          build_transform(c["image_transform"], c["image_size"], train=True))
        batch = c["batch_size"] or c["per_gpu_batchsize"] * world_size
        checks.check_fills_a_batch(c, len(train_data), plugin.training_unit, batch)
        loader = train_loader(train_data, batch, c["num_workers"], c["seed"], rank, world_size, **pad)
        out_dir = broadcast_from_main(checkpoint_folder(c, run_dir, _run._id) if is_main_process() else None)
        _run.info["checkpoint"] = os.path.abspath(os.path.join(out_dir, "best.ckpt"))
        log = scalar_log(c, _run, run_dir or out_dir)
        resume_path = c["resume_from"]
        if c["resume"] and not resume_path:
            resume_path, found = resume_checkpoint(c, exclude=(out_dir, run_dir))
            _run.info.update(found)
        settings = LoopSettings(
            max_epoch=c["max_epoch"], micro_batch_size=c["per_gpu_batchsize"],
            precision=checks.resolve_precision(c), clip_norm=c["clip_norm"], select_metric=c["select_metric"],
            checkpoint_every_steps=c["checkpoint_every_steps"], log_every_steps=c["log_every_steps"],
            progress=c["progress"])
        if c["checkpoint"]:  # fine-tuning: start from these weights (resume_from continues a run instead)
            loaded = load_model_weights(model, c["checkpoint"])
            _run.info["initialized_from"] = {"checkpoint": os.path.abspath(c["checkpoint"]), **loaded}
            print(f"initialised the model from checkpoint={c['checkpoint']} ({loaded['format']})", flush=True)
        val_data = split_data("val")
        checks.check_split_images({"train": train_split, "val": val_data.images.dataset.split,
                                   "test": open_split(data_root, c["dataset"], "test")}, c["dataset"],
                                  data_root, c["verify_val_images"])
        checkpoints = [fit(plugin, model, train_data, loader, device, settings, out_dir, signals,
                           lambda: plugin.evaluate(model, val_data, device, EvalOptions(split="val")),
                           log, _run.info, c, resume_path)]
        if is_main_process():
            curves = plot_curves(log.series, os.path.join(run_dir or out_dir, "curves.png"),
                                 curves_title(c["model"], c["dataset"], _run._id))
            print(f"training curves: {curves}", flush=True)

    what = checkpoints[0] if len(checkpoints) == 1 else f"ensemble of {len(checkpoints)}"
    print(f"testing {what} on the test split of {c['dataset']}", flush=True)
    gallery_dir = c["gallery_dir"] or run_dir or out_dir if c["gallery"] and is_main_process() else None
    options = EvalOptions(split="test", checkpoints=checkpoints, n_folds=c["eval_folds"],
                          keep_scores=gallery_dir is not None)
    test_data = split_data("test")
    try:
        metrics = plugin.evaluate(model, test_data, device, options)
    except NonFiniteScores as error:
        raise UsageError(f"test split, checkpoint {what}: {error}; its weights are broken (a run "
                         f"that diverged or a corrupted file): evaluate another checkpoint") from None
    _run.info.update(options.info)
    print(format_table(metrics, f"test split of {c['dataset']}, {what}"), flush=True)
    if "folds_rsum" in metrics:
        print(format_table({key: metrics[f"folds_{key}"] for key in METRIC_KEYS},
                           f"mean over {c['eval_folds']} consecutive folds"), flush=True)
    for key, value in metrics.items():
        log(f"test.{key}", value, 0)
    log.close()
    if gallery_dir is not None and not {"i2t", "t2i"} <= set(options.scores):
        print(f"gallery: not written (model={c['model']} keeps no score matrices: its evaluate ignores "
              f"EvalOptions.keep_scores)", flush=True)
    elif gallery_dir is not None:
        title = f"{getattr(plugin, 'title', c['model'])} on the test split of {c['dataset']}: {what}"
        paths = write_gallery(gallery_dir, plugin, model, test_data, options.scores, device, title, metrics,
                              c["n_queries"], c["seed"], view_transform(c["image_transform"], c["image_size"]))
        _run.info["gallery"] = paths
        print(f"gallery: {paths['gallery']} (retrievals: {paths['retrievals']})", flush=True)
    elif c["gallery"] and is_main_process():
        print("gallery: not written (this run has no folder: observer_dir=None); pass gallery_dir=DIR", flush=True)
    return metrics


def scalar_log(c, _run, folder: str | None) -> ScalarLog:
    """The run's log_scalar, mirrored into TensorBoard event files (rank 0) when the
    tensorboard key asks for them."""
    events = None
    if c["tensorboard"] and is_main_process():
        try:
            events = tensorboard_folder(c["tensorboard"], folder, f"{c['exp_name']}_{_run._id or 'unrecorded'}")
        except ValueError as error:
            raise ConfigProblem(str(error)) from None
        print(f"tensorboard: event files in {events} (tensorboard --logdir {os.path.dirname(events)})", flush=True)
    return ScalarLog(_run.log_scalar, events)


def eval_data(c, data_root: str, split: str, tokenizer, pad_to=None) -> EvalData:
    """The loaders of a split as the runner evaluates it: images with the test-time
    transform, the protocol's captions, the caption -> image map, the split's files."""
    data = open_split(data_root, c["dataset"], split)
    captions = SplitCaptions(data, tokenizer, c["max_text_len"], c["captions_per_image"])
    transform = build_transform(c["image_transform"], c["image_size"], train=False)
    return EvalData(image_loader(SplitImages(data, transform), c["eval_batch_size"], c["num_workers"]),
                    caption_loader(captions, c["eval_batch_size"], c["num_workers"],
                                   pad_id=pad_id_of(tokenizer), pad_to=pad_to),
                    captions.caption_to_image, split_paths(data_root, c["dataset"], split))


def observer_folder(_run) -> str | None:
    """The run's FileStorageObserver folder (None when the run is not recorded)."""
    for observer in _run.observers:
        if isinstance(observer, FileStorageObserver) and observer.dir:
            return observer.dir
    return None


@ex.command
def prepare_data(dataset, raw_root, data_root, skip_missing_images, progress):
    """Write the arrow files of dataset=f30k|coco from raw_root (the images and the
    Karpathy JSON) into data_root; splits already complete are skipped."""
    try:
        return prepare_dataset(dataset, raw_root, data_root, skip_missing_images, progress=progress)
    except DataError as error:
        raise UsageError(str(error)) from None


if __name__ == "__main__":
    ex.run_commandline(with_recorded_model(sys.argv))
