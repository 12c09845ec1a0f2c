"""hat.load_model's Retriever on what callers pass: one caption or one picture alone,
wrong kinds of input, missing and undecodable image files. A tiny untrained HAT (the
demo recipe, random weights saved as a project checkpoint): no training."""
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

import hat

CAPTION = "a red square"


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    from hat.checkpoint import save_checkpoint
    from hat.defaults import default_config
    from hat.plugins import get_plugin

    config = default_config("hat", "demo", swin_depths=[1, 1, 1, 1], embed_dim=32, eval_batch_size=4)
    torch.manual_seed(0)
    model = get_plugin("hat")(config).build(pretrained=False)
    path = tmp_path_factory.mktemp("tiny") / "tiny.ckpt"
    save_checkpoint(str(path), model, config=config)
    return hat.load_model(str(path))


@pytest.fixture
def pictures(tmp_path):
    """Six random pictures saved losslessly (PNG): their paths."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(6):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(rng.integers(0, 256, (48 + index, 64, 3), dtype=np.uint8)).save(paths[-1])
    return [str(path) for path in paths]


def assert_same_features(a, b):
    """HAT's features: a list per level, or {"captions": per level, "lengths"}."""
    if isinstance(a, dict):
        assert torch.equal(a["lengths"], b["lengths"])
        a, b = a["captions"], b["captions"]
    assert len(a) == len(b)
    for level_a, level_b in zip(a, b):
        assert level_a.shape == level_b.shape and torch.equal(level_a, level_b)


def test_one_caption_is_one_text(retriever):
    one = retriever.encode_texts(CAPTION)
    assert one["lengths"].shape == (1,) and all(level.shape[0] == 1 for level in one["captions"])
    assert_same_features(one, retriever.encode_texts([CAPTION]))
    assert_same_features(retriever.encode_texts((CAPTION, "a blue circle")),
                         retriever.encode_texts([CAPTION, "a blue circle"]))


def test_one_picture_is_one_image_and_search_takes_one_path(retriever, pictures):
    path = pictures[0]
    as_list = retriever.encode_images([path])
    assert [level.shape[0] for level in as_list] == [1, 1, 1]
    for one in (path, pathlib.Path(path), Image.open(path)):
        assert_same_features(retriever.encode_images(one), as_list)
    assert retriever.search(CAPTION, path, k=3) == retriever.search([CAPTION], [path], k=3)
    assert len(retriever.search(CAPTION, path, k=3)[0]) == 1
    # a batch of paths (two loader batches of 4) encodes as the same pictures opened here
    opened = [Image.open(p).convert("RGB") for p in pictures]
    assert_same_features(retriever.encode_images(pictures), retriever.encode_images(opened))
    features = retriever.encode_images(pictures)
    assert retriever.search(CAPTION, features, k=2) == retriever.search([CAPTION], pictures, k=2)


def test_wrong_inputs_are_refused_naming_the_argument(retriever, pictures):
    with pytest.raises(TypeError) as error:
        retriever.encode_texts([CAPTION, 3])
    assert str(error.value) == "texts[1] has type int, not str; pass every caption as a str"
    with pytest.raises(TypeError, match=r"^query_texts\[0\] has type NoneType, not str; "):
        retriever.search([None], pictures)
    with pytest.raises(ValueError) as error:
        retriever.encode_texts([])
    assert str(error.value) == "texts is empty; pass at least one caption"
    with pytest.raises(ValueError) as error:
        retriever.encode_images([])
    assert str(error.value) == "images is empty; pass at least one file path or PIL image"
    with pytest.raises(TypeError) as error:
        retriever.encode_images([pictures[0], 5])
    assert str(error.value) == "images[1] has type int, not a file path or PIL image; pass paths or PIL images"
    with pytest.raises(TypeError, match=r"^images has type Tensor; pass a file path, a PIL image or a list"):
        retriever.search(CAPTION, torch.zeros(2, 3, 64, 64))


def test_missing_and_undecodable_files_are_named(retriever, pictures, tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    jpeg = tmp_path / "whole.jpg"
    Image.open(pictures[0]).save(jpeg)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg.read_bytes()[:len(jpeg.read_bytes()) // 2])
    missing = tmp_path / "missing.jpg"

    with pytest.raises(ValueError) as error:  # the second loader batch (4 per batch)
        retriever.encode_images(pictures[:5] + [str(garbage)])
    assert str(error.value) == (f"image 5 ({garbage}) cannot be decoded (UnidentifiedImageError: cannot identify "
                                f"image file '{garbage}'); pass a readable image file (JPEG, PNG, ...) or leave "
                                f"this one out")
    with pytest.raises(ValueError) as error:
        retriever.encode_images([pictures[0], truncated])
    message = str(error.value)
    assert message.startswith(f"image 1 ({truncated}) cannot be decoded (") and "\n" not in message
    with pytest.raises(FileNotFoundError) as error:
        retriever.search(CAPTION, [pictures[0], str(missing)])
    assert str(error.value) == f"image 1 ({missing}) does not exist; pass the path of an image file"
    assert [level.shape[0] for level in retriever.encode_images(jpeg)] == [1, 1, 1]  # the whole JPEG decodes
