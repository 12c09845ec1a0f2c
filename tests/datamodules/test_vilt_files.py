"""Arrow files written the way ViLT/METER/Multi-SEA write them load unchanged; bad files
get one-line errors that name the file and the fix."""
import random

import pandas as pd
import pyarrow as pa
import pytest

from datamodules import DataError, check_data_root, open_split
from datamodules.datasets import caption_index
from datamodules.writer import write_arrow
from tests.conftest import run_folder
from tests.datamodules.conftest import colour, jpeg

METRICS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
           "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr"}
SIZES = [(40, 30), (64, 64), (90, 50), (33, 77)]


def vilt_rows(dataset: str, split: str, count: int, offset: int = 0) -> list:
    """[image bytes, captions, image_id, split] like ViLT's write_*_karpathy: 5 or 6
    captions, JPEGs of assorted sizes."""
    return [[jpeg(colour(offset + i), SIZES[i % 4]), [f"{split} {offset + i} caption {k}" for k in range(5 + i % 2)],
             f"{dataset}_{offset + i:06d}.jpg", split] for i in range(count)]


def write_like_vilt(path, rows, keep_index: bool) -> pd.DataFrame:
    """ViLT's make_arrow: rows shuffled without a seed, a pandas DataFrame,
    pa.Table.from_pandas, RecordBatchFileWriter. keep_index=True shuffles the frame
    itself, so pandas stores its index as __index_level_0__."""
    if keep_index:
        frame = pd.DataFrame(rows, columns=["image", "caption", "image_id", "split"])
        frame = frame.sample(frac=1, random_state=random.randrange(1000))
    else:
        rows = list(rows)
        random.shuffle(rows)
        frame = pd.DataFrame(rows, columns=["image", "caption", "image_id", "split"])
    table = pa.Table.from_pandas(frame)
    with pa.OSFile(str(path), "wb") as sink:
        with pa.RecordBatchFileWriter(sink, table.schema) as writer:
            writer.write_table(table)
    return frame


@pytest.fixture(scope="module")
def vilt_f30k(tmp_path_factory):
    root = tmp_path_factory.mktemp("vilt_f30k")
    frames = {}
    for split, count, offset in (("train", 24, 0), ("val", 8, 100), ("test", 10, 200)):
        frames[split] = write_like_vilt(root / f"f30k_caption_karpathy_{split}.arrow",
                                        vilt_rows("f30k", split, count, offset), keep_index=True)
    return root, frames


def test_pandas_written_files_load_in_file_order(vilt_f30k):
    root, frames = vilt_f30k
    schema = pa.ipc.open_file(pa.memory_map(str(root / "f30k_caption_karpathy_test.arrow"))).schema
    assert "__index_level_0__" in schema.names and pa.types.is_large_string(schema.field("image_id").type)
    for split, frame in frames.items():
        data = open_split(str(root), "f30k", split)
        assert len(data) == len(frame)
        assert [data.image_id(i) for i in range(len(data))] == list(frame["image_id"])  # file order
        assert [data.captions(i) for i in range(len(data))] == [list(c) for c in frame["caption"]]
    test = open_split(str(root), "f30k", "test")
    for i in range(len(test)):
        number = int(test.image_id(i)[5:11])
        image = test.image(i)
        assert image.size == SIZES[(number - 200) % 4]
        assert image.getpixel((10, 10)) == pytest.approx(colour(number), abs=4)
        assert test.captions(i)[0] == f"test {number} caption 0"
    pairs = caption_index(test, 5)
    assert len(pairs) == 50 and pairs[5 * 7 + 2] == (7, 2)


def test_vilt_coco_files_wire_train_plus_restval(tmp_path):
    frames = {split: write_like_vilt(tmp_path / f"coco_caption_karpathy_{split}.arrow",
                                     vilt_rows("coco", split, count, offset), keep_index=False)
              for split, count, offset in (("train", 9, 0), ("restval", 4, 50), ("val", 3, 80), ("test", 5, 90))}
    assert "__index_level_0__" not in pa.ipc.open_file(
        pa.memory_map(str(tmp_path / "coco_caption_karpathy_train.arrow"))).schema.names
    train = open_split(str(tmp_path), "coco", "train")
    assert len(train) == 13
    assert [train.image_id(i) for i in range(13)] == list(frames["train"]["image_id"]) + list(frames["restval"]["image_id"])
    assert train.image(11).getpixel((5, 5)) == pytest.approx(colour(int(train.image_id(11)[5:11])), abs=4)
    assert len(open_split(str(tmp_path), "coco", "val")) == 3 and len(open_split(str(tmp_path), "coco", "test")) == 5


