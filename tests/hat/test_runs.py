"""python -m hat.runs: the run browser over real (tiny) demo runs."""
import json
import subprocess
import sys

from tests.conftest import ROOT


def browse(*args):
    proc = subprocess.run([sys.executable, "-m", "hat.runs", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_the_list_shows_each_run_with_status_and_metrics(browse_runs):
    runs, trained, (first, second, third) = browse_runs
    lines = browse("--dir", str(runs)).splitlines()
    assert lines[0].split()[:4] == ["id", "status", "model", "dataset"]
    rows = [line.split() for line in lines[1:]]
    assert [(row[0], row[1], row[2], row[3], row[4]) for row in rows] == [
        (first, "COMPLETED", "hat", "demo", "demo"), (second, "COMPLETED", "hat", "demo", "demo"),
        (third, "FAILED", "hat", "demo", "demo")]
    metrics = json.loads((runs / first / "metrics.json").read_text())
    best = max(a + b for a, b in zip(metrics["val.i2t_r1"]["values"], metrics["val.t2i_r1"]["values"]))
    assert rows[0][8:10] == [f"{best:.2f}", f"{trained.result['rsum']:.2f}"]  # best val, test rsum
    assert rows[0][10] == str(runs / first / "best.ckpt")
    assert rows[2][8:10] == ["-", "-"]  # the failed run has no result


def test_compare_shows_the_keys_that_differ_and_the_metrics(browse_runs):
    runs, trained, (first, second, _) = browse_runs
    out = browse("--dir", str(runs), "compare", first, second)
    keys = out.split("metrics:")[0]
    rows = {line.split()[0]: line.split()[1:] for line in keys.splitlines()[2:] if line.strip()}
    assert rows["direction"] == ['"i2t"', '"t2i"']  # the changed key, run 1's value beside run 2's
    differing = set(rows)
    assert {"direction", "test_only", "checkpoint"} <= differing and "embed_dim" not in differing
    rsum = [line.split() for line in out.split("metrics:")[1].splitlines() if line.startswith("rsum ")][0]
    assert rsum[1] == f"{trained.result['rsum']:.2f}"


def test_a_missing_folder_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hat.runs", "--dir", str(tmp_path / "nope")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: --dir {tmp_path / 'nope'} does not exist; pass the "
                                                    f"observer_dir of your runs")
