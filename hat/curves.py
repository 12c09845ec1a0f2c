"""How training went: the training-curve PNG of a run folder, and TensorBoard event files.

The runner logs every scalar through Sacred (``metrics.json`` of the run folder):
``train.loss`` and a model's other losses, ``train.lr`` and ``val.*`` per epoch,
``train.step_*`` every ``log_every_steps`` optimizer steps, ``test.*`` once. `plot_curves`
draws them (matplotlib, no display needed): the run writes ``curves.png`` at the end of
training, and ``python -m hat.runs curves RUN_FOLDER`` draws it for any run folder.
`ScalarLog` keeps the scalars for that and mirrors them into TensorBoard
(``tensorboard=True``) under the same names with "/" for "." (``train/loss``,
``val/rsum``), through torch's SummaryWriter.
"""
from __future__ import annotations

import json
import os

from datamodules.atomic import atomic_file

FIGURE_INCHES = (12, 8)
DPI = 100  # curves.png is 1200 x 800 pixels
RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
NOT_LOSSES = ("train.lr", "train.amp_skipped_steps")


def read_metrics(run_folder: str) -> dict:
    """{name: (steps, values)} from a run folder's metrics.json (Sacred's layout)."""
    path = os.path.join(run_folder, "metrics.json")
    try:
        with open(path) as handle:
            raw = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: {run_folder} is not a run folder with metrics "
                                f"(a run that trained at least one epoch)") from None
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the run's metrics are unreadable") from None
    return {name: (series["steps"], series["values"]) for name, series in raw.items()}


def plot_curves(metrics: dict, path: str, title: str = "") -> str:
    """Draw the per-epoch training losses, the per-step loss (when logged), the learning
    rate and the validation recalls of ``metrics`` ({name: (steps, values)}) into a PNG of
    FIGURE_INCHES x DPI pixels at ``path`` (written atomically) -> path."""
    figure = curves_figure(metrics, title)
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=DPI)
    return path


def has_training_metrics(metrics: dict) -> bool:
    """Whether ``metrics`` hold anything of training (train.* or val.*; a test_only run
    logs test.* only)."""
    return any(name.startswith(("train.", "val.")) for name in metrics)


def curves_figure(metrics: dict, title: str = ""):
    """The matplotlib Figure `plot_curves` saves (four panels; integer ticks on the epoch
    and step axes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)
    (losses, steps), (rates, recalls) = figure.subplots(2, 2)

    epoch_losses = {name: series for name, series in metrics.items()
                    if name.startswith("train.") and not name.startswith("train.step_") and name not in NOT_LOSSES}
    _lines(losses, epoch_losses, "training loss per epoch", "epoch", "train.")
    step_losses = {name: series for name, series in metrics.items() if name.startswith("train.step_")}
    _lines(steps, step_losses, "training loss per logged step", "optimizer step", "train.step_",
           empty="not logged (log_every_steps=0)")
    _lines(rates, {k: v for k, v in metrics.items() if k == "train.lr"}, "learning rate", "epoch", "train.")
    if "train.lr" in metrics and all(value > 0 for value in metrics["train.lr"][1]):
        rates.set_yscale("log")
    _lines(recalls, {f"val.{key}": metrics[f"val.{key}"] for key in RECALLS if f"val.{key}" in metrics},
           "validation recall (%)", "epoch", "val.")
    if "val.rsum" in metrics:
        rsum = recalls.twinx()
        rsum.plot(*metrics["val.rsum"], color="black", linestyle="--", marker="o", label="rsum")
        rsum.set_ylabel("rsum")
        rsum.legend(loc="lower right", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def _lines(axes, series: dict, title: str, xlabel: str, prefix: str, empty: str = "nothing logged") -> None:
    from matplotlib.ticker import MaxNLocator

    axes.set_title(title, fontsize=11)
    axes.set_xlabel(xlabel)
    # integer ticks however short the run: one epoch spans less than one unit, and with
    # fewer than min_n_ticks integers in view MaxNLocator falls back to fractions
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if not series:
        axes.text(0.5, 0.5, empty, ha="center", va="center", transform=axes.transAxes, color="grey")
        return
    for name, (steps, values) in series.items():
        axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                  label=name[len(prefix):])
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)


def curves_title(model, dataset, run_id) -> str:
    """The figure's title: "<model> <dataset> run <id>" (parts that are unknown left out)."""
    return " ".join(str(part) for part in (model, dataset, f"run {run_id}" if run_id is not None else None)
                    if part)


def curves_of_run(run_folder: str, path: str | None = None) -> str:
    """curves.png of a run folder (``path``: elsewhere) from its metrics.json -> the path.
    ValueError (one line) when it holds no training metrics (a test_only run)."""
    metrics = read_metrics(run_folder)
    if not has_training_metrics(metrics):
        raise ValueError(f"run {os.path.basename(os.path.abspath(run_folder))} has no training metrics "
                         f"(a test_only run?): nothing to draw")
    config = {}
    try:
        with open(os.path.join(run_folder, "config.json")) as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        pass
    title = curves_title(config.get("model"), config.get("dataset"), os.path.basename(os.path.abspath(run_folder)))
    return plot_curves(metrics, path or os.path.join(run_folder, "curves.png"), title)


def tensorboard_folder(setting, run_folder: str | None, run_name: str) -> str | None:
    """Where tensorboard=``setting`` writes: True -> <run folder>/tensorboard (the run must
    be recorded somewhere), a directory -> <directory>/<run_name>; False/None -> None."""
    if not setting:
        return None
    if setting is True:
        if run_folder is None:
            raise ValueError("tensorboard=True writes into the run's folder, and this run has none "
                             "(observer_dir=None): pass tensorboard=DIR")
        return os.path.join(run_folder, "tensorboard")
    return os.path.join(str(setting), run_name)


class ScalarLog:
    """``log(name, value, step)`` into the Sacred run and, when ``folder`` is given, into
    TensorBoard event files there (``name`` with "/" for "."). ``close()`` flushes them."""

    def __init__(self, log_scalar, folder: str | None = None):
        self.log_scalar, self.writer = log_scalar, None
        self.series = {}  # {name: (steps, values)}: what `plot_curves` draws
        if folder:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=folder)

    def __call__(self, name: str, value, step: int) -> None:
        self.log_scalar(name, value, step)
        steps, values = self.series.setdefault(name, ([], []))
        steps.append(step)
        values.append(float(value))
        if self.writer is not None:  # flushed at once: a run that fails or is stopped keeps its events
            self.writer.add_scalar(name.replace(".", "/"), float(value), step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
