"""Multi-SEA's data pieces: the CLIP transform, one caption per image per epoch, fixed-length padding."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import open_split
from datamodules.datasets import OneCaptionPerImage, collate_pairs, pad_token_ids, train_loader
from datamodules.transforms import build_transform
from datamodules.writer import write_arrow

CAPTION_COUNTS = [5, 1, 7, 0, 6, 5, 2, 5, 5, 3, 5, 5, 6, 5]  # image 3 has none: left out


class CaptionTokens:
    """A tokenizer stand-in: "image I caption K" -> [0, I, K, 2]."""

    def __call__(self, text, truncation, max_length):
        words = text.split()
        return {"input_ids": [0, int(words[1]), int(words[3]), 2][:max_length]}


def _jpeg(index):
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), (index * 15, 80, 200 - index * 9)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("multisea_data")
    rows = [(_jpeg(i), [f"image {i} caption {k}" for k in range(n)], f"{i}.jpg", "train")
            for i, n in enumerate(CAPTION_COUNTS)]
    write_arrow(str(root / "f30k_caption_karpathy_train.arrow"), rows)
    return open_split(str(root), "f30k", "train")


def _dataset(split, seed=3):
    return OneCaptionPerImage(split, CaptionTokens(), build_transform("clip", 8, train=True), 40, seed)


def _pairs(loader, epoch, start_batch=0):
    """(image, caption) of every item the loader yields in ``epoch``, in order."""
    loader.batch_sampler.set_epoch(epoch, start_batch)
    pairs = []
    for batch in loader:
        assert torch.equal(batch["input_ids"][:, 1], batch["image_index"])
        pairs += [(int(i), int(k)) for i, k in batch["input_ids"][:, 1:3]]
    return pairs


def test_clip_transform_is_bicubic_short_side_resize_centre_crop_and_clip_statistics():
    generator = np.random.default_rng(0)
    picture = Image.fromarray(generator.integers(0, 256, (30, 40, 3), dtype=np.uint8))  # W 40, H 30
    expected = picture.resize((85, 64), Image.BICUBIC).crop((10, 0, 74, 64))  # int(64 * 40 / 30) = 85
    pixels = torch.from_numpy(np.asarray(expected, dtype=np.float32) / 255).permute(2, 0, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    for train in (True, False):  # no augmentation: training and testing alike
        out = build_transform("clip", 64, train=train)(picture)
        assert out.shape == (3, 64, 64)
        assert torch.allclose(out, (pixels - mean) / std, atol=1e-6)


def test_one_caption_per_image_is_a_function_of_seed_epoch_and_image(split):
    data = _dataset(split)
    assert len(data) == 13 and data.images == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    image, tokens, index = data[(4, 2)]
    assert index == 2 and tokens == [0, 2, data.caption_choice(4, 2), 2] and image.shape == (3, 8, 8)
    assert [data.caption_choice(4, j) for j in range(13)] == [_dataset(split).caption_choice(4, j)
                                                              for j in range(13)]
    epochs = [[data.caption_choice(epoch, j) for j in range(13)] for epoch in range(60)]
    several = [j for j in range(13) if data.caption_counts[j] > 1]
    changed = sum(epochs[0][j] != epochs[1][j] for j in several)
    assert changed >= len(several) // 3  # a new draw each epoch
    for j in range(13):  # every caption is drawn, and only existing ones
        assert {epoch[j] for epoch in epochs} == set(range(data.caption_counts[j]))
    other_seed = _dataset(split, seed=4)
    assert [other_seed.caption_choice(0, j) for j in several] != [epochs[0][j] for j in several]


def test_same_items_for_any_world_size_resume_point_and_worker_count(split):
    data = _dataset(split)
    single = train_loader(data, batch_size=4, num_workers=0, seed=11)
    assert len(single.batch_sampler) == 3
    full = {epoch: _pairs(single, epoch) for epoch in (0, 1)}
    assert full[0] != full[1] and len(full[0]) == 12
    for pairs in full.values():  # the caption of each image, no image twice in an epoch
        assert len({image for image, _ in pairs}) == 12
    ranks = [train_loader(data, 4, 0, 11, rank=rank, world_size=2) for rank in (0, 1)]
    per_rank = [_pairs(loader, 1) for loader in ranks]
    merged = [pair for batch in range(3) for rank in (0, 1) for pair in per_rank[rank][2 * batch:2 * batch + 2]]
    assert merged == full[1]
    assert _pairs(single, 1, start_batch=2) == full[1][8:]  # resumed mid-epoch
    workers = train_loader(data, 4, num_workers=2, seed=11)  # persistent workers see each epoch
    assert [_pairs(workers, epoch) for epoch in (0, 1)] == [full[0], full[1]]


def test_padding_to_a_fixed_length_with_the_tokenizers_pad_id():
    input_ids, mask = pad_token_ids([[0, 7, 2], [0, 5, 6, 9, 2]], pad_id=1, pad_to=6)
    assert input_ids.tolist() == [[0, 7, 2, 1, 1, 1], [0, 5, 6, 9, 2, 1]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    batch = collate_pairs([(torch.zeros(3, 2, 2), [0, 7, 2], 4), (torch.ones(3, 2, 2), [0, 5, 2], 9)])
    assert batch["input_ids"].tolist() == [[0, 7, 2], [0, 5, 2]]  # HAT: longest, pad 0
    assert batch["image_index"].tolist() == [4, 9] and batch["images"].shape == (2, 3, 2, 2)
    with pytest.raises(ValueError, match="5 tokens does not fit pad_to=4"):
        pad_token_ids([[0, 5, 6, 9, 2]], pad_to=4)


def test_a_batch_that_does_not_divide_by_the_processes_is_shared_unevenly():
    """5 pairs on 3 processes: 2 + 2 + 1, contiguous, their union the single process's batch."""
    from datamodules.sampler import GlobalBatchSampler, rank_shares

    assert rank_shares(58, 4) == [15, 15, 14, 14] and rank_shares(8, 2) == [4, 4]
    single = list(GlobalBatchSampler(17, 5, seed=2))
    ranks = [list(GlobalBatchSampler(17, 5, seed=2, rank=rank, world_size=3)) for rank in range(3)]
    assert len(single) == 3 and all(len(batches) == 3 for batches in ranks)
    for batch, items in enumerate(single):
        assert [len(r[batch]) for r in ranks] == [2, 2, 1]
        assert ranks[0][batch] + ranks[1][batch] + ranks[2][batch] == items
    with pytest.raises(ValueError, match="batch size 2 leaves a process of the 3 without pairs"):
        GlobalBatchSampler(17, 2, seed=2, world_size=3)
