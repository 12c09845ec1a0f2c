"""Image transforms: HAT's crops and flips, plain resizing (the demo), CLIP's resize, crop and normalisation (Multi-SEA)."""
from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRANSFORM_NAMES = ("hat", "plain", "clip")


def build_transform(name: str, image_size: int, train: bool):
    """``hat``: RandomResizedCrop + flip for training, Resize(256/224 * size) + CenterCrop
    for testing. ``plain``: resize to size x size, no augmentation (the demo's captions
    name positions, which crops and flips would falsify). ``clip`` (Multi-SEA): bicubic
    resize of the short side to size, CenterCrop, CLIP mean/std; no augmentation, the
    same for training and testing."""
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if name == "hat":
        if train:
            return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *normalize])
        return T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size), *normalize])
    if name == "plain":
        return T.Compose([T.Resize((image_size, image_size)), *normalize])
    if name == "clip":
        return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                          T.CenterCrop(image_size), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
    raise ValueError(f"image_transform={name!r}; choose one of {TRANSFORM_NAMES}")
