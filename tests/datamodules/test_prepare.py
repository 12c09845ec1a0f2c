"""Raw images + Karpathy JSON -> arrow files -> readers: counts, order, wiring, protocol."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest
import torch

from datamodules import DataError, open_split
from datamodules.arrow import SPLIT_FILES
from datamodules.datasets import SplitCaptions, caption_index
from datamodules.karpathy import iter_images
from datamodules.prepare import SOURCES, arrow_path, prepare_dataset
from datamodules.writer import VILT_SCHEMA
from hat.evaluation import recall
from tests.conftest import ROOT
from tests.datamodules.conftest import F30K_SPLITS, caption_count, colour, image_path, make_raw


def _prepared(tmp_path_factory, dataset):
    root = tmp_path_factory.mktemp(dataset)
    records = make_raw(root / "raw", dataset)
    summary = prepare_dataset(dataset, str(root / "raw"), str(root / "arrow"), progress=False)
    return root, records, summary


@pytest.fixture(scope="module")
def f30k(tmp_path_factory):
    return _prepared(tmp_path_factory, "f30k")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return _prepared(tmp_path_factory, "coco")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hat.backbones import resolve_text_backbone

    return AutoTokenizer.from_pretrained(resolve_text_backbone("packaged-minilm"))


def _in_split(records, split):
    return [r for r in records if r["split"] == split]


def _check_rows(data, records, raw_root, dataset, image_folder=True):
    """Rows in JSON order, captions in file order, bytes identical to the image files."""
    assert [data.image_id(i) for i in range(len(data))] == [r["filename"] for r in records]
    for i, record in enumerate(records):
        assert data.captions(i) == [s["raw"] for s in record["sentences"]]
        with open(image_path(raw_root, dataset, record, image_folder), "rb") as handle:
            assert data.image_bytes(i) == handle.read()
    index = records[-1]["imgid"]
    pixel = data.image(len(records) - 1).getpixel((5, 5))
    assert pixel == pytest.approx(colour(index), abs=4)


def test_f30k_files_counts_and_order(f30k):
    root, records, summary = f30k
    assert sorted(os.listdir(root / "arrow")) == [f"f30k_caption_karpathy_{s}.arrow" for s in ("test", "train", "val")]
    counts = {split: summary["splits"][split]["images"] for split in ("train", "val", "test")}
    assert counts == {"train": 20, "val": 5, "test": 5}
    assert summary["splits"]["train"]["captions"] == sum(
        caption_count(i) for i, s in enumerate(F30K_SPLITS) if s == "train") == 108
    for split in ("train", "val", "test"):
        path = arrow_path(str(root / "arrow"), "f30k", split)
        reader = pa.ipc.open_file(pa.memory_map(path))
        assert reader.schema.equals(VILT_SCHEMA)
        assert set(reader.read_all().column("split").to_pylist()) == {split}
        _check_rows(open_split(str(root / "arrow"), "f30k", split), _in_split(records, split),
                    root / "raw", "f30k")


def test_coco_wiring_train_is_train_plus_restval(coco):
    root, records, summary = coco
    data_root = str(root / "arrow")
    assert {s: summary["splits"][s]["images"] for s in SOURCES["coco"].splits} == {
        "train": 12, "restval": 12, "val": 6, "test": 6}
    train = open_split(data_root, "coco", "train")
    _check_rows(train, _in_split(records, "train") + _in_split(records, "restval"), root / "raw", "coco")
    assert train.image_id(0) == "COCO_train2014_000000000500.jpg"
    assert train.image_id(12) == "COCO_val2014_000000000501.jpg"  # the first restval image
    assert train.source(12).endswith("coco_caption_karpathy_restval.arrow")
    val, test = open_split(data_root, "coco", "val"), open_split(data_root, "coco", "test")
    _check_rows(val, _in_split(records, "val"), root / "raw", "coco")
    _check_rows(test, _in_split(records, "test"), root / "raw", "coco")
    val_ids = {val.image_id(i) for i in range(len(val))}
    assert len(val_ids) == 6 and not val_ids & {test.image_id(i) for i in range(len(test))}
    # the names the writer uses are the ones the readers wire
    for dataset in SOURCES:
        written = {os.path.basename(arrow_path("", dataset, s))[:-6] for s in SOURCES[dataset].splits}
        assert written == {name for files in SPLIT_FILES[dataset].values() for name in files}


def test_five_caption_protocol_and_all_captions_map(coco, tokenizer):
    root, records, _ = coco
    test = open_split(str(root / "arrow"), "coco", "test")
    counts = [caption_count(r["imgid"]) for r in _in_split(records, "test")]
    assert counts == [6, 5, 6, 5, 6, 6]  # images with more than five captions exist
    five = SplitCaptions(test, tokenizer, 32)
    assert five.caption_to_image.tolist() == [j // 5 for j in range(30)]
    assert caption_index(test, 5)[5 * 4 + 3] == (4, 3)  # caption 5i+k belongs to image i
    assert [test.captions(i)[k] for i, k in caption_index(test, 5)[5:10]] == [
        f"coco image 11 caption {k}." for k in range(5)]  # the first five, in file order
    every = SplitCaptions(test, tokenizer, 32, captions_per_image=None)
    expected_map = [i for i, n in enumerate(counts) for _ in range(n)]
    assert every.caption_to_image.tolist() == expected_map and len(every) == 34
    # the explicit map reaches recall: a score matrix that ranks each caption's own image
    # first is perfect with the map, and not with the 5i+k assumption
    sims = torch.tensor([[1.0 if owner == i else 0.0 for owner in expected_map] for i in range(6)])
    assert recall(sims, every.caption_to_image)["rsum"] == pytest.approx(600.0)
    assert recall(sims, (torch.arange(34) // 5).clamp(max=5))["t2i_r1"] < 100.0


def test_rerun_skips_complete_splits_and_rewrites_missing_ones(coco):
    root, _, _ = coco
    data_root = str(root / "arrow")
    mtimes = {name: os.stat(os.path.join(data_root, name)).st_mtime_ns for name in os.listdir(data_root)}
    os.remove(arrow_path(data_root, "coco", "val"))
    stale = arrow_path(data_root, "coco", "test") + ".tmp-999999999"  # left by a killed run
    with open(stale, "wb") as handle:
        handle.write(b"half")
    summary = prepare_dataset("coco", str(root / "raw"), data_root, progress=False)
    assert {s: i["written"] for s, i in summary["splits"].items()} == {
        "train": False, "restval": False, "val": True, "test": False}
    for name in ("coco_caption_karpathy_train.arrow", "coco_caption_karpathy_test.arrow"):
        assert os.stat(os.path.join(data_root, name)).st_mtime_ns == mtimes[name]
    assert len(open_split(data_root, "coco", "val")) == 6
    # a truncated (unfinished-looking) file is not taken for complete
    path = arrow_path(data_root, "coco", "test")
    with open(path, "r+b") as handle:
        handle.truncate(100)
    summary = prepare_dataset("coco", str(root / "raw"), data_root, progress=False)
    assert summary["splits"]["test"]["written"] and len(open_split(data_root, "coco", "test")) == 6
    assert sorted(os.listdir(data_root)) == sorted(mtimes)  # no temporary files left


def test_interrupted_run_leaves_no_finished_looking_file(tmp_path, monkeypatch):
    import datamodules.prepare as prepare

    make_raw(tmp_path / "raw", "f30k")
    calls = []

    def interrupted_read(*args):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return real_read(*args)

    real_read = prepare._read_image
    monkeypatch.setattr(prepare, "_read_image", interrupted_read)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("f30k", str(tmp_path / "raw"), str(tmp_path / "arrow"), progress=False, batch_rows=2)
    assert os.listdir(tmp_path / "arrow") == []  # neither .arrow files nor temporaries
    monkeypatch.setattr(prepare, "_read_image", real_read)
    summary = prepare_dataset("f30k", str(tmp_path / "raw"), str(tmp_path / "arrow"), progress=False)
    assert all(info["written"] for info in summary["splits"].values())


def test_f30k_images_directly_in_raw_root(tmp_path):
    records = make_raw(tmp_path, "f30k", image_folder=False)
    summary = prepare_dataset("f30k", str(tmp_path), str(tmp_path / "arrow"), progress=False)
    assert summary["splits"]["test"]["images"] == 5
    _check_rows(open_split(str(tmp_path / "arrow"), "f30k", "test"), _in_split(records, "test"),
                tmp_path, "f30k", image_folder=False)


def test_missing_images_refused_unless_skipped(tmp_path):
    records = make_raw(tmp_path / "raw", "coco")
    for index in (4, 9, 30, 31):
        os.remove(image_path(tmp_path / "raw", "coco", records[index]))
    with pytest.raises(DataError) as error:
        prepare_dataset("coco", str(tmp_path / "raw"), str(tmp_path / "arrow"), progress=False)
    message = str(error.value)
    assert "\n" not in message and "4 image(s) listed in" in message and "dataset_coco.json" in message
    assert "val2014/COCO_val2014_000000000504.jpg" in message and "skip_missing_images=True" in message
    assert not (tmp_path / "arrow").exists()  # nothing written
    summary = prepare_dataset("coco", str(tmp_path / "raw"), str(tmp_path / "arrow"), True, progress=False)
    assert summary["skipped_missing_images"] == 4
    # 4: restval, 9: train, 30: train, 31: restval
    assert {s: i["images"] for s, i in summary["splits"].items()} == {
        "train": 10, "restval": 10, "val": 6, "test": 6}
    train = open_split(str(tmp_path / "arrow"), "coco", "train")
    kept = [r for i, r in enumerate(records) if i not in (4, 9, 30, 31)]
    assert [train.image_id(i) for i in range(len(train))] == [
        r["filename"] for r in _in_split(kept, "train") + _in_split(kept, "restval")]


def test_bad_json_inputs_name_the_file(tmp_path):
    make_raw(tmp_path / "raw", "coco")
    raw, out = str(tmp_path / "raw"), str(tmp_path / "arrow")
    with pytest.raises(DataError, match=r"missing Karpathy split file .*dataset_flickr30k\.json"):
        prepare_dataset("f30k", raw, out)
    os.rename(tmp_path / "raw" / "dataset_coco.json", tmp_path / "raw" / "dataset_flickr30k.json")
    with pytest.raises(DataError, match=r"dataset_flickr30k\.json, image #1 \(COCO_val2014_000000000501\.jpg\) "
                                        r"has split 'restval', expected one of \['train', 'val', 'test'\]"):
        prepare_dataset("f30k", raw, out)
    path = tmp_path / "raw" / "dataset_coco.json"
    document = json.loads((tmp_path / "raw" / "dataset_flickr30k.json").read_text())
    wrong = dict(document, images=[r for r in document["images"] if r["split"] != "restval"])
    (tmp_path / "raw" / "dataset_flickr30k.json").write_text(json.dumps(wrong))
    with pytest.raises(DataError, match=r"dataset_flickr30k\.json is the split file of 'coco', not 'flickr30k'"):
        prepare_dataset("f30k", raw, out)
    del document["images"][3]["sentences"][1]["raw"]
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match=r"dataset_coco\.json, image #3 \(COCO_train2014_000000000503\.jpg\) "
                                        r"has a sentence without a 'raw'"):
        prepare_dataset("coco", raw, out)
    document["images"][3]["sentences"][1]["raw"] = "restored"
    path.write_text(json.dumps(document)[:-40])
    with pytest.raises(DataError, match=r"dataset_coco\.json is not a valid Karpathy split file"):
        prepare_dataset("coco", raw, out)
    with pytest.raises(DataError, match=r"raw_root=.*nowhere is not a directory"):
        prepare_dataset("coco", str(tmp_path / "nowhere"), out)
    assert not os.path.exists(out)


@pytest.mark.parametrize("chunk_chars", [1, 5, 64, 1 << 20])
def test_streamed_json_equals_json_load(tmp_path, chunk_chars):
    records = make_raw(tmp_path, "coco")
    document = {"dataset": "coco", "count": 123456, "images": records[:7], "after": [1.5, None]}
    path = tmp_path / "k.json"
    path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    meta = {}
    assert list(iter_images(str(path), meta, chunk_chars=chunk_chars)) == records[:7]
    assert meta == {"dataset": "coco", "count": 123456, "after": [1.5, None]}


def test_module_cli(tmp_path):
    records = make_raw(tmp_path / "raw", "f30k")
    command = [sys.executable, "-m", "datamodules.prepare", "--dataset", "f30k", "--raw-root",
               str(tmp_path / "raw"), "--data-root", str(tmp_path / "arrow"), "--no-progress"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "f30k train: 20 images, 108 captions" in done.stdout
    assert len(open_split(str(tmp_path / "arrow"), "f30k", "val")) == 5
    os.remove(image_path(tmp_path / "raw", "f30k", records[2]))
    failed = subprocess.run(command[:-2] + [str(tmp_path / "other"), "--no-progress"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert failed.returncode != 0 and failed.stderr.count("\n") == 1, failed.stderr
    assert failed.stderr.startswith("error: 1 image(s) listed in") and "flickr30k-images/1002.jpg" in failed.stderr
    assert "--skip-missing-images" in failed.stderr and not (tmp_path / "other").exists()
