"""The training loop, one for every model (a `hat.plugins.ModelPlugin` says what is
model-specific).

`fit` runs epochs of optimizer steps with validation after each, and owns everything
around the model's loss: mixed precision (fp16 + GradScaler, bf16, fp32), micro-batch
accumulation with DDP ``no_sync``, gradient clipping, optimizer and scheduler steps (per
step or per epoch, as the plug-in says), the non-finite-loss stop, ``last.ckpt`` /
``best.ckpt`` with everything an exact resume needs, and stop signals. One optimizer step
is `optimizer_step`.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from hat.checkpoint import link_checkpoint, load_training_state, non_finite_parameters, save_checkpoint
from hat.distributed import barrier, gather_padded, is_main_process, world
from hat.evaluation import NonFiniteScores


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite."""


class StopRequested(BaseException):
    """A stop signal ended the run where it was safe to (see `StopSignals`). Like
    KeyboardInterrupt it is no `Exception`, so no ``except Exception`` on the way (reading
    a checkpoint, loading a backbone) can mistake a stop for a broken file."""


class TrainingFailed(Exception):
    """Training cannot go on (a diverged model); the message is one line."""


class StopSignals:
    """SIGINT/SIGTERM for the whole run, which always ends in `StopRequested`.

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
        raise StopRequested(f"{name}: stopped at once{' (training)' if self.deferred else ''}; "
                            f"nothing half-written was left")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def amp_dtype_of(precision: str):
    """None (fp32) or the autocast dtype of ``precision`` (fp16 | bf16 | fp32)."""
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def optimizer_step(network, compute_loss, batch: dict, optimizer, device, micro_batch_size: int,
                   amp_dtype=None, scaler=None, clip_norm: float | None = None, parameters=None,
                   scheduler=None) -> tuple[dict, bool]:
    """One optimizer step on this process's batch, cut into micro-batches of
    ``micro_batch_size``. Returns ({loss name: batch mean}, skipped): ``skipped`` is True
    when the fp16 GradScaler dropped the step (inf/NaN gradients).

    ``compute_loss(network, micro_batch)`` gives the losses of a micro-batch (tensors on
    ``device``); each ``["loss"]`` is scaled by the micro-batch's share of the batch, so
    the gradient is the batch mean's for a loss that is a mean over samples. Under DDP
    (``network.no_sync``) the gradients are reduced once, on the last micro-batch. The
    gradient norm of ``parameters`` is clipped to ``clip_norm`` (None: not clipped);
    ``scheduler`` (a per-step schedule) steps after the optimizer. A non-finite loss
    outside fp16 raises `NonFiniteLoss` before the optimizer steps."""
    size = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    optimizer.zero_grad(set_to_none=True)
    names, totals = None, None  # accumulated without host syncs
    for start in range(0, size, micro_batch_size):
        micro = {key: value[start:start + micro_batch_size].to(device, non_blocking=True)
                 if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        share = min(micro_batch_size, size - start) / size
        last = start + micro_batch_size >= size
        sync = contextlib.nullcontext() if last or not hasattr(network, "no_sync") else network.no_sync()
        with sync:
            with autocast:
                losses = compute_loss(network, micro)
            loss = losses["loss"] * share
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if names is None:
            names = list(losses)
            totals = torch.zeros(len(names), device=device)
        totals += torch.stack([losses[name].detach().float() for name in names]) * share
    values = dict(zip(names, totals.tolist()))  # the step's one host sync
    if scaler is None and not math.isfinite(values["loss"]):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(values["loss"])
    skipped = False
    if scaler is not None:  # fp16: GradScaler skips steps with inf/NaN gradients
        if clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale
    else:
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return values, skipped


@dataclass
class LoopSettings:
    """The loop's knobs, read from the run's configuration by the caller."""

    max_epoch: int
    micro_batch_size: int  # per process (per_gpu_batchsize)
    precision: str = "fp32"  # fp16 | bf16 | fp32
    clip_norm: float | None = None
    select_metric: tuple = ("rsum",)
    checkpoint_every_steps: int = 0
    log_every_steps: int = 0
    progress: bool = True


def fit(plugin, model, train_data, loader, device, settings: LoopSettings, out_dir: str, signals: StopSignals,
        validate, log, info: dict, config: dict, resume_path: str | None = None) -> str:
    """Train with validation after every epoch; returns the path of the best checkpoint.

    ``loader`` yields this process's share of each global batch (one optimizer step);
    ``validate()`` returns the validation metrics; ``log(name, value, step)`` records a
    scalar; ``info`` receives what the run should record (``resumed_from``);
    ``config`` is stored in every checkpoint. ``last.ckpt`` is written every
    ``checkpoint_every_steps`` steps and after every epoch, ``best.ckpt`` whenever the sum
    of the ``select_metric`` validation metrics improves."""
    world_size = world()[1]
    steps_per_epoch = len(train_data) // loader.batch_sampler.batch_size
    optimizer = plugin.optimizer(model)
    scheduler, schedule_unit = plugin.scheduler(optimizer, steps_per_epoch)
    amp_dtype = amp_dtype_of(settings.precision)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    best_path, last_path = os.path.join(out_dir, "best.ckpt"), os.path.join(out_dir, "last.ckpt")
    # loss_sums: the other losses the plug-in reports, summed over the epoch's steps
    progress = {"epoch": 0, "step": 0, "loss_sum": 0.0, "loss_sums": {}, "skipped": 0, "best_score": None}

    taken = 0  # optimizer steps this process has run
    # checkpoint path -> optimizer steps taken when it was written: it holds the weights
    # after that many steps, which a later finite loss has shown to be good
    written = {}

    def save(path, metrics=None, same_as=None):
        """Write checkpoint ``path``; ``same_as``: a checkpoint of this very state, written
        just before, that ``path`` becomes a second name of (one file on disk)."""
        bad = non_finite_parameters(model)
        if bad:  # the update diverged although the loss was still finite: keep what is on disk
            raise TrainingFailed(f"the weights became NaN/infinite ({len(bad)} parameter(s), first: {bad[0]}) "
                                 f"by epoch {progress['epoch']}, step {progress['step']}; nothing was written; "
                                 f"{last_good()}; lower learning_rate")
        if is_main_process() and not (same_as and link_checkpoint(same_as, path)):  # rank 0 writes them
            save_checkpoint(path, model, optimizer, scheduler, progress["epoch"], config, metrics,
                            step=progress["step"], loss_sum=progress["loss_sum"], loss_sums=progress["loss_sums"],
                            skipped=progress["skipped"], best_score=progress["best_score"],
                            scaler=scaler.state_dict() if scaler is not None else None, rng=rng_state())
        written[path] = taken

    def last_good() -> str:
        """The newest checkpoint whose weights a later step found finite (a checkpoint
        written after the last step holds the weights that diverged), or none."""
        good = [(steps, path == last_path, path) for path, steps in written.items()
                if steps < taken and os.path.exists(path)]
        poisoned = [path for path, steps in written.items() if steps == taken and os.path.exists(path)]
        warning = f" ({', '.join(poisoned)} holds the diverged weights: do not resume from it)" if poisoned else ""
        if not good:
            return f"no good checkpoint: none was written before the step that diverged{warning}"
        return f"last good checkpoint: {max(good)[2]}, resume_from it{warning}"

    if resume_path:
        state = load_training_state(resume_path, model, optimizer, scheduler, plugin.name)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        progress.update({key: state.get(key, progress[key]) for key in progress if key != "epoch"},
                        epoch=state["epoch"])
        set_rng_state(state["rng"])
        written[resume_path] = 0
        previous_best = os.path.join(os.path.dirname(resume_path), "best.ckpt")
        if is_main_process() and os.path.isfile(previous_best) and not os.path.exists(best_path):
            shutil.copyfile(previous_best, best_path + ".tmp")
            os.replace(best_path + ".tmp", best_path)
        written.setdefault(best_path, -1)  # older than the resumed weights
        info["resumed_from"] = {"checkpoint": os.path.abspath(resume_path), "epoch": progress["epoch"],
                                "step": progress["step"]}
        print(f"resuming from {resume_path}: epoch {progress['epoch']}, step {progress['step']}", flush=True)
    print(f"training on {len(train_data)} {plugin.training_unit} of {len(train_data.split)} images, "
          f"device {device}, checkpoints in {out_dir}", flush=True)

    network, trainable = model, None
    gather = gather_padded if world_size > 1 else None
    signals.deferred = True
    while progress["epoch"] < settings.max_epoch:
        epoch = progress["epoch"]
        model.train()
        plugin.start_epoch(model, epoch)
        names = tuple(name for name, param in model.named_parameters() if param.requires_grad)
        if world_size > 1 and names != trainable:  # DDP syncs what trains
            trainable = names
            network = torch.nn.parallel.DistributedDataParallel(model)
        loader.batch_sampler.set_epoch(epoch, progress["step"])
        lr = optimizer.param_groups[0]["lr"]
        last_lr = lr  # the epoch line's: the learning rate of the epoch's last step
        bar = progress_bar(loader, f"epoch {epoch}", progress["step"], progress["step"] + len(loader),
                           settings.progress)
        for batch in bar:
            last_lr = optimizer.param_groups[0]["lr"]
            try:
                losses, skipped = optimizer_step(
                    network, lambda net, micro: plugin.loss(net, model, micro, epoch, gather), batch, optimizer,
                    device, settings.micro_batch_size, amp_dtype, scaler, settings.clip_norm,
                    model.parameters(), scheduler if schedule_unit == "step" else None)
            except NonFiniteLoss as error:
                raise TrainingFailed(f"non-finite loss ({error}) at epoch {epoch}, step {progress['step']}; "
                                     f"nothing was written; {last_good()}; lower learning_rate") from None
            loss = losses.pop("loss")
            taken += 1
            progress["step"] += 1
            progress["loss_sum"] += loss
            for key, value in losses.items():
                progress["loss_sums"][key] = progress["loss_sums"].get(key, 0.0) + value
            progress["skipped"] += int(skipped)
            if settings.log_every_steps and progress["step"] % settings.log_every_steps == 0:
                for key, value in {"loss": loss, **losses}.items():
                    log(f"train.step_{key}", value, epoch * steps_per_epoch + progress["step"])
            bar.set_postfix(loss=f"{progress['loss_sum'] / progress['step']:.3f}", refresh=False)
            every = settings.checkpoint_every_steps
            if signals.received or (every and progress["step"] % every == 0):
                save(last_path)
            if signals.received:
                raise StopRequested(f"{signals.received} at epoch {epoch}, step {progress['step']}; "
                                    f"resume with resume_from={last_path}")
        bar.close()
        loss = progress["loss_sum"] / max(progress["step"], 1)
        if schedule_unit == "epoch":
            scheduler.step()
        print(f"epoch {epoch}: validating", flush=True)
        try:
            metrics = validate()
        except NonFiniteScores as error:
            raise TrainingFailed(f"val split at epoch {epoch}, the model being trained: {error}; the "
                                 f"training diverged ({last_good()}): lower learning_rate") from None
        score = sum(metrics[key] for key in settings.select_metric)
        log("train.loss", loss, epoch)
        for key, total in progress["loss_sums"].items():  # the plug-in's other losses
            log(f"train.{key}", total / max(progress["step"], 1), epoch)
        log("train.lr", lr, epoch)
        if scaler is not None:
            log("train.amp_skipped_steps", progress["skipped"], epoch)
        for key, value in metrics.items():
            log(f"val.{key}", value, epoch)
        improved = progress["best_score"] is None or score > progress["best_score"]
        # the learning rates the epoch's steps used: first..last under a per-step schedule
        lrs = f"{lr:.2e}" if f"{lr:.2e}" == f"{last_lr:.2e}" else f"{lr:.2e}..{last_lr:.2e}"
        print(f"epoch {epoch}: loss {loss:.4f} lr {lrs} val i2t R@1 {metrics['i2t_r1']:.2f} "
              f"t2i R@1 {metrics['t2i_r1']:.2f} rsum {metrics['rsum']:.2f}"
              f"{' (best)' if improved else ''}", flush=True)
        progress.update(epoch=epoch + 1, step=0, loss_sum=0.0, loss_sums={}, skipped=0)
        if improved:
            progress["best_score"] = score
            save(best_path, metrics)
        save(last_path, metrics, same_as=best_path if improved else None)
        if signals.received:  # it came during validation
            raise StopRequested(f"{signals.received} at the end of epoch {epoch}; resume with "
                                f"resume_from={last_path}")
    if not os.path.exists(last_path):  # resumed from a run whose training had ended
        save(last_path)
    signals.deferred = False
    barrier()  # every rank evaluates best.ckpt, written by rank 0
    return best_path


def progress_bar(iterable, desc: str, initial: int, total: int, enabled: bool = True):
    """The epoch's progress: a tqdm bar on a terminal, written to the real stderr so that
    the run's captured output (cout.txt) stays free of bar redraws; elsewhere (a log file,
    a pipe) a plain line every 10%."""
    if enabled and sys.__stderr__ is not None and sys.__stderr__.isatty():
        return tqdm(iterable, desc=desc, mininterval=5, initial=initial, total=total, file=sys.__stderr__)
    return PlainProgress(iterable, desc, initial, total, enabled)


class PlainProgress:
    """``for item in PlainProgress(...)`` prints "epoch 0: 30% (47/156), loss=1.234" each
    time another tenth of ``total`` is done (nothing when not ``enabled``)."""

    def __init__(self, iterable, desc: str, initial: int, total: int, enabled: bool = True):
        self.iterable, self.desc, self.done, self.total, self.enabled = iterable, desc, initial, total, enabled
        self.postfix = ""

    def __iter__(self):
        for item in self.iterable:
            yield item
            before, self.done = self.done, self.done + 1
            if self.enabled and self.done * 10 // max(self.total, 1) > before * 10 // max(self.total, 1):
                print(f"{self.desc}: {100 * self.done // max(self.total, 1)}% ({self.done}/{self.total})"
                      f"{', ' + self.postfix if self.postfix else ''}", flush=True)

    def set_postfix(self, refresh=False, **values) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        pass


def rng_state() -> dict:
    """Every random generator the training touches, as checkpoint-safe values."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