def test_test_only_run_on_pandas_written_files(vilt_f30k, tmp_path):
    from run import ex

    root, frames = vilt_f30k
    tiny = {"demo_train_images": 32, "demo_eval_images": 8, "max_epoch": 1, "per_gpu_batchsize": 16,
            "eval_batch_size": 16, "progress": False, "swin_depths": [1, 1, 1, 1], "embed_dim": 32}
    trained = ex.run(named_configs=["demo"], config_updates=dict(
        tiny, data_root=str(tmp_path / "demo"), observer_dir=str(tmp_path / "runs")))
    checkpoint = run_folder(trained) / "best.ckpt"
    assert checkpoint.is_file()
    run = ex.run(named_configs=["demo"], config_updates=dict(
        tiny, dataset="f30k", data_root=str(root), test_only=True, checkpoint=str(checkpoint),
        observer_dir=str(tmp_path / "runs")))
    assert run.status == "COMPLETED" and METRICS <= set(run.result)  # + per-level keys
    assert 0.0 <= run.result["i2t_r1"] <= 100.0 and 1.0 <= run.result["t2i_medr"] <= 10.0
    assert "test split of f30k" in run.captured_out


def _one_line_naming(error, *parts):
    message = str(error.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


def test_data_root_errors(tmp_path):
    for call in (lambda root: open_split(root, "coco", "test"), lambda root: check_data_root(root, "coco")):
        with pytest.raises(DataError) as error:
            call(None)
        _one_line_naming(error, "data_root is not set", "README")
        with pytest.raises(DataError) as error:
            call(str(tmp_path / "absent"))
        _one_line_naming(error, f"data_root={tmp_path / 'absent'} does not exist",
                         "python run.py prepare_data with dataset=coco")
        with pytest.raises(DataError) as error:
            call(str(tmp_path))
        _one_line_naming(error, f"data_root={tmp_path} is empty", "python -m datamodules.prepare")
    for split in ("train", "val", "test"):
        write_arrow(str(tmp_path / f"coco_caption_karpathy_{split}.arrow"), vilt_rows("coco", split, 2))
    with pytest.raises(DataError) as error:  # COCO train needs restval too
        open_split(str(tmp_path), "coco", "train")
    _one_line_naming(error, f"missing arrow file {tmp_path / 'coco_caption_karpathy_restval.arrow'} "
                            f"for the coco train split", "prepare_data with dataset=coco")
    with pytest.raises(DataError) as error:
        check_data_root(str(tmp_path), "coco")
    _one_line_naming(error, "coco_caption_karpathy_restval.arrow")
    check_data_root(str(tmp_path), "coco", ("val", "test"))  # test_only-style checks pass


def test_bad_file_errors_name_the_file(tmp_path):
    path = tmp_path / "f30k_caption_karpathy_test.arrow"
    for content in (b"not arrow at all", b""):
        path.write_bytes(content)
        with pytest.raises(DataError) as error:
            open_split(str(tmp_path), "f30k", "test")
        _one_line_naming(error, f"{path} is not an arrow IPC file", "write it again")
    for table, problem in (
            (pa.table({"image": [b"x"], "image_id": ["1.jpg"]}), "lacks column(s) ['caption']"),
            (pa.table({"image": [b"x"], "caption": ["one"], "image_id": ["1.jpg"]}),
             "column caption is string, not list<string>"),
            (pa.table({"image": ["x"], "caption": [["one"]], "image_id": ["1.jpg"]}),
             "column image is string, not binary")):
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        with pytest.raises(DataError) as error:
            open_split(str(tmp_path), "f30k", "test")
        _one_line_naming(error, str(path), problem, "datamodules.prepare")
    good = vilt_rows("f30k", "test", 3)
    rows = good[:1] + [[b"\xff\xd8 truncated jpeg", ["a"] * 5, "777.jpg", "test"]] + good[2:]
    write_like_vilt(path, rows, keep_index=True)
    data = open_split(str(tmp_path), "f30k", "test")  # opens: images decode lazily
    broken = [data.image_id(i) for i in range(3)].index("777.jpg")
    with pytest.raises(DataError) as error:
        data.image(broken)
    _one_line_naming(error, f"image 777.jpg in {path} does not decode", "write that arrow file again")
    assert data.image((broken + 1) % 3).size in SIZES  # the other images still read


def test_too_few_captions_for_the_protocol(tmp_path):
    rows = vilt_rows("f30k", "test", 4)
    rows[2][1] = rows[2][1][:3]
    write_like_vilt(tmp_path / "f30k_caption_karpathy_test.arrow", rows, keep_index=False)
    data = open_split(str(tmp_path), "f30k", "test")
    with pytest.raises(DataError) as error:
        caption_index(data, 5)
    _one_line_naming(error, "image f30k_000002.jpg in", "f30k_caption_karpathy_test.arrow has 3 captions",
                     "needs 5", "captions_per_image=None")
    assert len(caption_index(data, None)) == 5 + 6 + 3 + 6
