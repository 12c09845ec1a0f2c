"""How the runner's runs are recorded (Sacred) and how they end on a problem.

`RunRecorder` is the default observer of each run: a FileStorageObserver of the run's
own ``observer_dir``. It records the training and evaluation commands (main, gallery)
on the main process; nothing for ``observer_dir=None``, for other commands
(print_config, prepare_data), or when ``-F DIR`` names a folder (that observer records
the run instead).
`UsageError` / `TrainingInterrupted` are the one-line endings, and `record_end` keeps a
run's last output and its message in the record.
"""
from __future__ import annotations

from sacred.observers import FileStorageObserver
from sacred.utils import SacredError, SacredInterrupt

from hat.distributed import is_main_process

RECORDED_COMMANDS = ("main", "gallery")


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


class RunRecorder(FileStorageObserver):
    """A FileStorageObserver under one run's ``observer_dir``, added to the experiment by
    the configuration hook for that run (`install`); it stands back when ``-F DIR`` names
    another folder, and ignores every event of a run it does not record."""

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        if (meta_info.get("options") or {}).get("--file_storage"):
            self.dir = self.run_entry = None
            return _id
        return super().started_event(ex_info, command, host_info, start_time, config, meta_info, _id)

    @classmethod
    def install(cls, experiment, command: str, config: dict) -> None:
        """Replace ``experiment``'s recorder of the previous run by one for this run: the
        training and evaluation commands, on the main process, unless observer_dir=None."""
        experiment.observers[:] = [o for o in experiment.observers if not isinstance(o, cls)]
        if command in RECORDED_COMMANDS and config.get("observer_dir") and is_main_process():
            experiment.observers.append(cls(config["observer_dir"]))


def _when_recording(event: str):
    """FileStorageObserver's ``event``, for the runs the recorder records only."""
    def handler(self, *args, **kwargs):
        if self.dir is not None:
            return getattr(FileStorageObserver, event)(self, *args, **kwargs)
        return None

    handler.__name__ = event
    return handler


for _event in ("heartbeat_event", "completed_event", "interrupted_event", "failed_event", "resource_event",
               "artifact_event", "log_metrics"):
    setattr(RunRecorder, _event, _when_recording(_event))


def observer_folder(_run) -> str | None:
    """The run's FileStorageObserver folder (None when the run is not recorded)."""
    for observer in _run.observers:
        if isinstance(observer, FileStorageObserver) and observer.dir:
            return observer.dir
    return None


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
