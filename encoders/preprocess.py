"""Image preprocessing shared by encoders: decoding checks, mode conversion, EXIF orientation, resize, normalise.

Every encoder's processor goes through :func:`load_rgb`, so a broken or absurd image fails the same way
everywhere: one :class:`ImageError` that names the image and, for size limits, the setting to change.

Two choices are settings of the encoders that offer them (``alpha``, ``exif_rotate``): nvila's own models
composite transparent pixels onto white and turn EXIF-rotated photos upright; released NVILA models were
trained on ``image.convert("RGB")`` (alpha dropped, EXIF orientation ignored), so a model loaded from an
official checkpoint sets ``alpha: drop, exif_rotate: false`` to see the pixels its weights were trained on.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from nvila.core.errors import NvilaError
from nvila.core.interfaces import ImageProcessor, PreparedImage, TilePlan
from nvila.encoders.configs import (  # noqa: F401  (ALPHA_MODES, check_decoding: still importable from here)
    ALPHA_MODES,
    DEFAULT_MAX_PIXELS,
    check_decoding,
)


class ImageError(NvilaError, ValueError):
    """An image that cannot be used: undecodable, truncated, empty, or beyond the pixel limit."""


def describe(image: Image.Image) -> str:
    """How to name an image in an error: its file name when it has one, else its mode and size."""
    name = getattr(image, "filename", "") or ""
    return f"image '{name}'" if name else f"{image.mode} image of {image.width}x{image.height}"


def check_size(image: Image.Image, max_pixels: int) -> None:
    """Refuse empty images and images above ``max_pixels`` (checked before any pixel is decoded)."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"The {describe(image)} is empty ({width}x{height} pixels).")
    if width * height > max_pixels:
        raise ImageError(f"The {describe(image)} has {width}x{height} = {width * height:,} pixels, more than "
                         f"the encoder's max_pixels limit of {max_pixels:,} (a guard against decompression "
                         "bombs). Downscale the image, or raise `max_pixels` in the encoder spec.")


def load_rgb(image: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS, alpha: str = "white",
             exif_rotate: bool = True) -> Image.Image:
    """Size-check, decode and convert an image to 8-bit RGB (see :func:`to_rgb`), with a clear error on failure."""
    check_size(image, max_pixels)
    try:
        rgb = to_rgb(image, alpha, exif_rotate)
    except (OSError, ValueError, SyntaxError) as exc:  # truncated data, corrupt headers, odd modes
        raise ImageError(f"Cannot decode the {describe(image)}: {exc}") from None
    check_size(rgb, max_pixels)  # EXIF rotation swaps the sides; the area stays the same
    return rgb


def open_image(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open a file path or encoded bytes, check its size from the header, decode it fully."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageError(f"Cannot open image '{name}': {exc}") from None
    check_size(image, max_pixels)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"Cannot decode image '{name}': {exc}") from None
    return image


def to_rgb(image: Image.Image, alpha: str = "white", exif_rotate: bool = True) -> Image.Image:
    """Any PIL image (grayscale, RGBA, palette, CMYK, 16-bit) as 8-bit RGB.

    ``alpha="white"`` composites transparent pixels onto white; ``"drop"`` discards the alpha channel, as
    ``convert("RGB")`` does. ``exif_rotate`` turns the image upright by its EXIF orientation. 16-bit images are
    scaled from their full range.
    """
    if exif_rotate:
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float32)  # (H, W), 0..65535 by definition of the mode
        image = Image.fromarray((array / 65535.0 * 255.0).round().clip(0, 255).astype(np.uint8), mode="L")
    elif image.mode == "I":  # 32-bit integers carry no range; 16-bit PNGs decode here on some Pillows
        array = np.asarray(image, dtype=np.float32)  # (H, W)
        scale = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((array / scale * 255.0).round().clip(0, 255).astype(np.uint8), mode="L")
    if alpha == "white" and image.mode in ("RGBA", "LA", "P", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def to_tensor(image: Image.Image, size: tuple[int, int], mean: Sequence[float],
              std: Sequence[float]) -> torch.Tensor:
    """RGB image resized to ``size`` (H, W) with bicubic filtering -> normalised (3, H, W) float tensor.

    Pillow returns an unchanged copy when the size already matches, so tiles are never resampled twice.
    """
    resized = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    array = torch.from_numpy(np.array(resized, dtype=np.uint8))  # (H, W, 3)
    pixels = array.permute(2, 0, 1).float()  # (3, H, W); keeps the channels-last strides, which is 2-5x faster
    mean_t = torch.tensor(mean, dtype=torch.float32, device="cpu")[:, None, None]  # CPU even under a meta default
    std_t = torch.tensor(std, dtype=torch.float32, device="cpu")[:, None, None]
    return pixels.div_(255.0).sub_(mean_t).div_(std_t)


class TileProcessor(ImageProcessor):
    """The whole image resized to one square tile and normalised: a single-tile encoder's preprocessing."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 max_pixels: int = DEFAULT_MAX_PIXELS, alpha: str = "white", exif_rotate: bool = True) -> None:
        self.image_size, self.mean, self.std, self.max_pixels = image_size, tuple(mean), tuple(std), max_pixels
        self.alpha, self.exif_rotate = alpha, exif_rotate

    def __call__(self, image: Image.Image) -> PreparedImage:
        rgb = load_rgb(image, self.max_pixels, self.alpha, self.exif_rotate)
        pixels = to_tensor(rgb, (self.image_size, self.image_size), self.mean, self.std)  # (3, S, S)
        return PreparedImage(pixels[None], grid=(1, 1))  # (1, 3, S, S)

    def plan(self, width: int, height: int) -> TilePlan:
        return TilePlan(tiles=1, grid=(1, 1))

    def tile_grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of tiles at the largest scale: always one tile."""
        return (1, 1)
