"""python -m hat.runs on run folders written here (no training): malformed files of a run
folder, and RUNNING runs whose process died (an old heartbeat)."""
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

from hat.runs import main, run_summary
from tests.conftest import ROOT

START = "2024-05-01T10:00:00.123456"
GOOD = {"status": "COMPLETED", "start_time": START, "stop_time": "2024-05-01T10:10:00.5",
        "heartbeat": "2024-05-01T10:09:55", "meta": {"named_configs": ["demo"]}, "result": {"rsum": 123.456}}


def utc_now():
    return datetime.now(timezone.utc).replace(tzinfo=None)  # as Sacred writes times: naive UTC


def write_run(runs, run_id, run=GOOD, config=None, metrics=None, info=None):
    """A run folder as Sacred's FileStorageObserver writes it; a str is written as the file's text."""
    folder = runs / str(run_id)
    folder.mkdir(parents=True)
    files = {"run.json": run, "config.json": config if config is not None else {"model": "hat", "dataset": "demo"},
             "metrics.json": metrics if metrics is not None else {"val.rsum": {"steps": [0, 1], "values": [50, 70.5]}},
             "info.json": info if info is not None else {"checkpoint": str(folder / "best.ckpt")}}
    for name, content in files.items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    (folder / "best.ckpt").touch()  # what a completed run's info.json names
    return folder


def listed(capsys, runs):
    code = main(["--dir", str(runs)])
    out, err = capsys.readouterr()
    return code, {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}, err


def test_malformed_runs_are_listed_as_unreadable_and_the_listing_goes_on(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs, 1)
    malformed = {
        2: {"run": []}, 3: {"run": '"x"'}, 4: {"run": "null"}, 5: {"run": '{"status": "COMPLETED", "start'},
        6: {"run": dict(GOOD, start_time=5)}, 7: {"run": dict(GOOD, meta="demo")},
        8: {"run": dict(GOOD, meta={"named_configs": [1]})}, 9: {"run": dict(GOOD, status=["COMPLETED"])},
        10: {"config": []}, 11: {"config": {"model": "hat", "select_metric": 3}},
        12: {"metrics": {"val.rsum": [50, 70]}}, 13: {"metrics": {"val.rsum": {"steps": [0], "values": ["x"]}}},
        14: {"info": '"x"'}, 15: {"info": {"checkpoint": 7}},
    }
    for run_id, files in malformed.items():
        write_run(runs, run_id, **files)
    write_run(runs, 16, run=dict(GOOD, result={"rsum": "high"}, meta={"named_configs": "demo"}))  # readable
    write_run(runs, 17, run=dict(GOOD, result=None))  # a failed run's result

    code, rows, err = listed(capsys, runs)
    assert code == 0
    assert list(rows) == [str(i) for i in range(1, 18)]
    assert rows["1"] == ["COMPLETED", "hat", "demo", "demo", "2024-05-01", "10:00", "0:10:00", "70.50", "123.46",
                         str(runs / "1" / "best.ckpt")]
    for run_id in malformed:
        assert rows[str(run_id)] == ["unreadable"] + ["-"] * 8, run_id  # 9 columns after the id
    assert rows["16"][:4] == ["COMPLETED", "hat", "demo", "demo"] and rows["16"][8] == "-"  # rsum not a number
    assert rows["17"][8] == "-"
    notes = err.splitlines()
    assert len(notes) == len(malformed)
    fix = "; repair the file or move its run folder out of the observer directory"
    assert notes[0] == f"note: run 2 is unreadable: {runs / '2' / 'run.json'} holds [], not a JSON object{fix}"
    assert notes[4] == (f'note: run 6 is unreadable: {runs / "6" / "run.json"} has "start_time": 5, not an ISO '
                        f"time string{fix}")
    expected_files = {5: "run.json", 7: "run.json", 10: "config.json", 11: "config.json", 12: "metrics.json",
                      13: "metrics.json", 14: "info.json", 15: "info.json"}
    for run_id, name in expected_files.items():
        note = notes[list(malformed).index(run_id)]
        assert note.startswith(f"note: run {run_id} is unreadable: {runs / str(run_id) / name} ") and note.endswith(fix)


