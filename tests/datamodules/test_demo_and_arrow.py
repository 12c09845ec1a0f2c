"""The demo data set, the arrow reader/writer and HAT's tokenisation."""
import io
import os
import re
from collections import defaultdict

import pyarrow as pa
import pytest
from PIL import Image

from datamodules import DataError, open_split
from datamodules.datasets import SplitCaptions, caption_index, pad_token_ids, tokenize
from datamodules.demo import ensure_demo_data, plan_demo
from datamodules.writer import VILT_SCHEMA, write_arrow


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return ensure_demo_data(str(tmp_path_factory.mktemp("demo")), train_images=60, eval_images=40,
                            image_size=64)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hat.backbones import resolve_text_backbone

    return AutoTokenizer.from_pretrained(resolve_text_backbone("packaged-minilm"))


def test_demo_splits_have_five_captions_and_distinct_content(demo_root):
    plan = plan_demo(train_images=60, eval_images=40)
    everything = [objects for split in plan.values() for objects in split]
    assert len(set(everything)) == len(everything) == 140  # pairwise distinct in content
    for split, count in (("train", 60), ("val", 40), ("test", 40)):
        data = open_split(demo_root, "demo", split)
        assert len(data) == count
        for i in range(len(data)):
            captions = data.captions(i)
            assert len(captions) == 5 and len(set(captions)) == 5  # five varied captions
            assert data.image(i).size == (64, 64)
            for caption in captions:  # every caption names every object's colour
                for _, colour, _ in plan[split][i]:
                    assert colour in caption


def test_no_single_word_identifies_a_test_image(demo_root):
    data = open_split(demo_root, "demo", "test")
    images_with_word = defaultdict(set)
    for i in range(len(data)):
        for caption in data.captions(i):
            for word in re.findall(r"[a-z\-]+", caption):
                images_with_word[word].add(i)
    assert min(len(images) for images in images_with_word.values()) >= 2


def test_demo_generation_is_deterministic_and_cached(demo_root, tmp_path):
    other = ensure_demo_data(str(tmp_path), train_images=60, eval_images=40, image_size=64)
    a, b = open_split(demo_root, "demo", "test"), open_split(other, "demo", "test")
    assert [a.captions(i) for i in range(len(a))] == [b.captions(i) for i in range(len(b))]
    assert a.image_bytes(7) == b.image_bytes(7)
    mtime = (tmp_path / "demo_caption_test.arrow").stat().st_mtime_ns
    ensure_demo_data(str(tmp_path), train_images=60, eval_images=40, image_size=64)
    assert (tmp_path / "demo_caption_test.arrow").stat().st_mtime_ns == mtime  # not rewritten


def _jpeg(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_writer_streams_batches_and_reader_reads_back(tmp_path):
    rows = [(_jpeg((i, 0, 0)), [f"caption {i} {k}" for k in range(5 + i % 2)], f"{i}.jpg", "test")
            for i in range(7)]
    path = str(tmp_path / "f30k_caption_karpathy_test.arrow")
    assert write_arrow(path, iter(rows), batch_rows=3) == 7
    reader = pa.ipc.open_file(pa.memory_map(path))
    assert reader.num_record_batches == 3 and reader.schema.equals(VILT_SCHEMA)
    data = open_split(str(tmp_path), "f30k", "test")
    assert len(data) == 7
    assert data.captions(5) == [f"caption 5 {k}" for k in range(6)]
    assert data.image_id(3) == "3.jpg"
    assert data.image(2).getpixel((4, 4))[0] == pytest.approx(2, abs=3)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_interrupted_write_leaves_no_file(tmp_path):
    def rows():
        yield _jpeg((0, 0, 0)), ["a"], "0.jpg", "test"
        raise KeyboardInterrupt

    path = tmp_path / "x.arrow"
    with pytest.raises(KeyboardInterrupt):
        write_arrow(str(path), rows(), batch_rows=1)
    assert list(tmp_path.iterdir()) == []


def test_caption_protocol_five_per_image_or_all(tmp_path, tokenizer):
    counts = [7, 6, 8]
    rows = [(_jpeg((0, 0, 0)), [f"c{i}{k}" for k in range(n)], f"{i}.jpg", "test")
            for i, n in enumerate(counts)]
    write_arrow(str(tmp_path / "f30k_caption_karpathy_test.arrow"), rows)
    data = open_split(str(tmp_path), "f30k", "test")
    five = SplitCaptions(data, tokenizer, 32, captions_per_image=5)
    assert five.caption_to_image.tolist() == [j // 5 for j in range(15)]
    every = SplitCaptions(data, tokenizer, 32, captions_per_image=None)
    assert every.caption_to_image.tolist() == [0] * 7 + [1] * 6 + [2] * 8
    assert caption_index(data, None)[7] == (1, 0)
    assert [every[j] for j in (0, 7)] == [tokenize(tokenizer, "c00", 32), tokenize(tokenizer, "c10", 32)]
    with pytest.raises(DataError, match=r"image 1\.jpg in .*_test.arrow has 6 captions.*needs 7"):
        caption_index(data, 7)


def test_tokenize_is_cls_words_sep_truncated(tokenizer):
    ids = tokenize(tokenizer, "a red circle in the top left", 32)
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids[1:-1]) == "a red circle in the top left"
    long_ids = tokenize(tokenizer, " ".join(["red"] * 100), 32)
    assert len(long_ids) == 32 and long_ids[-1] == tokenizer.sep_token_id
    assert long_ids[1:31] == [tokenizer.convert_tokens_to_ids("red")] * 30
    input_ids, mask = pad_token_ids([ids, long_ids])
    assert input_ids.shape == (2, 32) and mask.sum(1).tolist() == [len(ids), 32]
    assert (input_ids[0, len(ids):] == 0).all()


def test_demo_sets_of_other_sizes_coexist(tmp_path):
    """A run of another demo size never rewrites the set another run is using: each size
    gets a folder of its own, and the first set stays as it was."""
    first = ensure_demo_data(str(tmp_path), train_images=6, eval_images=4, image_size=32)
    assert first == str(tmp_path)  # an empty cache_dir holds the first set itself
    test_file = tmp_path / "demo_caption_test.arrow"
    mtime = test_file.stat().st_mtime_ns
    second = ensure_demo_data(str(tmp_path), train_images=6, eval_images=3, image_size=32)
    assert second != first and second.startswith(str(tmp_path))
    assert test_file.stat().st_mtime_ns == mtime
    for root, count in ((first, 4), (second, 3)):
        assert len(open_split(root, "demo", "test")) == len(open_split(root, "demo", "val")) == count
    # asking again finds each set where it is, without generating anything
    assert ensure_demo_data(str(tmp_path), train_images=6, eval_images=3, image_size=32) == second
    assert ensure_demo_data(str(tmp_path), train_images=6, eval_images=4, image_size=32) == first
    assert test_file.stat().st_mtime_ns == mtime


def test_default_demo_folder_names_every_size(tmp_path, monkeypatch):
    monkeypatch.setenv("HAT_CACHE", str(tmp_path))
    a = ensure_demo_data(train_images=5, eval_images=2, image_size=32)
    b = ensure_demo_data(train_images=5, eval_images=3, image_size=32)
    assert os.path.dirname(a) == os.path.dirname(b) == str(tmp_path) and a != b
    assert os.path.basename(a) == "demo-v2-5x2-32px-seed0"
    assert len(open_split(a, "demo", "test")) == 2 and len(open_split(b, "demo", "test")) == 3
