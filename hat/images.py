"""Pictures as the models see them: one way to open an image file, shared by
`hat.load_model`'s Retriever and the search index (`hat.search`), so that both encode the
same pixels.

`open_image` decodes a file completely (a truncated file fails here, not later) and
`to_rgb` turns any PIL image into RGB: the EXIF orientation applied
(`PIL.ImageOps.exif_transpose`: a phone picture taken upright is upright, whatever way
its pixels are stored), transparency (RGBA, LA, PA, or a palette / grey / RGB image with
a transparent colour) composited over white, every other mode (L, 1, CMYK, I;16, ...)
converted as Pillow converts it. A picture whose EXIF block cannot be read keeps its
stored orientation.
"""
from __future__ import annotations

import struct

from PIL import Image, ImageOps

from datamodules.arrow import one_line

# the file names the search index encodes (compared in lower case)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited over
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# what a broken EXIF block raises in exif_transpose (the picture is then used as stored)
EXIF_ERRORS = (SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error)
# what Pillow raises for a file it cannot decode: OSError (UnidentifiedImageError and
# truncated data included), SyntaxError, ValueError, DecompressionBombError
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageDecodeError(ValueError):
    """A file that PIL cannot decode; ``reason``: what Pillow said, in one line."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB, upright as its EXIF orientation says, transparency over white
    (a new image; ``image`` is left as it is)."""
    try:
        image = ImageOps.exif_transpose(image)
    except EXIF_ERRORS:
        pass  # an unreadable orientation: the pixels as stored
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path, index: int | None = None) -> Image.Image:
    """The picture at ``path`` in RGB (`to_rgb`), decoded completely. A missing file is a
    FileNotFoundError, one that PIL cannot decode (or a folder, or no permission to read
    it) an `ImageDecodeError` (a ValueError); both one line naming ``path`` (and
    ``index``, its position in the caller's list, when given)."""
    name = f"image {path}" if index is None else f"image {index} ({path})"
    try:
        with Image.open(path) as opened:
            return to_rgb(opened)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name} does not exist; pass the path of an image file") from None
    except DECODE_ERRORS as error:
        reason = f"{type(error).__name__}: {one_line(error)}"
        raise ImageDecodeError(f"{name} cannot be decoded ({reason}); pass a readable image file (JPEG, PNG, "
                               f"...) or leave this one out", reason) from None
