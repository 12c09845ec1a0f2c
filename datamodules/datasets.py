"""Torch datasets and loaders over an ArrowSplit.

* CaptionPairs: one item per caption (with its image) - HAT's training batches.
* OneCaptionPerImage: one item per image with one of its captions, drawn anew every
  epoch - Multi-SEA's training batches.
* SplitImages: one item per image - evaluation encodes each image once.
* SplitCaptions: one item per caption, with caption_to_image - evaluation.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.arrow import ArrowSplit, DataError
from datamodules.sampler import GlobalBatchSampler


def tokenize(tokenizer, text: str, max_text_len: int) -> list[int]:
    """HAT's tokenisation: [CLS] + at most max_text_len - 2 word-pieces + [SEP]."""
    return tokenizer(text, truncation=True, max_length=max_text_len)["input_ids"]


def pad_id_of(tokenizer) -> int:
    """The id captions are padded with: the tokenizer's pad token (0 when it has none)."""
    return tokenizer.pad_token_id or 0


def pad_token_ids(sequences: list[list[int]], pad_id: int = 0, pad_to: int | None = None):
    """Pad to the longest sequence, or to ``pad_to`` tokens (Multi-SEA pads every caption
    to max_text_len) -> input_ids, attention_mask [B, L] (long)."""
    length = max(len(s) for s in sequences)
    if pad_to is not None:
        if length > pad_to:
            raise ValueError(f"a caption of {length} tokens does not fit pad_to={pad_to}")
        length = pad_to
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def caption_index(split: ArrowSplit, captions_per_image: int | None):
    """(image index, caption index within the image) for every caption used.

    captions_per_image=5 is the standard test protocol (the first five captions of each
    image, caption 5i+k belongs to image i); None keeps every caption."""
    pairs = []
    for image in range(len(split)):
        count = len(split.captions(image))
        if captions_per_image is not None:
            if count < captions_per_image:
                raise DataError(
                    f"image {split.image_id(image)} in {split.source(image)} has {count} captions, the "
                    f"protocol needs {captions_per_image}; set captions_per_image=None to keep all"
                )
            count = captions_per_image
        pairs.extend((image, k) for k in range(count))
    return pairs


class CaptionPairs(Dataset):
    """Training items: (image tensor, token ids, image index), one per caption."""

    def __init__(self, split: ArrowSplit, tokenizer, transform, max_text_len: int):
        self.split, self.tokenizer, self.transform = split, tokenizer, transform
        self.max_text_len = max_text_len
        self.pairs = caption_index(split, None)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image, k = self.pairs[index]
        tokens = tokenize(self.tokenizer, self.split.captions(image)[k], self.max_text_len)
        return self.transform(self.split.image(image)), tokens, image


class OneCaptionPerImage(Dataset):
    """Training items (image tensor, token ids, image index), one per image (images
    without captions are left out); the caption is drawn uniformly among the image's
    captions, anew every epoch, as a function of (seed, epoch, image) only.

    Items are addressed as (epoch, index): use it with ``train_loader``, whose sampler
    yields such pairs, so that the draw is the same for any number of processes or
    workers and after a resume mid-epoch."""

    epoch_items = True  # train_loader: the sampler yields (epoch, index) pairs

    def __init__(self, split: ArrowSplit, tokenizer, transform, max_text_len: int, seed: int):
        self.split, self.tokenizer, self.transform = split, tokenizer, transform
        self.max_text_len, self.seed = max_text_len, seed
        counts = [len(split.captions(image)) for image in range(len(split))]
        self.images = [image for image, count in enumerate(counts) if count]
        self.caption_counts = [counts[image] for image in self.images]

    def __len__(self):
        return len(self.images)

    def caption_choice(self, epoch: int, index: int) -> int:
        """Which caption of item ``index`` epoch ``epoch`` uses (0-based, within the image):
        a draw seeded with (seed, epoch, the image's row in the split)."""
        entropy = [self.seed % 2**63, epoch, self.images[index]]
        return int(np.random.default_rng(entropy).integers(self.caption_counts[index]))

    def __getitem__(self, item):
        epoch, index = item
        image = self.images[index]
        caption = self.split.captions(image)[self.caption_choice(epoch, index)]
        tokens = tokenize(self.tokenizer, caption, self.max_text_len)
        return self.transform(self.split.image(image)), tokens, image


class SplitImages(Dataset):
    def __init__(self, split: ArrowSplit, transform):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        return self.transform(self.split.image(index))


class SplitCaptions(Dataset):
    def __init__(self, split: ArrowSplit, tokenizer, max_text_len: int, captions_per_image=5):
        self.split, self.tokenizer, self.max_text_len = split, tokenizer, max_text_len
        self.pairs = caption_index(split, captions_per_image)
        self.caption_to_image = torch.tensor([image for image, _ in self.pairs], dtype=torch.long)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image, k = self.pairs[index]
        return tokenize(self.tokenizer, self.split.captions(image)[k], self.max_text_len)


def collate_pairs(batch, pad_id: int = 0, pad_to: int | None = None):
    images, tokens, image_index = zip(*batch)
    input_ids, attention_mask = pad_token_ids(list(tokens), pad_id, pad_to)
    return {
        "images": torch.stack(images),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_index": torch.tensor(image_index, dtype=torch.long),
    }


def collate_captions(batch, pad_id: int = 0, pad_to: int | None = None):
    input_ids, attention_mask = pad_token_ids(list(batch), pad_id, pad_to)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def train_loader(dataset: CaptionPairs | OneCaptionPerImage, batch_size: int, num_workers: int,
                 seed: int, rank: int = 0, world_size: int = 1, pad_id: int = 0,
                 pad_to: int | None = None, pin_memory: bool = False):
    """Loader over global batches of ``batch_size`` (this rank's slice of each); call
    ``loader.batch_sampler.set_epoch(epoch, start_batch)`` before every epoch. Captions
    are padded with ``pad_id`` (the tokenizer's pad_token_id) to the longest in the
    batch, or to ``pad_to`` tokens. ``pin_memory``: batches in page-locked memory (CUDA)."""
    sampler = GlobalBatchSampler(len(dataset), batch_size, seed, rank, world_size,
                                 with_epoch=getattr(dataset, "epoch_items", False))
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      collate_fn=partial(collate_pairs, pad_id=pad_id, pad_to=pad_to),
                      persistent_workers=num_workers > 0, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed))


def image_loader(dataset: SplitImages, batch_size: int, num_workers: int):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def caption_loader(dataset: SplitCaptions, batch_size: int, num_workers: int, pad_id: int = 0,
                   pad_to: int | None = None):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=partial(collate_captions, pad_id=pad_id, pad_to=pad_to))
