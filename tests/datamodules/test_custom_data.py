"""Your own pictures and captions: CSV, TSV, JSON Lines, COCO JSON and Flickr8K/Flickr30K
token files -> the same arrow files; split column or a deterministic split by picture;
bad input in one line."""
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


def write_tokens(path, rows, newline="\n"):
    """Flickr8k.token.txt's layout: no header, IMAGE#K<TAB>caption, K counting each picture's captions."""
    numbers = {}
    with open(path, "w", encoding="utf-8", newline="") as handle:
        for picture, caption in rows:
            numbers[picture] = numbers.get(picture, -1) + 1
            handle.write(f"{picture}#{numbers[picture]}\t{caption}{newline}")
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


def test_flickr8k_and_flickr30k_token_files_prepare_the_csvs_files(raw, tmp_path):
    rows = caption_rows()
    prepare(raw, write_table(tmp_path / "c.csv", rows), tmp_path / "csv", val_images=4, test_images=0.2)
    token_files = {"f8k": write_tokens(tmp_path / "Flickr8k.token.txt", rows),  # Flickr8K's name and layout
                   "f30k": write_tokens(tmp_path / "results_20130124.token", rows, "\r\n")}  # Flickr30K's
    for out, path in token_files.items():
        summary = prepare(raw, path, tmp_path / out, val_images=4, test_images=0.2)
        assert summary["split_file"] == str(tmp_path / out / FILES[3])  # no split column: the hashed split
        assert contents(tmp_path / out) == contents(tmp_path / "csv")
    train = open_split(str(tmp_path / "f8k"), NAME, "train")
    first = int(train.image_id(0)[5:8])
    assert train.captions(0) == [f"picture {first}, caption {k}" for k in range(count(first))]
    assert train.image_bytes(0) == (raw / image(first)).read_bytes()


def _bad_tokens(tmp_path, case):
    lines = [f"{p}#{k}\t{c}".encode() for p, c, k in
             ((p, c, int(c[-1])) for p, c in caption_rows())]  # "picture i, caption k"
    if case == "no tab":
        lines[2] = lines[2].replace(b"\t", b" ")
    elif case == "no #k":
        lines[2] = lines[2].replace(b"#0\t", b"\t")
    elif case == "empty caption":
        lines[2] = lines[2].split(b"\t")[0] + b"\t "
    elif case == "not utf-8":
        lines[2] = lines[2].replace(b"caption", b"capt\xffion")
    path = tmp_path / "Flickr8k.token.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


BAD_TOKENS = [  # the third line: pics/002.jpg#0
    ("no tab", r"Flickr8k\.token\.txt row 3: no tab between the image and the caption; a line of a "
               r"Flickr8K/Flickr30K token file is IMAGE#K<TAB>caption"),
    ("no #k", r"Flickr8k\.token\.txt row 3: 'pics/002\.jpg' does not end in #K \(the caption's number, #0 to #4\); "
              r"a line of a Flickr8K/Flickr30K token file is IMAGE#K<TAB>caption"),
    ("empty caption", r"Flickr8k\.token\.txt row 3: empty caption for pics/002\.jpg; write the caption or remove"),
    ("not utf-8", r"Flickr8k\.token\.txt row 3: not UTF-8 text \(invalid start byte at byte \d+\); save the file"),
]


