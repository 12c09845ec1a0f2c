"""Browse the runs an observer directory holds (Sacred's FileStorageObserver folders).

    python -m hat.runs                      # the runs in ./runs: one line each
    python -m hat.runs --dir /exp/runs
    python -m hat.runs compare 3 7          # the configuration keys that differ, metrics side by side
    python -m hat.runs curves 3             # runs/3/curves.png: losses, learning rate, val recalls

A run folder holds run.json (status, times, result, named configs), config.json,
metrics.json (per-epoch scalars) and info.json (the checkpoint); whatever is missing
shows as "-".

"best val" is the best epoch's sum of the run's select_metric validation values, named
by `metric_label` ("r1 sum": i2t_r1 + t2i_r1, HAT's default; "rsum", Multi-SEA's): in
the header when every listed run uses the same one ("best val (rsum)"), else before each
value ("r1 sum 84.20", "rsum 386.50"). "checkpoint" is the file that exists of the one
info.json names: a training run's best.ckpt, else the last.ckpt beside it (a run stopped
before its first validation has only that), else "-".

Status is Sacred's (COMPLETED, FAILED, INTERRUPTED, RUNNING, ...) with two of the
browser's own: STALE is a RUNNING run whose last heartbeat (Sacred rewrites run.json
every 10 s while the process lives; its times are UTC) is older than STALE_AFTER (5
minutes): its process most likely died without recording it (kill -9, an out-of-memory
kill, a lost machine). unreadable is a run folder with a file that is not what Sacred
writes (not JSON, not a JSON object, a field of the wrong type): its other columns show
"-", a note on stderr names the file, and the listing goes on. compare and curves of such
a run stop with a one-line error naming the file (exit status 2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timedelta, timezone

COLUMNS = ("id", "status", "model", "dataset", "named", "started", "duration", "best val", "test rsum",
           "checkpoint")
STALE_AFTER = timedelta(minutes=5)  # a RUNNING run without a heartbeat for this long shows as STALE
STALE, UNREADABLE = "STALE", "unreadable"


class RunFolderError(ValueError):
    """A file of a run folder that does not hold what Sacred writes (the message names it)."""


def _bad(path: str, what: str) -> RunFolderError:
    return RunFolderError(f"{path} {what}; repair the file or move its run folder out of the observer directory")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read(path: str) -> dict:
    """The JSON object in ``path``; {} when there is no such file. RunFolderError when it
    cannot be read, is not JSON or holds something other than an object."""
    try:
        with open(path) as handle:
            value = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise _bad(path, f"is not readable JSON ({' '.join(str(error).split())})") from None
    if not isinstance(value, dict):
        raise _bad(path, f"holds {_short(value)}, not a JSON object")
    return value


def _get(values: dict, key: str, types, what: str, path: str):
    """``values[key]``, None when absent or null; RunFolderError when it is not ``types``."""
    value = values.get(key)
    if value is not None and not isinstance(value, types):
        raise _bad(path, f'has "{key}": {_short(value)}, not {what}')
    return value


def _strings(values: dict, key: str, path: str) -> list[str]:
    """``values[key]`` as a list of strings ([] when absent or null; a str is one)."""
    value = _get(values, key, (str, list), "a string or a list of strings", path)
    if isinstance(value, list) and not all(isinstance(item, str) for item in value):
        raise _bad(path, f'has "{key}": {_short(value)}, not a list of strings')
    return [value] if isinstance(value, str) else value or []


def _time(record: dict, key: str, path: str) -> datetime | None:
    """``record[key]``, an ISO time, as a naive UTC datetime (Sacred writes
    ``datetime.utcnow().isoformat()``; one with an offset is converted); None when absent
    or not an ISO time."""
    value = _get(record, key, str, "an ISO time string", path)
    try:
        moment = datetime.fromisoformat(value) if value else None
    except ValueError:
        return None
    if moment is not None and moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def _numbers(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, (int, float)) for item in value)


def read_metrics_file(path: str) -> dict:
    """{name: values} of the metrics.json at ``path`` ({} when absent). RunFolderError unless
    every entry is Sacred's {"steps": [numbers], "values": [numbers]} of one length."""
    metrics = _read(path)
    for name, series in metrics.items():
        if not (isinstance(series, dict) and _numbers(series.get("steps")) and _numbers(series.get("values"))
                and len(series["steps"]) == len(series["values"])):
            raise _bad(path, f'has "{name}": {_short(series)}, not {{"steps": [numbers], "values": [numbers]}} '
                             f"of one length")
    return {name: series["values"] for name, series in metrics.items()}


