"""Images and videos from chat requests: data URLs (or, where allowed, remote URLs) -> PIL images, within limits.

Everything here runs on bytes sent by strangers, so each step is checked before the next costs anything:
the counts of images, videos and frames before anything is decoded; the size of each payload before it is
base64-decoded; the media type from the bytes themselves (not from what the URL claims); and the pixel size from
the image's header, or the video stream's, before any pixel is decoded (a small PNG can announce a
gigapixel image: a decompression bomb). Every refusal is an :class:`APIError` (400) that names the content part.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from PIL import Image

from nvila.core.data.video import VideoDecodeError, VideoSampling, decode_video
from nvila.core.media import ImageRefused, open_header
from nvila.workflows.serving.protocol import (
    ROLES,
    APIError,
    ImagePart,
    Message,
    TextPart,
    VideoFramesPart,
    VideoURLPart,
)
from nvila.workflows.serving.settings import MediaLimits

IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif",
                 "BMP": "image/bmp"}
"""Image formats accepted, by Pillow's name for them (read from the bytes)."""
VIDEO_TYPES = ("video/mp4", "video/webm", "video/quicktime")
_NO_LIMIT = 2**62  # open_header's own limit is not this server's: it checks max_pixels itself, with its message
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def count_media(messages: list[Message], limits: MediaLimits) -> None:
    """Refuse a request with more images, videos or frames than ``limits`` allow, before decoding anything."""
    images = [(m, p) for m, message in enumerate(messages) for p, part in enumerate(message.content)
              if isinstance(part, ImagePart)]
    videos = [(m, p, part) for m, message in enumerate(messages) for p, part in enumerate(message.content)
              if isinstance(part, VideoURLPart | VideoFramesPart)]
    if len(images) > limits.max_images:
        m, p = images[limits.max_images]
        raise APIError(400, f"Too many images: {len(images)}, this server takes at most {limits.max_images} per "
                            "request.", param=f"messages.{m}.content.{p}", code="too_many_images")
    if len(videos) > limits.max_videos:
        m, p, _ = videos[limits.max_videos]
        raise APIError(400, f"Too many videos: {len(videos)}, this server takes at most {limits.max_videos} per "
                            "request.", param=f"messages.{m}.content.{p}", code="too_many_videos")
    for m, p, part in videos:
        if isinstance(part, VideoFramesPart) and len(part.video) > limits.max_frames:
            raise APIError(400, f"Too many video frames: {len(part.video)}, this server takes at most "
                                f"{limits.max_frames}.", param=f"messages.{m}.content.{p}.video",
                           code="too_many_frames")


async def fetch_media(messages: list[Message], limits: MediaLimits) -> dict[str, bytes]:
    """The bytes behind every remote URL in the request, by URL (only where ``limits.allow_remote``)."""
    urls = {url for message in messages for part in message.content for url in _urls(part)
            if not url.startswith("data:")}
    if not urls:
        return {}
    import httpx

    out = {}
    async with httpx.AsyncClient(timeout=limits.remote_timeout_s, follow_redirects=True) as client:
        for url in sorted(urls):
            try:
                async with client.stream("GET", url) as response:
                    response.raise_for_status()
                    data = bytearray()
                    async for piece in response.aiter_bytes():
                        data += piece
                        if len(data) > limits.max_bytes:
                            raise APIError(400, f"The media at {url} is larger than {limits.max_bytes:,} bytes.",
                                           code="media_too_large")
                    out[url] = bytes(data)
            except httpx.HTTPError as exc:
                raise APIError(400, f"Cannot fetch {url}: {exc}", code="media_fetch_failed") from None
    return out


def _urls(part: Any) -> list[str]:
    if isinstance(part, ImagePart):
        return [part.image_url.url]
    if isinstance(part, VideoURLPart):
        return [part.video_url.url]
    if isinstance(part, VideoFramesPart):
        return list(part.video)
    return []


def engine_messages(messages: list[Message], limits: MediaLimits,
                    fetched: dict[str, bytes] | None = None) -> list[dict[str, Any]]:
    """The request's messages as the engine takes them (``nvila.core.engine.ChatRequest``): text and decoded media
    as content parts. Call :func:`count_media` first, and :func:`fetch_media` for remote URLs."""
    out = []
    for m, message in enumerate(messages):
        parts: list[dict[str, Any]] = []
        for p, part in enumerate(message.content):
            where = f"messages.{m}.content.{p}"
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                data = _payload(part.image_url.url, limits, f"{where}.image_url.url", fetched)
                parts.append({"type": "image", "image": read_image(data, limits, f"{where}.image_url.url")})
            elif isinstance(part, VideoURLPart):
                param = f"{where}.video_url.url"
                parts.append({"type": "video", "video": read_clip(_payload(part.video_url.url, limits, param,
                                                                           fetched), limits, param)})
            else:
                frames = [read_image(_payload(url, limits, f"{where}.video.{i}", fetched), limits, f"{where}.video.{i}")
                          for i, url in enumerate(part.video)]
                if len({f.size for f in frames}) > 1:
                    raise APIError(400, "The frames of one video must all have the same size.", param=f"{where}.video")
                parts.append({"type": "video", "video": frames})
        out.append({"role": ROLES[message.role], "content": parts})
    return out


