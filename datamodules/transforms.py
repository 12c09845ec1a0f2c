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
    mean, std = (CLIP_MEAN, CLIP_STD) if name == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    tensor = [T.ToTensor(), T.Normalize(mean, std)]
    if name == "hat" and train:
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *tensor])
    return T.Compose([*view_transform(name, image_size).transforms, *tensor])


def view_transform(name: str, image_size: int) -> T.Compose:
    """The geometric part of the test-time transform (PIL image -> PIL image): the image
    as the model sees it at test time, before tensor conversion and normalisation (what
    the gallery draws attention maps over)."""
    if name == "hat":
        return T.Compose([T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)])
    if name == "plain":
        return T.Compose([T.Resize((image_size, image_size))])
    if name == "clip":
        return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)])
    raise ValueError(f"image_transform={name!r}; choose one of {TRANSFORM_NAMES}")
