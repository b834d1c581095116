"""Images from untrusted bytes or files: the size is read from the header and held to a pixel limit before
anything is decoded, so that a small file claiming a huge image ("decompression bomb") costs nothing.

Training, evaluation, conversion, generation and the server all open images here. The limit is
``max_pixels`` where a caller passes one, else the ``NVILA_MAX_IMAGE_PIXELS`` environment variable, else
:data:`DEFAULT_MAX_PIXELS`.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image

from nvila.core.errors import NvilaError

DEFAULT_MAX_PIXELS = 50_000_000
"""Width x height above which an image is refused (about 7070 x 7070; 150 MB decoded as RGB)."""
ENV_MAX_PIXELS = "NVILA_MAX_IMAGE_PIXELS"


class ImageRefused(NvilaError):
    """An image that was not decoded: ``reason`` is ``too_large`` (past the pixel limit) or ``unreadable``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def max_image_pixels(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels``, else ``$NVILA_MAX_IMAGE_PIXELS``, else the default."""
    if max_pixels is None:
        text = os.environ.get(ENV_MAX_PIXELS, "")
        try:
            max_pixels = int(text) if text.strip() else DEFAULT_MAX_PIXELS
        except ValueError:
            raise NvilaError(f"{ENV_MAX_PIXELS}={text!r} is not a whole number of pixels.") from None
    if max_pixels < 1:
        raise NvilaError(f"the image pixel limit must be at least 1, got {max_pixels}.")
    return max_pixels


def _name(source: bytes | str | Path, name: str | None) -> str:
    return name or ("image" if isinstance(source, bytes) else f"'{source}'")


def open_header(source: bytes | str | Path, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
    """The image opened lazily (header read, pixels not decoded); :class:`ImageRefused` past the limit."""
    limit, what = max_image_pixels(max_pixels), _name(source, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as exc:  # not an OSError: PIL's own, higher limit
        raise ImageRefused("too_large", f"{what} is too large to decode: {exc}") from None
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError... for a broken header
        raise ImageRefused("unreadable", f"{what} cannot be read as an image: {type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > limit:
        image.close()
        raise ImageRefused("too_large", f"{what} is {width}x{height} = {width * height:,} pixels, more than the "
                                        f"limit of {limit:,} (set {ENV_MAX_PIXELS} or data.max_image_pixels to "
                                        "raise it); it was not decoded.")
    return image


def open_image(source: bytes | str | Path, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
    """The image decoded, after its header passed the pixel limit; :class:`ImageRefused` otherwise."""
    image = open_header(source, max_pixels, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Exception as exc:
        raise ImageRefused("unreadable", f"{_name(source, name)} cannot be decoded: {type(exc).__name__}: "
                                         f"{exc}") from None
    return image


def open_images(sources: list[bytes | str | Path], max_pixels: int | None = None,
                names: list[str] | None = None) -> list[Image.Image]:
    """Several images, every header checked before any is decoded (one oversized image costs nothing)."""
    names = names or [None] * len(sources)
    headers = [open_header(s, max_pixels, n) for s, n in zip(sources, names)]
    for header in headers:
        header.close()
    return [open_image(s, max_pixels, n) for s, n in zip(sources, names)]
