"""What the tests of hat.search share: the demo test split's 200 pictures written as
JPEG files (their bytes as the arrow file holds them), and a tiny HAT and a tiny
Multi-SEA of the demo architecture with random weights saved as project checkpoints
(no training: the scores of random weights are distinct, which is all the comparisons
need)."""
import os
import shutil
from pathlib import Path

import pytest
import torch

HAT_TINY = {"swin_depths": [1, 1, 1, 1], "embed_dim": 32, "eval_batch_size": 16}
MULTISEA_TINY = {"vision_depth": 2, "embed_dim": 32, "fusion_heads": 2, "fusion_layers": 2, "queue_size": 32,
                 "top_k": 8, "itm_layers": [2], "eval_batch_size": 16,
                 "image_backbone_kwargs": {"patch_size": 16, "embed_dim": 32, "num_heads": 2}}
TINY = {"hat": HAT_TINY, "multisea": MULTISEA_TINY}


def write_checkpoint(path, model: str, seed: int = 0) -> str:
    """A tiny ``model`` of the demo architecture with random weights (``seed``), saved as
    a project checkpoint at ``path``."""
    from hat.checkpoint import save_checkpoint
    from hat.defaults import default_config
    from hat.plugins import get_plugin

    config = default_config(model, "demo", **TINY[model])
    torch.manual_seed(seed)
    save_checkpoint(str(path), get_plugin(model)(config).build(pretrained=False), config=config)
    return str(path)


@pytest.fixture(scope="session")
def demo_split(tmp_path_factory):
    """The demo set's test split (200 pictures, 5 captions each), as an ArrowSplit."""
    from datamodules.arrow import open_split
    from datamodules.demo import ensure_demo_data

    root = ensure_demo_data(str(tmp_path_factory.mktemp("demo")), train_images=8, eval_images=200)
    return open_split(root, "demo", "test")


@pytest.fixture(scope="session")
def demo_pictures(tmp_path_factory, demo_split) -> Path:
    """A folder of the split's 200 JPEG files: every third in sub/, every seventh with an
    upper-case .JPG extension (the index reads folders recursively, extensions in any case)."""
    folder = tmp_path_factory.mktemp("pictures")
    (folder / "sub").mkdir()
    for index in range(len(demo_split)):
        place = folder / "sub" if index % 3 == 0 else folder
        (place / f"demo{index:03d}.{'JPG' if index % 7 == 0 else 'jpg'}").write_bytes(demo_split.image_bytes(index))
    return folder


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("checkpoints")
    return {model: write_checkpoint(folder / f"{model}.ckpt", model) for model in TINY}


@pytest.fixture(scope="session")
def queries(demo_split) -> list[str]:
    """Three captions of the split and a sentence of no picture."""
    return [demo_split.captions(3)[0], demo_split.captions(77)[2], demo_split.captions(150)[4],
            "a dog on the beach"]


@pytest.fixture(scope="session")
def demo_indexes(tmp_path_factory, demo_pictures, checkpoints) -> dict:
    """model -> the index folder of the 200 pictures (shards of 64, batches of 16)."""
    from hat.search import build_index

    out = tmp_path_factory.mktemp("indexes")
    return {model: build_index(checkpoint, demo_pictures, out=out / model, batch_size=16, shard_size=64,
                               progress=False).out
            for model, checkpoint in checkpoints.items()}


def copy_pictures(source: Path, target: Path, count: int | None = None) -> list[str]:
    """The first ``count`` pictures of ``source`` (sorted relative paths) copied into
    ``target`` with their mtimes -> their relative paths."""
    paths = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())[:count]
    for path in paths:
        os.makedirs(target / os.path.dirname(path), exist_ok=True)
        shutil.copy2(source / path, target / path)
    return paths


_LOADED: dict = {}  # (checkpoint content digest, device) -> Retriever


@pytest.fixture(autouse=True)
def load_each_model_once(monkeypatch):
    """hat.search loads the checkpoint's Retriever on every build and open (about a second
    each here); the tests load each checkpoint content once per session and share it (a
    Retriever is not changed by encoding or scoring; a copy of a checkpoint shares the
    Retriever of the original)."""
    import hat.search.build as build
    import hat.search.index as index
    from hat.fingerprint import file_digest

    load = build.load_retriever

    def loaded(checkpoint, device):
        key = (file_digest(checkpoint), str(device))
        if key not in _LOADED:
            _LOADED[key] = load(checkpoint, device)
        return _LOADED[key]

    monkeypatch.setattr(build, "load_retriever", loaded)
    monkeypatch.setattr(index, "load_retriever", loaded)