def _payload(url: str, limits: MediaLimits, param: str, fetched: dict[str, bytes] | None) -> bytes:
    """The bytes of a data URL, or of a remote URL already fetched; remote URLs refused unless allowed."""
    if not url.startswith("data:"):
        if not re.match(r"https?://", url, re.IGNORECASE):
            raise APIError(400, f"Unsupported URL {url[:60]!r}: send media as a base64 data URL "
                                "(data:image/png;base64,...).", param=param, code="invalid_url")
        if not limits.allow_remote:
            raise APIError(400, "Remote media URLs are turned off on this server: send the media as a base64 data "
                                "URL (data:image/png;base64,...), or start the server with --allow-remote-media.",
                           param=param, code="remote_media_disabled")
        return (fetched or {})[url]
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise APIError(400, "A data URL must be base64: data:<media type>;base64,<data>.", param=param,
                       code="invalid_data_url")
    encoded = url[match.end():]
    if len(encoded) > (limits.max_bytes + 2) // 3 * 4 + 4:
        raise APIError(400, f"The media is larger than {limits.max_bytes:,} bytes.", param=param,
                       code="media_too_large")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "The data URL's payload is not valid base64.", param=param, code="invalid_base64") from None


def read_image(data: bytes, limits: MediaLimits, param: str) -> Image.Image:
    """Decoded image bytes: the format is read from the first bytes and the pixel size from the header (through
    ``nvila.core.media``, which also handles Pillow's own bomb checks) before anything is decoded."""
    kind = _sniff(data)
    if kind not in IMAGE_FORMATS.values():
        raise APIError(400, f"Unsupported media type {kind or '(not recognised)'}: send an image as "
                            f"{', '.join(sorted(IMAGE_FORMATS.values()))}.", param=param,
                       code="unsupported_media_type" if kind else "invalid_image")
    try:
        image = open_header(data, _NO_LIMIT, name="the image")  # this server's limit and message below
    except ImageRefused as exc:
        raise APIError(400, str(exc), param=param,
                       code="image_too_large" if exc.reason == "too_large" else "invalid_image") from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > limits.max_pixels:
        raise APIError(400, f"The image is {width}x{height} = {width * height:,} pixels; this server takes images "
                            f"of 1 to {limits.max_pixels:,} pixels (a guard against decompression bombs).",
                       param=param, code="image_too_large")
    if image.format not in IMAGE_FORMATS:
        raise APIError(400, f"Unsupported image format {image.format}.", param=param, code="unsupported_media_type")
    try:
        image.load()
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError... for broken data
        raise APIError(400, f"Cannot decode the {image.format} image: {exc}", param=param,
                       code="invalid_image") from None
    return image


def read_clip(data: bytes, limits: MediaLimits, param: str) -> list[Image.Image]:
    """``limits.video_frames`` frames sampled uniformly from a clip, its frame size checked before decoding."""
    kind = _sniff(data)
    if kind not in VIDEO_TYPES:
        raise APIError(400, f"Unsupported media type {kind or 'unknown'} for a video: send "
                            f"{', '.join(VIDEO_TYPES)}, or the frames as a list of images (type 'video').",
                       param=param, code="unsupported_media_type")
    try:
        return decode_video(data, VideoSampling(num_frames=limits.video_frames), max_pixels=limits.max_pixels)
    except VideoDecodeError as exc:
        code = "video_too_large" if "more than the limit" in str(exc) else "invalid_video"
        raise APIError(400, f"Cannot use the video: {exc}.", param=param, code=code) from None


def _sniff(data: bytes) -> str | None:
    """The media type that a payload's first bytes announce (whatever its URL claimed), or None."""
    head = data[:16]
    if head[4:8] == b"ftyp":
        return "video/quicktime" if head[8:10] == b"qt" else "video/mp4"
    signatures = {b"\x1a\x45\xdf\xa3": "video/webm", b"%PDF": "application/pdf", b"PK\x03\x04": "application/zip",
                  b"RIFF": "image/webp" if data[8:12] == b"WEBP" else "audio/wav", b"ID3": "audio/mpeg",
                  b"OggS": "audio/ogg", b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg",
                  b"GIF8": "image/gif", b"BM": "image/bmp", b"II*\x00": "image/tiff", b"MM\x00*": "image/tiff",
                  b"<svg": "image/svg+xml", b"<?xml": "text/xml"}
    return next((kind for sig, kind in signatures.items() if head.startswith(sig)), None)
