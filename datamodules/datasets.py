"""Torch datasets and loaders over an ArrowSplit.

* CaptionPairs: one item per caption (with its image) - training batches.
* SplitImages: one item per image - evaluation encodes each image once.
* SplitCaptions: one item per caption, with caption_to_image - evaluation.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.arrow import ArrowSplit, DataError
from datamodules.sampler import GlobalBatchSampler


def tokenize(tokenizer, text: str, max_text_len: int) -> list[int]:
    """HAT's tokenisation: [CLS] + at most max_text_len - 2 word-pieces + [SEP]."""
    return tokenizer(text, truncation=True, max_length=max_text_len)["input_ids"]


def pad_token_ids(sequences: list[list[int]], pad_id: int = 0):
    """Pad to the longest sequence -> input_ids, attention_mask [B, L] (long)."""
    length = max(len(s) for s in sequences)
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


def collate_pairs(batch):
    images, tokens, image_index = zip(*batch)
    input_ids, attention_mask = pad_token_ids(list(tokens))
    return {
        "images": torch.stack(images),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_index": torch.tensor(image_index, dtype=torch.long),
    }


def collate_captions(batch):
    input_ids, attention_mask = pad_token_ids(list(batch))
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def train_loader(dataset: CaptionPairs, batch_size: int, num_workers: int, seed: int,
                 rank: int = 0, world_size: int = 1):
    """Loader over global batches of ``batch_size`` (this rank's slice of each); call
    ``loader.batch_sampler.set_epoch(epoch, start_batch)`` before every epoch."""
    sampler = GlobalBatchSampler(len(dataset), batch_size, seed, rank, world_size)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_pairs, persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def image_loader(dataset: SplitImages, batch_size: int, num_workers: int):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def caption_loader(dataset: SplitCaptions, batch_size: int, num_workers: int):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_captions)
