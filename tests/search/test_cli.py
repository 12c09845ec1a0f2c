"""python -m hat.search: the index command reports what it did, query prints ranked lines
or JSON equal to the Python API, and every error is one line on stderr with status 2."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from hat.search import SearchIndex
from hat.search.__main__ import main
from tests.conftest import ROOT
from tests.search.conftest import copy_pictures


def run(capsys, *argv):
    """main(argv) in this process -> (status, stdout, stderr)."""
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("model", ["hat", "multisea"])
def test_query_prints_ranked_lines_and_json_equal_to_the_api(model, capsys, demo_indexes, queries):
    folder = demo_indexes[model]
    [hits] = SearchIndex.open(folder).search([queries[1]], 5)
    code, out, err = run(capsys, "query", folder, queries[1], "-k", 5, "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == [{"path": hit.path, "score": hit.score} for hit in hits.results]
    code, out, err = run(capsys, "query", folder, queries[1], "-k", 3)
    assert (code, err) == (0, "")
    assert [line.split("  ") for line in out.splitlines()] == [
        [str(rank), f"{hit.score:.6f}", hit.path] for rank, hit in enumerate(hits.results[:3], start=1)]


def test_index_command_reports_encoded_reused_and_skipped(capsys, tmp_path, demo_pictures, checkpoints):
    folder = tmp_path / "pictures"
    copy_pictures(demo_pictures, folder, 10)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    command = ["index", "--checkpoint", checkpoints["hat"], "--images", folder, "--batch-size", 4, "--shard-size", 4]
    code, out, err = run(capsys, *command)
    out_dir = folder / ".hat-index"
    assert code == 0 and "encoding pictures" in err and "img/s" in err  # the progress bar
    assert out.splitlines() == [
        f"index {out_dir}: 10 pictures (10 encoded, 0 reused, 0 dropped)",
        f"skipped 1 unreadable file(s): broken.png (UnidentifiedImageError: cannot identify image file "
        f"'{folder / 'broken.png'}') (all in {out_dir / 'manifest.json'}; tried again when they change)"]
    os.remove(sorted(folder.glob("demo*"))[0])
    code, out, err = run(capsys, *command, "--quiet")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"index {out_dir}: 9 pictures (0 encoded, 9 reused, 1 dropped)"
    code, out, err = run(capsys, *command, "--quiet", "--rebuild")
    assert out.splitlines()[0] == f"index {out_dir}: 9 pictures (9 encoded, 0 reused, 0 dropped)"


@pytest.fixture(scope="module")
def places(tmp_path_factory, demo_indexes, demo_pictures, checkpoints):
    """What the error cases name: the demo's HAT index, a folder that is not an index, a
    path that does not exist, the checkpoints, the pictures, and an index whose checkpoint
    changed since."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "photo.txt").write_text("mine")
    checkpoint = tmp / "changing.ckpt"
    shutil.copy(checkpoints["hat"], checkpoint)
    copy_pictures(demo_pictures, tmp / "few", 4)
    assert main(["index", "--checkpoint", str(checkpoint), "--images", str(tmp / "few"), "--quiet"]) == 0
    shutil.copy(checkpoints["multisea"], checkpoint)
    return {"index": demo_indexes["hat"], "foreign": tmp / "foreign", "missing": tmp / "missing",
            "hat": checkpoints["hat"], "multisea": checkpoints["multisea"], "pictures": demo_pictures,
            "changed": tmp / "few" / ".hat-index"}


ERRORS = {  # argv (from places) -> what the one line says
    "empty query": (lambda p: ["query", p["index"], ""], "the query is empty"),
    "whitespace query": (lambda p: ["query", p["index"], " \t "], "the query is empty"),
    "non-UTF-8 query": (lambda p: ["query", p["index"], "caf\udce9"], "not valid UTF-8 (byte 0xe9 at character 3)"),
    "k = 0": (lambda p: ["query", p["index"], "a dog", "-k", "0"], "k=0 is not a positive integer"),
    "k < 0": (lambda p: ["query", p["index"], "a dog", "-k", "-2"], "k=-2 is not a positive integer"),
    "k not a number": (lambda p: ["query", p["index"], "a dog", "-k", "two"], "argument -k: invalid int value"),
    "missing index": (lambda p: ["query", p["missing"], "a dog"], "missing does not exist; build it with"),
    "not an index": (lambda p: ["query", p["foreign"], "a dog"], "is not a search index (no manifest.json)"),
    "changed checkpoint": (lambda p: ["query", p["changed"], "a dog"], "has changed since index"),
    "unknown device": (lambda p: ["query", p["index"], "a dog", "--device", "tpu"], "device='tpu' is not valid"),
    "no command": (lambda p: [], "the following arguments are required"),
    "unknown command": (lambda p: ["find", "a dog"], "invalid choice: 'find'"),
    "index without --images": (lambda p: ["index", "--checkpoint", p["hat"]], "required: --images"),
    "missing checkpoint": (lambda p: ["index", "--checkpoint", p["missing"], "--images", p["pictures"]],
                           "does not exist"),
    "missing pictures": (lambda p: ["index", "--checkpoint", p["hat"], "--images", p["missing"]],
                         "is not a folder"),
    "index of another checkpoint": (lambda p: ["index", "--checkpoint", p["multisea"], "--images", p["pictures"],
                                               "--out", p["index"]], "pass a new --out for this checkpoint"),
    "out is not an index": (lambda p: ["index", "--checkpoint", p["hat"], "--images", p["pictures"], "--out",
                                       p["foreign"]], "is not a search index (it holds other files"),
    "bad batch size": (lambda p: ["index", "--checkpoint", p["hat"], "--images", p["pictures"], "--batch-size", "0"],
                       "batch_size=0 is not valid"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_every_error_is_one_line_with_status_2(case, places, capsys):
    argv, expected = ERRORS[case]
    code, out, err = run(capsys, *argv(places))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


def test_a_long_query_is_truncated_with_a_note(capsys, demo_indexes):
    long = " ".join(["a green cross at the lower left"] * 8)
    code, out, err = run(capsys, "query", demo_indexes["hat"], long, "-k", 2)
    assert code == 0 and len(out.splitlines()) == 2
    assert err.startswith("note: the query is 56 word pieces long and the model reads the first 30 (max_text_len=32)")
    assert err.count("\n") == 1


def test_the_module_runs_as_a_command(demo_indexes):
    """The real entry point, with an argument whose bytes are not UTF-8 (refused before
    anything loads; the rest of the command is the main() the tests above call)."""
    command = [sys.executable, "-m", "hat.search", "query", demo_indexes["hat"], "caf\udce9"]
    done = subprocess.run([os.fsencode(arg) for arg in command], cwd=ROOT, capture_output=True, timeout=300)
    assert done.returncode == 2 and done.stdout == b""
    assert done.stderr == b"error: the query is not valid UTF-8 (byte 0xe9 at character 3); pass the query as UTF-8 " \
                          b"text\n"
