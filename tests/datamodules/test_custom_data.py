"""Your own pictures and captions: CSV, TSV, JSON Lines and COCO JSON -> the same arrow
files; split column or a deterministic split by picture; bad input in one line."""
import csv
import json
import os

import pytest

from datamodules import DataError, open_split
from datamodules.arrow import split_paths
from datamodules.prepare import main, prepare_dataset
from hat.checks import validate_config
from hat.defaults import default_config
from hat.plugins import ConfigProblem
from tests.datamodules.conftest import colour, jpeg

PICTURES = 30
NAME = "mine"
FILES = [f"{NAME}_caption_{split}.arrow" for split in ("train", "val", "test")] + [f"{NAME}_split.json"]


def count(index: int) -> int:
    return 1 + index % 4  # 1 to 4 captions: not the 5-caption protocol


def image(index: int) -> str:
    return f"pics/{index:03d}.jpg"


def caption_rows(order=None) -> list[tuple]:
    """(image, caption) in file order, the pictures' captions interleaved (grouping is tested)."""
    rows = [(image(i), f"picture {i}, caption {k}") for k in range(4) for i in range(PICTURES) if k < count(i)]
    return rows if order is None else [rows[i] for i in order]


@pytest.fixture
def raw(tmp_path):
    root = tmp_path / "raw"
    os.makedirs(root / "pics")
    for i in range(PICTURES):
        (root / image(i)).write_bytes(jpeg(colour(i), size=(20 + i % 3, 16)))
    return root


def write_table(path, rows, delimiter=",", header=("image", "caption")):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, rows, as_lists=False):
    with open(path, "w", encoding="utf-8") as handle:
        if as_lists:
            grouped = {}
            for picture, caption in rows:
                grouped.setdefault(picture, []).append(caption)
            records = [{"image": picture, "captions": captions} for picture, captions in grouped.items()]
        else:
            records = [{"image": picture, "caption": caption} for picture, caption in rows]
        handle.writelines(json.dumps(record) + "\n" for record in records)
    return str(path)


def write_coco(path, rows):
    ids = {picture: 100 + n for n, picture in enumerate(dict.fromkeys(p for p, _ in rows))}
    document = {"images": [{"id": i, "file_name": picture} for picture, i in ids.items()],
                "annotations": [{"id": n, "image_id": ids[p], "caption": c} for n, (p, c) in enumerate(rows)]}
    path.write_text(json.dumps(document))
    return str(path)


def prepare(raw, captions, out, **options):
    return prepare_dataset(NAME, str(raw), str(out), captions=captions, progress=False, **options)


def contents(out):
    return {name: (out / name).read_bytes() for name in FILES}


def test_four_formats_prepare_identical_files(raw, tmp_path):
    rows = caption_rows()
    sources = {
        "csv": write_table(tmp_path / "c.csv", rows),
        "tsv": write_table(tmp_path / "c.tsv", rows, "\t"),
        "jsonl": write_jsonl(tmp_path / "c.jsonl", rows),
        "jsonl_lists": write_jsonl(tmp_path / "l.jsonl", rows, as_lists=True),
        "coco": write_coco(tmp_path / "c.json", rows),
    }
    written = {kind: contents(prepare(raw, path, tmp_path / kind, val_images=4, test_images=0.2) and
                              tmp_path / kind) for kind, path in sources.items()}
    assert all(files == written["csv"] for files in written.values())
    seen = {}
    for split, pictures in (("train", 20), ("val", 4), ("test", 6)):
        data = open_split(str(tmp_path / "csv"), NAME, split)
        assert len(data) == pictures
        for n in range(len(data)):
            index = int(data.image_id(n)[5:8])
            assert data.captions(n) == [f"picture {index}, caption {k}" for k in range(count(index))]
            assert data.image_bytes(n) == (raw / image(index)).read_bytes()
            seen[index] = split
        indices = [int(data.image_id(n)[5:8]) for n in range(len(data))]
        assert indices == sorted(indices)  # file order within a split
    assert sorted(seen) == list(range(PICTURES))


