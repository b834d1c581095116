"""Helpers for the server tests: media as data URLs, and a running server on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import torch
from PIL import Image

from nvila.core.data.video import encode_video


def picture(seed: int, size: int = 32) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy())


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data, mime)}}


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG whose header announces width x height 1-bit pixels, with a few bytes of data: the shape of a
    decompression bomb (it would decode to width * height pixels)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def mp4(frames: int = 10) -> bytes:
    return encode_video([Image.new("RGB", (32, 32), (25 * i, 100, 250 - 25 * i)) for i in range(frames)])
