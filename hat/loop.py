"""The training loop, one for every model (a `hat.plugins.ModelPlugin` says what is
model-specific).

`fit` runs epochs of optimizer steps with validation after each, and owns everything
around the model's loss: mixed precision (fp16 + GradScaler, bf16, fp32), micro-batch
accumulation with DDP ``no_sync``, gradient clipping, optimizer and scheduler steps (per
step or per epoch, as the plug-in says), the non-finite-loss stop, ``last.ckpt`` /
``best.ckpt`` with everything an exact resume needs, and stop signals. One optimizer step
is `optimizer_step`.

`fit` is a thin driver over `_Fit`, which holds the run's parts (plug-in, model,
optimizer, scheduler, GradScaler) and its `TrainingState` (epoch, step, the epoch's loss
sums, skipped steps, best score: what every checkpoint records), in named steps:
`_Fit.resume`, `_Fit.train_epoch` (a `_Fit.train_step` per batch), `_Fit.validate_epoch`
(the validation, its scalars and the epoch line), `_Fit.end_epoch` and `_Fit.save` (with
`_Fit.last_good`, the checkpoint to resume from when the training diverged).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import shutil
import signal
import sys
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from tqdm import tqdm

from datamodules.sampler import rank_shares
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
                   scheduler=None, exact=None) -> tuple[dict, bool]:
    """One optimizer step on this process's batch, cut into micro-batches of
    ``micro_batch_size`` (the last may be smaller). Returns ({loss name: batch mean},
    skipped): ``skipped`` is True when the fp16 GradScaler dropped the step (inf/NaN
    gradients).

    Split accumulation (``exact`` None): ``compute_loss(network, micro_batch)`` gives the
    losses of a micro-batch (tensors on ``device``); each ``["loss"]`` is scaled by the
    micro-batch's share of the batch, so the gradient is the batch mean's for a loss that
    is a mean over samples. Exact accumulation (``exact``: ``(encode, loss_from_features)``,
    see `exact_gradients`): one loss over the whole batch, as if it were one micro-batch; a
    batch of one micro-batch runs the split code (the same numbers, bit for bit). Under DDP
    (``network.no_sync``) the gradients are reduced once, on the last micro-batch. The
    gradient norm of ``parameters`` is clipped to ``clip_norm`` (None: not clipped);
    ``scheduler`` (a per-step schedule) steps after the optimizer. A non-finite loss
    outside fp16 raises `NonFiniteLoss` before the optimizer steps."""
    size = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    autocast = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    optimizer.zero_grad(set_to_none=True)
    if exact is not None and size > micro_batch_size:
        values = exact_gradients(network, *exact, batch, device, micro_batch_size, autocast, scaler)
    else:
        values = split_gradients(network, compute_loss, batch, device, micro_batch_size, autocast, scaler)
    return values, _apply_gradients(optimizer, values, scaler, clip_norm, parameters, scheduler)


def _micro_batches(batch: dict, device, micro_batch_size: int):
    """(micro-batch on ``device``, its share of the batch, whether it is the last) in order."""
    size = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    for start in range(0, size, micro_batch_size):
        micro = {key: value[start:start + micro_batch_size].to(device, non_blocking=True)
                 if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        yield micro, min(micro_batch_size, size - start) / size, start + micro_batch_size >= size


def _sync(network, last: bool):
    """DDP reduces the gradients on the last micro-batch only (``no_sync`` before it)."""
    return contextlib.nullcontext() if last or not hasattr(network, "no_sync") else network.no_sync()


def split_gradients(network, compute_loss, batch: dict, device, micro_batch_size: int, autocast,
                    scaler=None) -> dict:
    """Split accumulation: each micro-batch's own loss, weighted by its share, backpropagated
    in turn. Returns {loss name: batch mean} (the step's one host sync)."""
    names, totals = None, None  # accumulated without host syncs
    for micro, share, last in _micro_batches(batch, device, micro_batch_size):
        with _sync(network, last):
            with autocast:
                losses = compute_loss(network, micro)
            loss = losses["loss"] * share
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if names is None:
            names = list(losses)
            totals = torch.zeros(len(names), device=device)
        totals += torch.stack([losses[name].detach().float() for name in names]) * share
    return dict(zip(names, totals.tolist()))


def exact_gradients(network, encode, loss_from_features, batch: dict, device, micro_batch_size: int,
                    autocast, scaler=None) -> dict:
    """Exact accumulation (open_clip's, GradCache's): the gradient of the whole batch's loss
    (every micro-batch's negatives; every process's, where the plug-in gathers them) with
    the memory of one micro-batch's graph. (1) ``encode(network, micro, None)`` runs
    without a graph, keeping each micro-batch's features (nested dicts/lists of tensors)
    and the RNG state it ran with; (2) ``loss_from_features(features, micros)`` over all of
    them is backpropagated to those features alone; (3) each micro-batch is encoded again,
    ``encode(network, micro, first)`` with ``first`` its features of (1), with a graph under
    its saved RNG state (dropout and drop-path masks replay identically; the plug-in may
    reuse from ``first`` what needs no gradient, such as a frozen encoder's output), and
    its features' cached gradients flow into the encoders (features the loss did not use,
    and replayed ones that need no gradient, are left out). Under DDP every pass runs in
    ``no_sync`` and the gradients are averaged over the processes once at the end
    (`average_gradients`): the loss uses parameters outside DDP's forward (Multi-SEA's ITM
    fusion), which DDP's own reduction would miss. The generators end where the first pass
    and the loss left them. Returns {loss name: value} (one host sync)."""
    with _no_sync(network):
        micros, states, features = [], [], []
        with torch.no_grad():
            for micro, _, _ in _micro_batches(batch, device, micro_batch_size):
                micros.append(micro)
                states.append(_rng_of(device))
                with autocast:
                    features.append(encode(network, micro, None))
        cached = [_float_leaves(tree, lambda t: t.detach().requires_grad_(True)) for tree in features]
        with autocast:
            losses = loss_from_features([tree for tree, _ in cached], micros)
        (scaler.scale(losses["loss"]) if scaler is not None else losses["loss"]).backward()
        after = _rng_of(device)
        for micro, state, first, (_, leaves) in zip(micros, states, features, cached):
            _set_rng_of(device, state)
            with autocast:
                _, replayed = _float_leaves(encode(network, micro, first))
            pairs = [(out, leaf.grad) for out, leaf in zip(replayed, leaves)
                     if out.requires_grad and leaf.grad is not None]
            if pairs:
                torch.autograd.backward(*zip(*pairs))
        _set_rng_of(device, after)
    if hasattr(network, "no_sync"):
        average_gradients(network.parameters())
    names = list(losses)
    return dict(zip(names, torch.stack([losses[name].detach().float() for name in names]).tolist()))


def _no_sync(network):
    return network.no_sync() if hasattr(network, "no_sync") else contextlib.nullcontext()


def average_gradients(parameters, bucket_bytes: int = 25 * 2 ** 20) -> None:
    """Average the gradients of ``parameters`` over the processes (what DDP's reduction
    does), in flat buckets of about ``bucket_bytes`` per dtype. Every process must hold
    gradients for the same parameters (the same code ran on each)."""
    import torch.distributed as dist

    world_size = dist.get_world_size()

    def reduce(grads):
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat)
        flat.div_(world_size)
        for grad, part in zip(grads, flat.split([grad.numel() for grad in grads])):
            grad.copy_(part.view_as(grad))

    pending = {}  # dtype -> (gradients, their bytes)
    for param in parameters:
        if param.grad is None:
            continue
        grads, size = pending.get(param.grad.dtype, ([], 0))
        grads.append(param.grad)
        size += param.grad.numel() * param.grad.element_size()
        if size >= bucket_bytes:
            reduce(grads)
            grads, size = [], 0
        pending[param.grad.dtype] = (grads, size)
    for grads, _ in pending.values():
        if grads:
            reduce(grads)