def test_split_column_is_honoured(raw, tmp_path):
    split = {i: "val" if i % 10 == 3 else "test" if i % 10 == 7 else "train" for i in range(PICTURES)}
    rows = [(p, c, split[int(p[5:8])]) for p, c in caption_rows()]
    path = write_table(tmp_path / "c.csv", rows, header=("image", "caption", "split"))
    summary = prepare(raw, path, tmp_path / "out")
    assert summary["split_file"] is None and not (tmp_path / "out" / f"{NAME}_split.json").exists()
    for name in ("train", "val", "test"):
        data = open_split(str(tmp_path / "out"), NAME, name)
        assert [data.image_id(n) for n in range(len(data))] == [image(i) for i in range(PICTURES) if split[i] == name]


def test_split_is_stable_across_runs_and_row_order(raw, tmp_path):
    rows = caption_rows()
    prepare(raw, write_table(tmp_path / "a.csv", rows), tmp_path / "a")
    first = contents(tmp_path / "a")
    prepare(raw, write_table(tmp_path / "a.csv", rows), tmp_path / "a")
    assert contents(tmp_path / "a") == first  # prepared again: the same files
    prepare(raw, write_table(tmp_path / "b.csv", rows[::-1]), tmp_path / "b")
    record_a, record_b = (json.loads((tmp_path / d / FILES[3]).read_text()) for d in "ab")
    assert {s: set(record_a[s]) for s in ("val", "test")} == {s: set(record_b[s]) for s in ("val", "test")}
    assert len(record_a["val"]) == len(record_a["test"]) == 2  # 5% of 30, at least one: round(1.5)
    prepare(raw, write_table(tmp_path / "a.csv", rows), tmp_path / "a", seed=1)
    moved = json.loads((tmp_path / "a" / FILES[3]).read_text())
    assert moved["seed"] == 1 and (moved["val"], moved["test"]) != (record_a["val"], record_a["test"])


def test_recorded_split_keeps_pictures_when_more_are_added(raw, tmp_path):
    rows = caption_rows()
    prepare(raw, write_table(tmp_path / "a.csv", rows[:-10]), tmp_path / "a", val_images=3, test_images=3)
    before = json.loads((tmp_path / "a" / FILES[3]).read_text())
    prepare(raw, write_table(tmp_path / "a.csv", rows), tmp_path / "a", val_images=3, test_images=3)
    after = json.loads((tmp_path / "a" / FILES[3]).read_text())
    assert set(before["val"]) <= set(after["val"]) and set(before["test"]) <= set(after["test"])


def test_a_prepared_name_is_selectable_and_keeps_every_caption(raw, tmp_path):
    prepare(raw, write_table(tmp_path / "c.csv", caption_rows()), tmp_path / "out")
    out = str(tmp_path / "out")
    assert split_paths(out, NAME, "test") == [os.path.join(out, f"{NAME}_caption_test.arrow")]
    config = default_config(dataset=NAME, data_root=out, demo_recipe=True, device="cpu",
                            observer_dir=None, gallery=False, num_workers=0)
    assert config["captions_per_image"] is None  # pictures with 1 to 4 captions: all of them are tested
    validate_config(config)
    with pytest.raises(ConfigProblem, match=r"dataset='mien' is not valid; allowed: \['coco', 'demo', 'f30k'\] "
                                            r"or a name prepared into data_root=.* \(found: mine; .*captions=FILE"):
        validate_config(dict(config, dataset="mien"))
    os.remove(os.path.join(out, f"{NAME}_caption_val.arrow"))
    with pytest.raises(ConfigProblem, match=r"missing arrow file .*mine_caption_val\.arrow .*captions=FILE"):
        validate_config(config)


def test_command_line_flags(raw, tmp_path, capsys):
    path = write_table(tmp_path / "c.tsv", [(c, p) for p, c in caption_rows()], "\t", ("text", "file"))
    assert main(["--dataset", NAME, "--raw-root", str(raw), "--data-root", str(tmp_path / "out"), "--captions",
                 path, "--image-column", "file", "--caption-column", "text", "--val-images", "0.1",
                 "--test-images", "5", "--seed", "3"]) == 0
    record = json.loads((tmp_path / "out" / FILES[3]).read_text())
    assert (record["seed"], len(record["val"]), len(record["test"])) == (3, 3, 5)