def test_compare_and_curves_of_a_malformed_run_are_one_line_errors(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_run(runs, 1)
    write_run(runs, 2, run=[])
    write_run(runs, 3, config='"x"')
    write_run(runs, 4, run=dict(GOOD, result=7))  # a result that is not an object: no metrics
    write_run(runs, 5, metrics={"train.loss": [1, 2]})
    write_run(runs, 6, config=[])
    fix = "; repair the file or move its run folder out of the observer directory"
    for args, message in (
            (["compare", "1", "2"], f"{runs / '2' / 'run.json'} holds [], not a JSON object{fix}"),
            (["compare", "3", "1"], f'{runs / "3" / "config.json"} holds "x", not a JSON object{fix}'),
            (["curves", "5"], f'{runs / "5" / "metrics.json"} has "train.loss": [1, 2], not {{"steps": [numbers], '
                              f'"values": [numbers]}} of one length{fix}'),
            (["curves", "6"], f"{runs / '6' / 'config.json'} holds [], not a JSON object{fix}")):
        assert main(["--dir", str(runs), *args]) == 2, args
        out, err = capsys.readouterr()
        assert err.splitlines() == [f"error: {message}"] and out == ""
    assert main(["--dir", str(runs), "compare", "1", "4"]) == 0
    metrics = capsys.readouterr().out.split("metrics:")[1]
    assert [line.split() for line in metrics.splitlines() if line.strip()][1] == ["rsum", "123.46", "-"]


def test_a_running_run_with_an_old_heartbeat_is_stale(tmp_path, capsys):
    runs, now = tmp_path / "runs", utc_now()
    old, fresh = (now - timedelta(minutes=10)).isoformat(), (now - timedelta(seconds=20)).isoformat()
    write_run(runs, 1, run=dict(GOOD, status="RUNNING", start_time=START, stop_time=None, heartbeat=old))
    write_run(runs, 2, run=dict(GOOD, status="RUNNING", start_time=START, stop_time=None, heartbeat=fresh))
    write_run(runs, 3, run=dict(GOOD, status="RUNNING", start_time=old, stop_time=None, heartbeat=None))
    write_run(runs, 4, run=dict(GOOD, status="RUNNING", start_time=fresh, stop_time=None, heartbeat=None))
    write_run(runs, 5, run=dict(GOOD, status="COMPLETED", heartbeat=old))  # finished long ago: as recorded

    code, rows, _ = listed(capsys, runs)
    assert code == 0
    assert {run_id: row[0] for run_id, row in rows.items()} == {
        "1": "STALE", "2": "RUNNING", "3": "STALE", "4": "RUNNING", "5": "COMPLETED"}
    aware = (datetime.now(timezone(timedelta(hours=9))) - timedelta(minutes=10)).isoformat()  # with an offset
    write_run(runs, 6, run=dict(GOOD, status="RUNNING", start_time=START, stop_time=None, heartbeat=aware))
    assert listed(capsys, runs)[1]["6"][0] == "STALE"
    # the listing compares with the UTC time whatever the machine's time zone (POSIX TZ strings)
    for zone in ("JST-9", "HST+10"):
        proc = subprocess.run([sys.executable, "-m", "hat.runs", "--dir", str(runs)], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, env={**os.environ, "TZ": zone})
        assert proc.returncode == 0, proc.stderr
        statuses = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()[1:]}
        assert [statuses[i] for i in "1234"] == ["STALE", "RUNNING", "STALE", "RUNNING"], zone
    # the threshold is STALE_AFTER since the last heartbeat
    from hat.runs import STALE_AFTER

    beat = datetime.fromisoformat(START) + timedelta(hours=1)
    folder = write_run(runs, 7, run=dict(GOOD, status="RUNNING", stop_time=None, heartbeat=beat.isoformat()))
    assert run_summary(str(folder), now=beat + STALE_AFTER - timedelta(seconds=1))["status"] == "RUNNING"
    stale = run_summary(str(folder), now=beat + STALE_AFTER + timedelta(seconds=1))
    assert stale["status"] == "STALE" and stale["duration"] == "1:00:00"  # start to the last heartbeat