@pytest.mark.parametrize("case, message", BAD_TOKENS, ids=[b[0] for b in BAD_TOKENS])
def test_bad_token_line_names_file_and_line(raw, tmp_path, case, message):
    with pytest.raises(DataError, match=message) as error:
        prepare(raw, _bad_tokens(tmp_path, case), tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


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
    err = capsys.readouterr().err
    assert f"writing {NAME}: 100%" in err and "30/30" in err  # the progress bar of pictures
    assert main(["--dataset", NAME, "--raw-root", str(raw), "--data-root", str(tmp_path / "quiet"), "--captions",
                 path, "--image-column", "file", "--caption-column", "text", "--no-progress"]) == 0
    assert "writing" not in capsys.readouterr().err


def flickr8k_layout(raw, tmp_path):
    """Flickr8K as it ships: the pictures in one folder, Flickr8k_text/Flickr8k.token.txt."""
    os.makedirs(tmp_path / "Flickr8k_text")
    rows = [(p[len("pics/"):], c) for p, c in caption_rows()]
    return str(raw / "pics"), write_tokens(tmp_path / "Flickr8k_text" / "Flickr8k.token.txt", rows)


def test_command_line_prepares_flickr8k_and_refuses_bad_input_in_one_line(raw, tmp_path, capsys):
    pictures, tokens = flickr8k_layout(raw, tmp_path)
    out = tmp_path / "out"
    assert main(["--dataset", NAME, "--raw-root", pictures, "--captions", tokens, "--data-root", str(out),
                 "--no-progress"]) == 0
    assert sorted(os.listdir(out)) == sorted(FILES)
    test = open_split(str(out), NAME, "test")
    assert len(test) == 2 and test.image_id(0).endswith(".jpg") and "/" not in test.image_id(0)
    capsys.readouterr()
    with open(tokens, "a", encoding="utf-8") as handle:
        handle.write("000.jpg#4 a fifth caption without its tab\n")
    with pytest.raises(SystemExit) as exit_status:
        main(["--dataset", NAME, "--raw-root", pictures, "--captions", tokens, "--data-root",
              str(tmp_path / "again"), "--no-progress"])
    assert exit_status.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.endswith("\n") and stderr.count("\n") == 1
    assert stderr.startswith(f"error: {tokens} row {len(caption_rows()) + 1}: no tab between the image and the caption")
    assert not (tmp_path / "again").exists()


def test_run_py_prepare_data_with_flickr8k(raw, tmp_path, capsys):
    from run import ex

    pictures, tokens = flickr8k_layout(raw, tmp_path)
    out = tmp_path / "out"
    run = ex.run_commandline(["run.py", "prepare_data", "with", f"dataset={NAME}", f"raw_root={pictures}",
                              f"captions={tokens}", f"data_root={out}", "test_images=3"])
    assert run.status == "COMPLETED" and run.result["split_file"] == str(out / FILES[3])
    assert sorted(os.listdir(out)) == sorted(FILES)
    assert {split: info["images"] for split, info in run.result["splits"].items()} == {
        "train": 25, "val": 2, "test": 3}
    assert f"{NAME} test: 3 images" in capsys.readouterr().out


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


def _bad_json(tmp_path, case):
    """A COCO, JSON Lines or Karpathy file of the fixture's captions, broken at its third
    annotation / line / image (or, for COCO's images, the second)."""
    rows = caption_rows()
    if case.startswith("coco"):
        path = tmp_path / "c.json"
        document = json.loads(open(write_coco(path, rows)).read())
        if case == "coco image_id not in images":
            document["annotations"][2]["image_id"] = 999
        elif case == "coco image without file_name":
            del document["images"][1]["file_name"]
        elif case == "coco empty caption":
            document["annotations"][2]["caption"] = ""
        elif case == "coco annotation without caption":
            del document["annotations"][2]["caption"]
        elif case == "coco caption not text":
            document["annotations"][2]["caption"] = 7
        elif case == "coco neither format":
            document = {"images": document["images"]}
        path.write_text(json.dumps(document))
        if case == "coco not json":
            path.write_text(json.dumps(document, indent=1)[:-3])
        return str(path)
    if case.startswith("karpathy"):
        path = tmp_path / "dataset_mine.json"
        images = [{"filename": image(i), "split": "dev" if i == 2 else "train",
                   "sentences": [{"raw": f"picture {i}"}]} for i in range(PICTURES)]
        path.write_text(json.dumps({"images": images}))
        return str(path)
    path = tmp_path / "c.jsonl"
    lines = open(write_jsonl(path, rows)).read().splitlines()
    lines[2] = {"jsonl not json": '{"image": "pics/002.jpg", "caption": "a"',
                "jsonl not an object": '["pics/002.jpg", "a caption"]',
                "jsonl no caption field": '{"image": "pics/002.jpg", "text": "a caption"}',
                "jsonl captions not a list of str": '{"image": "pics/002.jpg", "captions": ["a caption", 3]}',
                "jsonl empty captions": '{"image": "pics/002.jpg", "captions": []}',
                "jsonl unknown split": '{"image": "pics/002.jpg", "caption": "a", "split": "training"}'}[case]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


BAD_JSON = [  # case, message: the file and the row (COCO: the annotation; JSON Lines: the line)
    ("coco image_id not in images", r"c\.json row 3: image_id 999 is not in 'images'; add it there with its file_name"),
    ("coco image without file_name", r"c\.json images row 2: needs 'id' and 'file_name'; use the COCO caption format"),
    ("coco empty caption", r"c\.json row 3: empty caption for pics/002\.jpg; write the caption or remove the row"),
    ("coco annotation without caption", r"c\.json row 3: an annotation needs 'image_id' and 'caption' \(found: id, "
                                        r"image_id\); use the COCO caption format"),
    ("coco caption not text", r"c\.json row 3: a caption of pics/002\.jpg is of type int, not text; write each"),
    ("coco not json", r"c\.json row \d+: not JSON \(.*, column \d+\); fix the file"),
    ("coco neither format", r"c\.json: neither COCO captions \('images' \+ 'annotations'\) nor a Karpathy split "
                            r"file \('images' with 'sentences'\); found: images"),
    ("karpathy unknown split", r"dataset_mine\.json row 3: split 'dev' is not one of \['restval', 'test', 'train', "
                               r"'val'\]; use the Karpathy split file unchanged"),
    ("jsonl not json", r"c\.jsonl row 3: not JSON \(Expecting ',' delimiter\); one object per line"),
    ("jsonl not an object", r"c\.jsonl row 3: not a JSON object; one object per line"),
    ("jsonl no caption field", r"c\.jsonl row 3: no field 'caption' \(fields found: image, text\); set image_column="),
    ("jsonl captions not a list of str", r"c\.jsonl row 3: a caption of pics/002\.jpg is of type int, not text"),
    ("jsonl empty captions", r"c\.jsonl row 3: empty caption list for pics/002\.jpg; write its captions or remove"),
    ("jsonl unknown split", r"c\.jsonl row 3: split 'training' is not one of \['train', 'val', 'test'\]; fix the "
                            r"split column"),
]


@pytest.mark.parametrize("case, message", BAD_JSON, ids=[b[0] for b in BAD_JSON])
def test_bad_json_input_is_one_line_naming_file_and_row(raw, tmp_path, case, message):
    path = _bad_json(tmp_path, case)
    with pytest.raises(DataError, match=message) as error:
        prepare(raw, path, tmp_path / "out")
    assert "\n" not in str(error.value) and str(error.value).startswith(path)
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
