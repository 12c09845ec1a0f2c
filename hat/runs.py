"""Browse the runs an observer directory holds (Sacred's FileStorageObserver folders).

    python -m hat.runs                      # the runs in ./runs: one line each
    python -m hat.runs --dir /exp/runs
    python -m hat.runs compare 3 7          # the configuration keys that differ, metrics side by side
    python -m hat.runs curves 3             # runs/3/curves.png: losses, learning rate, val recalls

A run folder holds run.json (status, times, result, named configs), config.json,
metrics.json (per-epoch scalars) and info.json (the checkpoint); whatever is missing
shows as "-".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime

COLUMNS = ("id", "status", "model", "dataset", "named", "started", "duration", "best val", "test rsum",
           "checkpoint")


def _read(path: str) -> dict:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _time(value: str | None):
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None


def run_summary(folder: str) -> dict:
    """One run's line: id, status, model, dataset, named configs, start time, duration,
    best validation score (the highest sum of the select_metric values over the epochs),
    test rSum and checkpoint."""
    record, config = _read(os.path.join(folder, "run.json")), _read(os.path.join(folder, "config.json"))
    metrics, info = _read(os.path.join(folder, "metrics.json")), _read(os.path.join(folder, "info.json"))
    start, stop = _time(record.get("start_time")), _time(record.get("stop_time") or record.get("heartbeat"))
    selected = config.get("select_metric") or ["rsum"]
    epochs = [metrics.get(f"val.{key}", {}).get("values", []) for key in selected]
    best = max(map(sum, zip(*epochs)), default=None) if all(epochs) else None
    result = record.get("result") if isinstance(record.get("result"), dict) else {}
    checkpoint = info.get("checkpoint")
    return {
        "id": os.path.basename(os.path.normpath(folder)),
        "status": record.get("status", "-"),
        "model": config.get("model", "-"),
        "dataset": config.get("dataset", "-"),
        "named": ",".join((record.get("meta") or {}).get("named_configs") or []) or "-",
        "started": start.strftime("%Y-%m-%d %H:%M") if start else "-",
        "duration": str(stop - start).split(".")[0] if start and stop else "-",
        "best val": f"{best:.2f}" if best is not None else "-",
        "test rsum": f"{result['rsum']:.2f}" if "rsum" in result else "-",
        "checkpoint": checkpoint if isinstance(checkpoint, str) else (", ".join(checkpoint) if checkpoint else "-"),
    }


def run_folders(observer_dir: str) -> list[str]:
    """The run folders of ``observer_dir``, in id order."""
    if not os.path.isdir(observer_dir):
        raise FileNotFoundError(f"--dir {observer_dir} does not exist; pass the observer_dir of your runs")
    names = [name for name in os.listdir(observer_dir) if name.isdigit()
             and os.path.isfile(os.path.join(observer_dir, name, "run.json"))]
    return [os.path.join(observer_dir, name) for name in sorted(names, key=int)]


def table(rows: list[dict], columns=COLUMNS) -> str:
    widths = {c: max([len(c)] + [len(str(row[c])) for row in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
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
    result_a = _read(os.path.join(folder_a, "run.json")).get("result") or {}
    result_b = _read(os.path.join(folder_b, "run.json")).get("result") or {}
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
            print(table([run_summary(folder) for folder in run_folders(args.dir)]))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
