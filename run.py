"""Train and evaluate a registered retrieval model: the Sacred main.

    python run.py with demo                       # embedded demo, CPU, minutes
    python run.py with data_root=DATA             # Flickr30K, the paper's recipe
    python run.py with coco_config data_root=DATA test_only=True checkpoint=CKPT

Data flows one way: arrow files -> datamodules (datasets, transforms, loaders) -> the
model's plug-in (hat/models/<model>/plugin.py: model, loss, optimizer, evaluation) -> the
training loop (hat/loop.py) -> the test (hat/evaluation.py's protocol) -> report. This
file is the wiring: the configuration in (config.py, hat/commandline.py), Sacred records
out (hat/recording.py); it names no model.
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

import hat  # noqa: F401  (first: it silences sacred's pkg_resources warning)
from sacred import SETTINGS
from sacred.utils import apply_backspaces_and_linefeeds
from transformers.utils import logging as hf_logging

from config import NAMED_CONFIGS, ex
from datamodules import DataError, open_split
from datamodules.datasets import pad_id_of, train_loader
from datamodules.demo import ensure_demo_data
from datamodules.prepare import prepare_dataset
from datamodules.transforms import build_transform, view_transform
from hat import checks, commandline
from hat.backbones import BackboneError, load_tokenizer
from hat.checkpoint import CheckpointError, load_model_weights
from hat.curves import ScalarLog, curves_title, plot_curves, tensorboard_folder
from hat.distributed import broadcast_from_main, init_distributed, is_main_process, quiet_unless_main, world
from hat.evaluation import METRIC_KEYS, NonFiniteScores, eval_data, format_table
from hat.gallery import write_gallery
from hat.loop import LoopSettings, StopRequested, StopSignals, TrainingFailed, fit
from hat.plugins import ConfigProblem, EvalOptions, get_plugin, model_names
from hat.recording import RunRecorder, TrainingInterrupted, UsageError, observer_folder, record_end
from hat.run_folders import checkpoint_folder, resume_checkpoint

ex.captured_out_filter = apply_backspaces_and_linefeeds
hf_logging.disable_progress_bar()  # transformers' "Loading weights" bars: noise in cout.txt
SETTINGS.CAPTURE_MODE = "sys"  # tqdm and print both land in cout.txt

@ex.option_hook
def refuse_unknown_keys(options):
    """A ``with`` key that the selected model does not have: one line naming the closest
    valid one, exit status 2 (before Sacred builds anything)."""
    problem = commandline.unknown_key((options or {}).get("UPDATE"), NAMED_CONFIGS)
    if problem:
        print(f"ConfigError: {problem}", file=sys.stderr)
        sys.exit(2)


@ex.config_hook
def resolve_and_check(config, command_name, logger):
    """A run of project checkpoints takes their recorded configuration; precision=auto
    becomes what runs; the configuration is checked before any work (one line, exit 2);
    the run is recorded under observer_dir (a RunRecorder)."""
    updates = {}
    if command_name == "gallery":  # an evaluation of checkpoint= that writes the gallery
        updates = {"test_only": True, "gallery": True}
    if command_name in ("main", "gallery"):
        try:
            updates.update(commandline.recorded_updates({**config, **updates})[0])
            config = {**config, **updates}
            validate_config(config)
            checks.check_offline_backbones(config)  # offline without the weights: one line, at once
        except (UsageError, ConfigProblem, CheckpointError) as error:
            print(f"ConfigError: {error}", file=sys.stderr)
            sys.exit(2)
    RunRecorder.install(ex, command_name, config)
    if config["model"] in model_names():  # what the run records is what runs: auto becomes fp16/bf16/fp32
        updates["precision"] = checks.resolve_precision(config)
    return updates


def validate_config(config) -> None:
    """hat.checks.validate_config with its problems as one-line UsageErrors."""
    try:
        checks.validate_config(config)
    except ConfigProblem as error:
        raise UsageError(str(error)) from None


def with_recorded_model(argv: list[str]) -> list[str]:
    """``argv`` with ``model=M`` for a project checkpoint of model M (hat.commandline)."""
    return commandline.with_recorded_model(argv, NAMED_CONFIGS)


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
    with StopSignals() as signals, quiet_unless_main():
        try:
            for note in commandline.recorded_notes(c, _run.meta_info):
                print(note, flush=True)
            return train_and_test(c, _run, signals)
        except (DataError, CheckpointError, BackboneError, ConfigProblem, TrainingFailed) as error:
            raise record_end(_run, UsageError(str(error))) from None
        except StopRequested as error:
            raise record_end(_run, TrainingInterrupted(str(error))) from None
        except BaseException:
            record_end(_run)
            raise


@dataclass
class Job:
    """What every step of a run shares: its configuration, model and where things go."""

    c: dict
    plugin: object
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    data_root: str
    run_dir: str | None  # the run's record folder (None: not recorded)
    run_id: object

    def split_data(self, split: str):
        return eval_data(self.c, self.data_root, split, self.tokenizer, self.plugin.pad_to)


def train_and_test(c, _run, signals) -> dict:
    """Train (unless test_only), then evaluate the best (or the given) checkpoint on test."""
    job = set_up(c, _run)
    if c["test_only"]:
        checkpoints, out_dir, log = job.plugin.test_checkpoints(), None, scalar_log(c, _run, job.run_dir)
    else:
        best, out_dir, log = train(job, _run, signals)
        checkpoints = [best]
    gallery_dir = c["gallery_dir"] or job.run_dir or out_dir if c["gallery"] and is_main_process() else None
    metrics, scores, test_data = test(job, _run, checkpoints, log, keep_scores=gallery_dir is not None)
    if gallery_dir is not None:
        draw_gallery(job, _run, gallery_dir, checkpoints, test_data, metrics, scores)
    elif c["gallery"] and is_main_process():
        print("gallery: not written (this run has no folder: observer_dir=None); pass gallery_dir=DIR", flush=True)
    return metrics


def set_up(c, _run) -> Job:
    """Seeds, the device (and the process group under torchrun), the data, the model."""
    random.seed(c["seed"])
    np.random.seed(c["seed"])
    torch.manual_seed(c["seed"])
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if c["device"] == "auto"
                          else c["device"])
    init_distributed(device.type)
    if device.type == "cuda" and world()[1] > 1:
        device = torch.device("cuda", world()[2])
    data_root = c["data_root"]
    if c["dataset"] == "demo":
        data_root = ensure_demo_data(data_root, c["demo_train_images"], c["demo_eval_images"],
                                     c["image_size"], seed=0)
    tokenizer = load_tokenizer(c["text_backbone"])
    plugin = get_plugin(c["model"])(c)
    # test_only and fine-tuning from checkpoint= build the architecture alone: every
    # weight comes from the checkpoint, so no backbone is downloaded
    model = plugin.build(pretrained=not (c["test_only"] or c["checkpoint"])).to(device)
    return Job(c, plugin, model, tokenizer, device, data_root, observer_folder(_run), _run._id)


def train(job: Job, _run, signals) -> tuple[str, str, ScalarLog]:
    """The training loop over the train split with validation each epoch: (the best
    checkpoint's path, the checkpoints' folder, the run's scalar log)."""
    c, plugin, model = job.c, job.plugin, job.model
    rank, world_size, _ = world()
    train_split = open_split(job.data_root, c["dataset"], "train")
    train_data = plugin.training_data(train_split, job.tokenizer,
                                      build_transform(c["image_transform"], c["image_size"], train=True))
    batch = c["batch_size"] or c["per_gpu_batchsize"] * world_size
    checks.check_fills_a_batch(c, len(train_data), plugin.training_unit, batch)
    loader = train_loader(train_data, batch, c["num_workers"], c["seed"], rank, world_size,
                          pad_id=pad_id_of(job.tokenizer), pad_to=plugin.pad_to)
    out_dir = broadcast_from_main(checkpoint_folder(c, job.run_dir, job.run_id) if is_main_process() else None)
    _run.info["checkpoint"] = os.path.abspath(os.path.join(out_dir, "best.ckpt"))
    log = scalar_log(c, _run, job.run_dir or out_dir)
    resume_path = c["resume_from"]
    if c["resume"] and not resume_path:
        resume_path, found = resume_checkpoint(c, exclude=(out_dir, job.run_dir))
        _run.info.update(found)
    settings = LoopSettings(
        max_epoch=c["max_epoch"], micro_batch_size=c["per_gpu_batchsize"], accumulation=c["accumulation"],
        precision=c["precision"], clip_norm=c["clip_norm"], select_metric=c["select_metric"], progress=c["progress"],
        checkpoint_every_steps=c["checkpoint_every_steps"], log_every_steps=c["log_every_steps"])
    if c["checkpoint"]:  # fine-tuning: start from these weights (resume_from continues a run instead)
        loaded = load_model_weights(model, c["checkpoint"])
        _run.info["initialized_from"] = {"checkpoint": os.path.abspath(c["checkpoint"]), **loaded}
        print(f"initialised the model from checkpoint={c['checkpoint']} ({loaded['format']})", flush=True)
    val_data = job.split_data("val")
    checks.check_split_images({"train": train_split, "val": val_data.images.dataset.split,
                               "test": open_split(job.data_root, c["dataset"], "test")}, c["dataset"],
                              job.data_root, c["verify_val_images"])

    def validate() -> dict:
        return plugin.evaluate(model, val_data, job.device, EvalOptions(split="val")).metrics

    best = fit(plugin, model, train_data, loader, job.device, settings, out_dir, signals, validate, log, _run.info,
               c, resume_path)
    if is_main_process():
        curves = plot_curves(log.series, os.path.join(job.run_dir or out_dir, "curves.png"),
                             curves_title(c["model"], c["dataset"], job.run_id))
        print(f"training curves: {curves}", flush=True)
    return best, out_dir, log


def test(job: Job, _run, checkpoints: list, log, keep_scores: bool) -> tuple[dict, dict, object]:
    """Evaluate ``checkpoints`` on the test split; print and log the metrics. (metrics,
    the ranked score matrices with ``keep_scores``, the split's EvalData)."""
    c = job.c
    what = checkpoints[0] if len(checkpoints) == 1 else f"ensemble of {len(checkpoints)}"
    print(f"testing {what} on the test split of {c['dataset']}", flush=True)
    options = EvalOptions(split="test", checkpoints=checkpoints, n_folds=c["eval_folds"],
                          keep_scores=keep_scores)
    test_data = job.split_data("test")
    try:
        result = job.plugin.evaluate(job.model, test_data, job.device, options)
    except NonFiniteScores as error:
        raise UsageError(f"test split, checkpoint {what}: {error}; its weights are broken (a run "
                         f"that diverged or a corrupted file): evaluate another checkpoint") from None
    metrics = result.metrics
    _run.info.update(result.info)
    print(format_table(metrics, f"test split of {c['dataset']}, {what}", job.plugin.table_rows(metrics)),
          flush=True)
    if "folds_rsum" in metrics:
        print(format_table({key: metrics[f"folds_{key}"] for key in METRIC_KEYS},
                           f"mean over {c['eval_folds']} consecutive folds"), flush=True)
    for key, value in metrics.items():
        log(f"test.{key}", value, 0)
    log.close()
    return metrics, result.scores, test_data


def draw_gallery(job: Job, _run, gallery_dir: str, checkpoints: list, test_data, metrics: dict, scores: dict) -> None:
    """gallery.html and retrievals.json of the test's score matrices (hat.gallery)."""
    c = job.c
    if not {"i2t", "t2i"} <= set(scores):
        print(f"gallery: not written (model={c['model']} keeps no score matrices: its evaluate returns no "
              f"Evaluation.scores for EvalOptions.keep_scores)", flush=True)
        return
    what = checkpoints[0] if len(checkpoints) == 1 else f"ensemble of {len(checkpoints)}"
    title = f"{job.plugin.display_name()} on the test split of {c['dataset']}: {what}"
    paths = write_gallery(gallery_dir, job.plugin, job.model, test_data, scores, job.device, title,
                          metrics, c["n_queries"], c["seed"], view_transform(c["image_transform"], c["image_size"]))
    _run.info["gallery"] = paths
    print(f"gallery: {paths['gallery']} (retrievals: {paths['retrievals']})", flush=True)


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


@ex.command(unobserved=True)  # it writes arrow files, not a run: nothing to record
def prepare_data(dataset, raw_root, data_root, skip_missing_images, progress, captions, image_column,
                 caption_column, val_images, test_images, seed):
    """Write the arrow files of dataset=f30k|coco from raw_root (the images and the
    Karpathy JSON) into data_root; splits already complete are skipped. With
    captions=FILE: dataset=NAME from your own pictures under raw_root."""
    custom = {} if captions is None else {"image_column": image_column, "caption_column": caption_column,
                                          "val_images": val_images, "test_images": test_images, "seed": seed}
    try:
        return prepare_dataset(dataset, raw_root, data_root, skip_missing_images, progress=progress,
                               captions=captions, **custom)
    except DataError as error:
        raise UsageError(str(error)) from None


if __name__ == "__main__":
    ex.run_commandline(with_recorded_model(sys.argv))