def _bad_csv(tmp_path, raw, case):
    rows = caption_rows()
    if case == "missing image":
        rows.insert(2, ("pics/gone.jpg", "a caption"))
    elif case == "undecodable image":
        (raw / image(4)).write_bytes(b"not a picture")
    elif case == "empty caption":
        rows[2] = (rows[2][0], "  ")
    elif case == "no image":
        rows[2] = ("", rows[2][1])
    path = write_table(tmp_path / "c.csv", rows)
    if case == "not utf-8":
        lines = open(path, "rb").read().split(b"\n")
        lines[2] = lines[2].replace(b"caption", b"capt\xffion")
        open(path, "wb").write(b"\n".join(lines))
    return path


BAD = [  # case, options, message (row 4: the third data row; the header is row 1)
    ("missing image", {}, r"c\.csv row 4: image pics/gone\.jpg not found under raw_root=.*skip_missing_images=True"),
    ("undecodable image", {}, r"c\.csv row 6: image pics/004\.jpg does not decode \(.*\); replace the file"),
    ("empty caption", {}, r"c\.csv row 4: empty caption for pics/002\.jpg; write the caption or remove the row"),
    ("no image", {}, r"c\.csv row 4: no image; give every caption the path of its picture"),
    ("not utf-8", {}, r"c\.csv row 3: not UTF-8 text \(invalid start byte at byte \d+\); save the file as UTF-8"),
    ("misspelt column", {"caption_column": "text"},
     r"c\.csv row 1: no column 'text' \(columns found: image, caption\); set image_column="),
]


@pytest.mark.parametrize("case, options, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_naming_file_and_row(raw, tmp_path, case, options, message):
    path = _bad_csv(tmp_path, raw, case)
    with pytest.raises(DataError, match=message) as error:
        prepare(raw, path, tmp_path / "out", **options)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_missing_images_can_be_skipped(raw, tmp_path):
    summary = prepare(raw, _bad_csv(tmp_path, raw, "missing image"), tmp_path / "out", skip_missing_images=True)
    assert summary["skipped_missing_images"] == 1
    assert sum(info["images"] for info in summary["splits"].values()) == PICTURES


def test_picture_in_two_splits_and_reserved_names(raw, tmp_path):
    rows = [(p, c, "test" if (p, c) == (image(1), "picture 1, caption 1") else "train")
            for p, c in caption_rows()]
    path = write_table(tmp_path / "c.csv", rows, header=("image", "caption", "split"))
    with pytest.raises(DataError, match=r"c\.csv row 32: pics/001\.jpg is in split 'test' here and 'train' at "
                                        r"row 3; a picture belongs to one split"):
        prepare(raw, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for name in ("f30k", "coco", "demo"):
        with pytest.raises(DataError, match=f"dataset='{name}' is a built-in dataset; give your captions another"):
            prepare_dataset(name, str(raw), str(tmp_path / "out"), captions=path)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"image": "pics/000.jpg", "caption": "a"}\n{"picture": "pics/001.jpg", "caption": "b"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl row 2: no field 'image' \(fields found: picture, caption\)"):
        prepare(raw, str(jsonl), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_demo_models_train_validate_test_and_draw_a_custom_set(raw, tmp_path):
    """A prepared set of pictures with 1-4 captions each, through the whole runner."""
    from run import ex

    write_table(raw / "captions.csv", caption_rows())
    out = tmp_path / "arrow"
    prepare(raw, raw / "captions.csv", out, val_images=6, test_images=6)
    run = ex.run(named_configs=["demo"], config_updates={
        "dataset": NAME, "data_root": str(out), "max_epoch": 1, "per_gpu_batchsize": 8, "eval_batch_size": 8,
        "progress": False, "observer_dir": str(tmp_path / "runs"), "n_queries": 4})
    assert run.status == "COMPLETED" and run.config["captions_per_image"] is None
    test = open_split(str(out), NAME, "test")
    n_captions = sum(len(test.captions(i)) for i in range(len(test)))
    assert n_captions != 5 * len(test)  # not the 5-caption protocol: every caption counts
    ranked = json.loads(open(run.info["gallery"]["retrievals"]).read())
    assert len(ranked["t2i"]) == n_captions and len(ranked["i2t"]) == len(test) == 6
    for key in ("i2t_r1", "t2i_r1", "rsum"):
        assert 0 <= run.result[key] <= (600 if key == "rsum" else 100)
    assert os.path.isfile(run.info["gallery"]["gallery"])
