"""Decoding checks for images and masks (Pillow), with limits against decompression bombs."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image


class ImageError(ValueError):
    """The bytes are not a usable image; the message is the reason for the report."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str


def check_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Decode fully once, so a truncated or hostile file is caught here, not in training."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:
                    raise ImageError(f"image of {image.width}x{image.height} pixels is over the limit")
                if image.format not in ("PNG", "JPEG"):
                    raise ImageError(f"image format {image.format} is not PNG or JPEG")
                image.load()
                return ImageInfo(image.width, image.height, image.format)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError("image is a decompression bomb") from None
    except Exception:  # Pillow raises many types for broken files
        raise ImageError("image cannot be decoded") from None


def mask_values(data: bytes) -> tuple[int, int, set[int]]:
    """Width, height and the set of pixel values of a mask PNG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                raise ImageError("mask is not a PNG")
            if image.mode not in ("L", "P", "I", "I;16", "1"):
                raise ImageError(f"mask mode {image.mode} is not single-channel")
            array = np.asarray(image)
            return image.width, image.height, {int(v) for v in np.unique(array)}
    except ImageError:
        raise
    except Exception:
        raise ImageError("mask cannot be decoded") from None