def _float_leaves(tree, convert=None):
    """(``tree`` with each floating-point tensor replaced by ``convert(tensor)``, those
    tensors in a fixed order): ``tree`` is nested dicts, lists and tuples of tensors."""
    found = []

    def walk(node):
        if isinstance(node, torch.Tensor) and node.is_floating_point():
            node = convert(node) if convert is not None else node
            found.append(node)
        elif isinstance(node, dict):
            node = {key: walk(value) for key, value in node.items()}
        elif isinstance(node, (list, tuple)):
            node = type(node)(walk(value) for value in node)
        return node

    return walk(tree), found


def _rng_of(device) -> tuple:
    """The generators a forward on ``device`` draws from: the CPU's, and the device's on CUDA."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_of(device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _apply_gradients(optimizer, values: dict, scaler, clip_norm, parameters, scheduler) -> bool:
    """Clip, step the optimizer (and a per-step ``scheduler``) and clear the gradients;
    True when the fp16 GradScaler skipped the step. A non-finite loss outside fp16 raises
    `NonFiniteLoss` first."""
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
    return skipped


@dataclass
class LoopSettings:
    """The loop's knobs, read from the run's configuration by the caller."""

    max_epoch: int
    micro_batch_size: int  # per process (per_gpu_batchsize)
    accumulation: str = "split"  # split | exact (the plug-in's encode_batch + loss_from_features)
    precision: str = "fp32"  # fp16 | bf16 | fp32
    clip_norm: float | None = None
    select_metric: tuple = ("rsum",)
    checkpoint_every_steps: int = 0
    log_every_steps: int = 0
    progress: bool = True


@dataclass
class TrainingState:
    """Where the training stands: every field but ``epoch`` (save_checkpoint's own
    argument) goes into each checkpoint under its name, and a resume reads them back (a
    key an older checkpoint lacks keeps its default)."""

    epoch: int = 0
    step: int = 0  # optimizer steps done in this epoch
    loss_sum: float = 0.0  # of the epoch's steps
    loss_sums: dict = field(default_factory=dict)  # the plug-in's other losses, summed over the epoch's steps
    skipped: int = 0  # this epoch's steps the fp16 GradScaler dropped
    best_score: float | None = None  # the best validation score so far (the select_metric sum)

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "TrainingState":
        default = cls()
        return cls(**{item.name: saved.get(item.name, getattr(default, item.name)) for item in fields(cls)
                      if item.name != "epoch"}, epoch=saved["epoch"])

    def checkpoint_fields(self) -> dict:
        """The keyword arguments save_checkpoint stores (in this order: step, loss_sum,
        loss_sums, skipped, best_score)."""
        return {item.name: getattr(self, item.name) for item in fields(self) if item.name != "epoch"}

    def add_step(self, loss: float, losses: dict, skipped: bool) -> None:
        self.step += 1
        self.loss_sum += loss
        for key, value in losses.items():
            self.loss_sums[key] = self.loss_sums.get(key, 0.0) + value
        self.skipped += int(skipped)

    def next_epoch(self) -> None:
        """The epoch is over: its sums start again (the best score stays)."""
        self.epoch, self.step, self.loss_sum, self.loss_sums, self.skipped = self.epoch + 1, 0, 0.0, {}, 0


def fit(plugin, model, train_data, loader, device, settings: LoopSettings, out_dir: str, signals: StopSignals,
        validate, log, info: dict, config: dict, resume_path: str | None = None) -> str:
    """Train with validation after every epoch; returns the path of the best checkpoint.

    ``loader`` yields this process's share of each global batch (one optimizer step);
    ``validate()`` returns the validation metrics; ``log(name, value, step)`` records a
    scalar; ``info`` receives what the run should record (``resumed_from``);
    ``config`` is stored in every checkpoint. ``last.ckpt`` is written every
    ``checkpoint_every_steps`` steps and after every epoch, ``best.ckpt`` whenever the sum
    of the ``select_metric`` validation metrics improves."""
    run = _Fit(plugin, model, train_data, loader, device, settings, out_dir, signals, validate, log, config)
    if resume_path:
        run.resume(resume_path, info)
    print(f"training on {len(train_data)} {plugin.training_unit} of {len(train_data.split)} images, "
          f"device {device}, checkpoints in {out_dir}", flush=True)
    signals.deferred = True
    while run.state.epoch < settings.max_epoch:
        lr, last_lr = run.train_epoch()
        metrics, score, improved = run.validate_epoch(lr, last_lr)
        run.end_epoch(metrics, score, improved)
    if not os.path.exists(run.last_path):  # resumed from a run whose training had ended
        run.save(run.last_path)
    signals.deferred = False
    barrier()  # every rank evaluates best.ckpt, written by rank 0
    return run.best_path


class _Fit:
    """One `fit`: the run's parts (plug-in, model, optimizer, scheduler, GradScaler), its
    `TrainingState`, and which checkpoints hold the weights after how many steps."""

    def __init__(self, plugin, model, train_data, loader, device, settings: LoopSettings, out_dir: str,
                 signals: StopSignals, validate, log, config: dict):
        self.plugin, self.model, self.loader, self.device, self.settings = plugin, model, loader, device, settings
        self.signals, self.validate, self.log, self.config = signals, validate, log, config
        self.world_size = world()[1]
        self.steps_per_epoch = len(train_data) // loader.batch_sampler.batch_size
        self.optimizer = plugin.optimizer(model)
        self.scheduler, self.schedule_unit = plugin.scheduler(self.optimizer, self.steps_per_epoch)
        self.amp_dtype = amp_dtype_of(settings.precision)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.best_path, self.last_path = os.path.join(out_dir, "best.ckpt"), os.path.join(out_dir, "last.ckpt")
        self.state = TrainingState()
        self.taken = 0  # optimizer steps this process has run
        # checkpoint path -> optimizer steps taken when it was written: it holds the weights
        # after that many steps, which a later finite loss has shown to be good
        self.written = {}
        self.network, self.trainable = model, None  # DDP's wrapper, and the parameters it syncs
        # every process's features; a global batch that does not divide by the processes
        # (exact accumulation only) gives them unequal shares, which the gather is told
        shares = rank_shares(loader.batch_sampler.batch_size, self.world_size)
        self.gather = (None if self.world_size == 1 else gather_padded if len(set(shares)) == 1
                       else functools.partial(gather_padded, sizes=shares))

    def resume(self, path: str, info: dict) -> None:
        """Load everything an exact resume needs from checkpoint ``path``, and carry the
        previous run's best.ckpt over into this run's folder."""
        saved = load_training_state(path, self.model, self.optimizer, self.scheduler, self.plugin.name)
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.state = TrainingState.from_checkpoint(saved)
        set_rng_state(saved["rng"])
        self.written[path] = 0
        previous_best = os.path.join(os.path.dirname(path), "best.ckpt")
        if is_main_process() and os.path.isfile(previous_best) and not os.path.exists(self.best_path):
            shutil.copyfile(previous_best, self.best_path + ".tmp")
            os.replace(self.best_path + ".tmp", self.best_path)
        self.written.setdefault(self.best_path, -1)  # older than the resumed weights
        info["resumed_from"] = {"checkpoint": os.path.abspath(path), "epoch": self.state.epoch,
                                "step": self.state.step}
        print(f"resuming from {path}: epoch {self.state.epoch}, step {self.state.step}", flush=True)

    def train_epoch(self) -> tuple[float, float]:
        """The epoch's optimizer steps (a resumed one's from its step on), then the per-epoch
        schedule's step. Returns the learning rates of its first and last steps. A stop
        signal ends it after the step under way, once last.ckpt is written."""
        state, model, optimizer = self.state, self.model, self.optimizer
        epoch = state.epoch
        model.train()
        self.plugin.start_epoch(model, epoch)
        names = tuple(name for name, param in model.named_parameters() if param.requires_grad)
        if self.world_size > 1 and names != self.trainable:  # DDP syncs what trains
            self.trainable = names
            self.network = torch.nn.parallel.DistributedDataParallel(model)
        self.loader.batch_sampler.set_epoch(epoch, state.step)
        lr = optimizer.param_groups[0]["lr"]
        last_lr = lr  # the epoch line's: the learning rate of the epoch's last step
        bar = progress_bar(self.loader, f"epoch {epoch}", state.step, state.step + len(self.loader),
                           self.settings.progress)
        for batch in bar:
            last_lr = optimizer.param_groups[0]["lr"]
            self.train_step(batch)
            bar.set_postfix(loss=f"{state.loss_sum / state.step:.3f}", refresh=False)
            every = self.settings.checkpoint_every_steps
            if self.signals.received or (every and state.step % every == 0):
                self.save(self.last_path)
            if self.signals.received:
                raise StopRequested(f"{self.signals.received} at epoch {epoch}, step {state.step}; "
                                    f"resume with resume_from={self.last_path}")
        bar.close()
        if self.schedule_unit == "epoch":
            self.scheduler.step()
        return lr, last_lr

    def train_step(self, batch: dict) -> None:
        """One optimizer step, added to the state (and logged every log_every_steps)."""
        state, model, settings, epoch, plugin = self.state, self.model, self.settings, self.state.epoch, self.plugin
        exact = None
        if settings.accumulation == "exact":
            exact = (lambda net, micro, first: plugin.encode_batch(net, model, micro, first),
                     lambda features, micros: plugin.loss_from_features(model, features, micros, epoch, self.gather))
        try:
            losses, skipped = optimizer_step(
                self.network, lambda net, micro: plugin.loss(net, model, micro, epoch, self.gather), batch,
                self.optimizer, self.device, settings.micro_batch_size, self.amp_dtype, self.scaler,
                settings.clip_norm, model.parameters(), self.scheduler if self.schedule_unit == "step" else None,
                exact)
        except NonFiniteLoss as error:
            raise TrainingFailed(f"non-finite loss ({error}) at epoch {epoch}, step {state.step}; "
                                 f"nothing was written; {self.last_good()}; lower learning_rate") from None
        loss = losses.pop("loss")
        self.taken += 1
        state.add_step(loss, losses, skipped)
        if settings.log_every_steps and state.step % settings.log_every_steps == 0:
            for key, value in {"loss": loss, **losses}.items():
                self.log(f"train.step_{key}", value, epoch * self.steps_per_epoch + state.step)

    def validate_epoch(self, lr: float, last_lr: float) -> tuple[dict, float, bool]:
        """Validate after the epoch's steps, log the epoch's scalars and print the epoch
        line; returns (metrics, score, whether the score is the best so far)."""
        state, log, epoch = self.state, self.log, self.state.epoch
        loss = state.loss_sum / max(state.step, 1)
        print(f"epoch {epoch}: validating", flush=True)
        try:
            metrics = self.validate()
        except NonFiniteScores as error:
            raise TrainingFailed(f"val split at epoch {epoch}, the model being trained: {error}; the "
                                 f"training diverged ({self.last_good()}): lower learning_rate") from None
        score = sum(metrics[key] for key in self.settings.select_metric)
        log("train.loss", loss, epoch)
        for key, total in state.loss_sums.items():  # the plug-in's other losses
            log(f"train.{key}", total / max(state.step, 1), epoch)
        log("train.lr", lr, epoch)
        if self.scaler is not None:
            log("train.amp_skipped_steps", state.skipped, epoch)
        for key, value in metrics.items():
            log(f"val.{key}", value, epoch)
        improved = state.best_score is None or score > state.best_score
        # the learning rates the epoch's steps used: first..last under a per-step schedule
        lrs = f"{lr:.2e}" if f"{lr:.2e}" == f"{last_lr:.2e}" else f"{lr:.2e}..{last_lr:.2e}"
        print(f"epoch {epoch}: loss {loss:.4f} lr {lrs} val i2t R@1 {metrics['i2t_r1']:.2f} "
              f"t2i R@1 {metrics['t2i_r1']:.2f} rsum {metrics['rsum']:.2f}"
              f"{' (best)' if improved else ''}", flush=True)
        return metrics, score, improved

    def end_epoch(self, metrics: dict, score: float, improved: bool) -> None:
        """Move the state on to the next epoch and write best.ckpt (when ``improved``) and
        last.ckpt; a stop signal that came during validation stops the run here."""
        epoch = self.state.epoch
        self.state.next_epoch()
        if improved:
            self.state.best_score = score
            self.save(self.best_path, metrics)
        self.save(self.last_path, metrics, same_as=self.best_path if improved else None)
        if self.signals.received:  # it came during validation
            raise StopRequested(f"{self.signals.received} at the end of epoch {epoch}; resume with "
                                f"resume_from={self.last_path}")

    def save(self, path: str, metrics: dict | None = None, same_as: str | None = None) -> None:
        """Write checkpoint ``path``; ``same_as``: a checkpoint of this very state, written
        just before, that ``path`` becomes a second name of (one file on disk)."""
        bad = non_finite_parameters(self.model)
        if bad:  # the update diverged although the loss was still finite: keep what is on disk
            raise TrainingFailed(f"the weights became NaN/infinite ({len(bad)} parameter(s), first: {bad[0]}) "
                                 f"by epoch {self.state.epoch}, step {self.state.step}; nothing was written; "
                                 f"{self.last_good()}; lower learning_rate")
        if is_main_process() and not (same_as and link_checkpoint(same_as, path)):  # rank 0 writes them
            save_checkpoint(path, self.model, self.optimizer, self.scheduler, self.state.epoch, self.config,
                            metrics, **self.state.checkpoint_fields(),
                            scaler=self.scaler.state_dict() if self.scaler is not None else None, rng=rng_state())
        self.written[path] = self.taken

    def last_good(self) -> str:
        """The newest checkpoint whose weights a later step found finite (a checkpoint
        written after the last step holds the weights that diverged), or none."""
        good = [(steps, path == self.last_path, path) for path, steps in self.written.items()
                if steps < self.taken and os.path.exists(path)]
        poisoned = [path for path, steps in self.written.items() if steps == self.taken and os.path.exists(path)]
        warning = f" ({', '.join(poisoned)} holds the diverged weights: do not resume from it)" if poisoned else ""
        if not good:
            return f"no good checkpoint: none was written before the step that diverged{warning}"
        return f"last good checkpoint: {max(good)[2]}, resume_from it{warning}"


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