def metric_label(selected: list[str]) -> str:
    """The name of the sum of the ``selected`` validation metrics: "rsum", "r1 sum"
    (i2t_r1 + t2i_r1), a single key as it is, else the keys joined by "+"."""
    if sorted(selected) == ["i2t_r1", "t2i_r1"]:
        return "r1 sum"
    return "+".join(selected)


def existing_checkpoint(recorded: str) -> str:
    """``recorded`` (info.json's checkpoint) when that file exists; for a best.ckpt that
    does not, the last.ckpt in its folder when that one does; else "-"."""
    if os.path.isfile(recorded):
        return recorded
    if os.path.basename(recorded) == "best.ckpt":
        last = os.path.join(os.path.dirname(recorded), "last.ckpt")
        if os.path.isfile(last):
            return last
    return "-"


def _checkpoints(recorded: list[str]) -> str:
    shown = [existing_checkpoint(path) for path in recorded]
    return ", ".join(shown) if any(path != "-" for path in shown) else "-"


def _result(record: dict) -> dict:
    """run.json's result when it is an object, else {} (a run records whatever it returned)."""
    result = record.get("result")
    return result if isinstance(result, dict) else {}


def utc_now() -> datetime:
    """The current time as Sacred records times: naive UTC."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def run_summary(folder: str, now: datetime | None = None) -> dict:
    """One run's line: id, status, model, dataset, named configs, start time, duration,
    best validation score (the highest sum of the select_metric values over the epochs;
    "metric" names that sum, see `metric_label`), test rSum and checkpoint (the file that
    exists, see `existing_checkpoint`). A RUNNING run whose last heartbeat (or start,
    before the first) is older than STALE_AFTER before ``now`` (default: `utc_now`) is STALE.
    RunFolderError when one of its files is not what Sacred writes."""
    paths = {name: os.path.join(folder, f"{name}.json") for name in ("run", "config", "metrics", "info")}
    record, config, info = _read(paths["run"]), _read(paths["config"]), _read(paths["info"])
    metrics = read_metrics_file(paths["metrics"])
    start, beat = _time(record, "start_time", paths["run"]), _time(record, "heartbeat", paths["run"])
    stop = _time(record, "stop_time", paths["run"]) or beat
    status = _get(record, "status", str, "a string", paths["run"]) or "-"
    last_sign_of_life = beat or start
    if status == "RUNNING" and last_sign_of_life and (now or utc_now()) - last_sign_of_life > STALE_AFTER:
        status = STALE
    meta = _get(record, "meta", dict, "an object", paths["run"]) or {}
    named = _strings(meta, "named_configs", paths["run"])
    selected = _strings(config, "select_metric", paths["config"]) or ["rsum"]
    epochs = [metrics.get(f"val.{key}", []) for key in selected]
    best = max(map(sum, zip(*epochs)), default=None) if all(epochs) else None
    result = _result(record)
    return {
        "id": os.path.basename(os.path.normpath(folder)),
        "status": status,
        "model": _get(config, "model", str, "a string", paths["config"]) or "-",
        "dataset": _get(config, "dataset", str, "a string", paths["config"]) or "-",
        "named": ",".join(named) or "-",
        "started": start.strftime("%Y-%m-%d %H:%M") if start else "-",
        "duration": str(stop - start).split(".")[0] if start and stop else "-",
        "best val": f"{best:.2f}" if best is not None else "-",
        "test rsum": _fmt(result.get("rsum")),
        "checkpoint": _checkpoints(_strings(info, "checkpoint", paths["info"])),
        "metric": metric_label(selected),
    }


def listing(folders: list[str], now: datetime | None = None) -> tuple[list[dict], list[str]]:
    """(rows, notes): `run_summary` of each folder; a folder it refuses is a row with status
    ``unreadable`` and "-" elsewhere, and a note saying why."""
    rows, notes = [], []
    for folder in folders:
        try:
            rows.append(run_summary(folder, now))
        except RunFolderError as error:
            run_id = os.path.basename(os.path.normpath(folder))
            rows.append({**dict.fromkeys(COLUMNS, "-"), "id": run_id, "status": UNREADABLE})
            notes.append(f"note: run {run_id} is {UNREADABLE}: {error}")
    return rows, notes


def run_folders(observer_dir: str) -> list[str]:
    """The run folders of ``observer_dir``, in id order."""
    if not os.path.isdir(observer_dir):
        raise FileNotFoundError(f"--dir {observer_dir} does not exist; pass the observer_dir of your runs")
    names = [name for name in os.listdir(observer_dir) if name.isdigit()
             and os.path.isfile(os.path.join(observer_dir, name, "run.json"))]
    return [os.path.join(observer_dir, name) for name in sorted(names, key=int)]


def listing_table(rows: list[dict]) -> str:
    """The listing's table: "best val" named by its metric (`metric_label`), in the header
    when every run with a best value uses the same one, else before each value."""
    metrics = {row["metric"] for row in rows if row["best val"] != "-"}
    if len(metrics) <= 1:
        header = f"best val ({metrics.pop()})" if metrics else "best val"
        return table(rows, headers={"best val": header})
    rows = [dict(row, **{"best val": f"{row['metric']} {row['best val']}"}) if row["best val"] != "-" else row
            for row in rows]
    return table(rows)


def table(rows: list[dict], columns=COLUMNS, headers: dict | None = None) -> str:
    """``rows`` in aligned ``columns``, headed by their names (``headers``: others for some)."""
    names = {c: (headers or {}).get(c, c) for c in columns}
    widths = {c: max([len(names[c])] + [len(str(row[c])) for row in rows]) for c in columns}
    lines = ["  ".join(names[c].ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(row[c]).ljust(widths[c]) for c in columns) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def compare(folder_a: str, folder_b: str) -> str:
    """The configuration keys whose values differ, then the result metrics side by side."""
    config_a, config_b = _read(os.path.join(folder_a, "config.json")), _read(os.path.join(folder_b, "config.json"))
    name_a, name_b = os.path.basename(folder_a), os.path.basename(folder_b)
    differing = sorted(k for k in set(config_a) | set(config_b) if config_a.get(k, "-") != config_b.get(k, "-"))
    rows = [{"key": k, name_a: json.dumps(config_a.get(k, "-")), name_b: json.dumps(config_b.get(k, "-"))}
            for k in differing]
    lines = [f"config keys that differ ({len(rows)}):", table(rows, ("key", name_a, name_b)) if rows else "  none"]
    result_a, result_b = (_result(_read(os.path.join(folder, "run.json"))) for folder in (folder_a, folder_b))
    keys = [k for k in result_a if k in result_b] + [k for k in result_b if k not in result_a] + [
        k for k in result_a if k not in result_b]
    metric_rows = [{"metric": k, name_a: _fmt(result_a.get(k)), name_b: _fmt(result_b.get(k))} for k in keys]
    lines += ["", "metrics:", table(metric_rows, ("metric", name_a, name_b)) if metric_rows else "  none"]
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hat.runs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="runs", help="the observer directory (default: runs)")
    parser.add_argument("command", nargs="?", default="list", choices=["list", "compare", "curves"])
    parser.add_argument("ids", nargs="*", help="compare: two run ids; curves: run ids or run folders")
    parser.add_argument("--out", help="curves: write the PNG here (one run) instead of <run folder>/curves.png")
    args = parser.parse_args(argv)
    try:
        if args.command == "curves":
            from hat.curves import curves_of_run

            if not args.ids or (args.out and len(args.ids) > 1):
                parser.error("curves takes run ids or run folders (--out with one of them), e.g. curves 3")
            for run in args.ids:
                folder = run if os.path.isdir(run) and not run.isdigit() else os.path.join(args.dir, run)
                _read(os.path.join(folder, "config.json"))  # what curves_of_run reads, checked first
                read_metrics_file(os.path.join(folder, "metrics.json"))
                print(curves_of_run(folder, args.out))
        elif args.command == "compare":
            if len(args.ids) != 2:
                parser.error("compare takes two run ids, e.g. compare 3 7")
            folders = [os.path.join(args.dir, run_id) for run_id in args.ids]
            missing = [f for f in folders if not os.path.isfile(os.path.join(f, "run.json"))]
            if missing:
                raise FileNotFoundError(f"{missing[0]} is not a run folder (no run.json); "
                                        f"`python -m hat.runs --dir {args.dir}` lists the runs")
            print(compare(*folders))
        else:
            rows, notes = listing(run_folders(args.dir))
            print(listing_table(rows))
            for note in notes:
                print(note, file=sys.stderr)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
