"""Video decoding with PyAV: a clip's bytes -> a fixed or fps-driven number of uniformly sampled frames.

Runs in DataLoader workers (it is called by :class:`nvila.core.data.shards.SampleDecoder`), so a slow
decode never blocks the training step.

Sampling:
- ``num_frames=N``: N frames at the centres of N equal segments of the clip (frame index
  ``floor((i + 0.5) * n / N)`` for a clip of ``n`` frames).
- ``fps=F``: ``ceil(duration * F)`` frames, at most ``max_frames``, sampled the same way.
- A clip with fewer frames than asked for repeats frames in order (the segment centres fall on the same
  frame), so every clip of a data set yields exactly N frames and therefore a fixed number of visual
  tokens, which temporal compressors and token budgets rely on. ``repeat_short=False`` returns the clip's
  own frames instead (fewer than N).

A clip whose stream ends well before its container says it should (a truncated file) raises
:class:`VideoDecodeError`; so does anything PyAV cannot open or decode.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import av
from PIL import Image

TRUNCATION_TOLERANCE = 0.9
"""Decoding at least this share of the frames the container announces counts as complete: encoders and
muxers are often off by a frame or two, so the last sampled indices then fall back to the last frame."""


class VideoDecodeError(ValueError):
    """A clip that cannot be decoded (corrupt, truncated, no video stream)."""


@dataclass(frozen=True)
class VideoSampling:
    """How many frames to take from each clip; picklable, so it travels into DataLoader workers."""

    num_frames: int | None = 8
    """Frames per clip, uniformly sampled (NVILA: 8 to 256); None samples by ``fps`` instead."""
    fps: float | None = None
    """Frames per second of video to sample when ``num_frames`` is None."""
    max_frames: int = 256
    """Cap on frames per clip when sampling by ``fps``."""
    repeat_short: bool = True
    """Clips shorter than ``num_frames`` repeat frames to reach it; False returns the clip's own frames."""

    def __post_init__(self) -> None:
        if self.num_frames is None and not self.fps:
            raise ValueError("video sampling needs num_frames or fps")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {self.num_frames}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {self.max_frames}")

    def count(self, total_frames: int, duration_s: float) -> int:
        """Frames to sample from a clip of ``total_frames`` frames lasting ``duration_s`` seconds."""
        if self.num_frames is not None:
            wanted = self.num_frames
        else:
            wanted = min(self.max_frames, max(1, math.ceil(duration_s * self.fps)))
        return wanted if self.repeat_short else min(wanted, total_frames)


def uniform_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices at the centres of ``count`` equal segments of ``total`` frames (repeats if short)."""
    if total < 1 or count < 1:
        return []
    return [min(total - 1, int((i + 0.5) * total / count)) for i in range(count)]


def _frame_count(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    if stream.frames:
        return stream.frames
    # Containers without a frame count (WebM, some MKV): one demuxed packet per frame, no decoding.
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return count


def _duration_s(container: av.container.InputContainer, stream: av.video.stream.VideoStream, frames: int) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    rate = float(stream.average_rate or 0)
    return frames / rate if rate else float(frames)


def decode_video(source: bytes | str | Path, sampling: VideoSampling | None = None,
                 max_pixels: int | None = None) -> list[Image.Image]:
    """Uniformly sampled RGB frames of a clip given as bytes or a path; raises VideoDecodeError if unreadable.

    ``max_pixels`` refuses a clip whose frames are larger (width x height, read from the stream's header before any
    frame is decoded): a guard against decompression bombs in clips from untrusted senders.
    """
    sampling = sampling or VideoSampling()
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            if not container.streams.video:
                raise VideoDecodeError("no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if max_pixels is not None and width * height > max_pixels:
                raise VideoDecodeError(f"frames of {width}x{height} = {width * height:,} pixels, more than the "
                                       f"limit of {max_pixels:,}")
            stream.thread_type = "AUTO"  # frame-threaded decoding inside this worker
            total = _frame_count(container, stream)
            indices = uniform_indices(total, sampling.count(total, _duration_s(container, stream, total)))
            wanted = set(indices)
            last_wanted = max(indices, default=-1)
            frames: dict[int, Image.Image] = {}
            decoded = 0
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    frames[index] = frame.to_image()  # RGB
                decoded = index + 1
                if index >= last_wanted:
                    break
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise VideoDecodeError(f"{type(exc).__name__}: {exc}") from exc
    if not frames:
        raise VideoDecodeError(f"no frame could be decoded (the container announces {total})")
    if decoded <= last_wanted and decoded < TRUNCATION_TOLERANCE * total:
        raise VideoDecodeError(f"truncated: the container announces {total} frames, only {decoded} decode")
    last = frames[max(frames)]
    return [frames.get(i, last) for i in indices]


def encode_video(frames: list[Image.Image], fps: float = 10, codec: str = "libx264",
                 path: str | Path | None = None) -> bytes:
    """Encode RGB frames as an MP4 clip (for synthetic data and tests); written to ``path`` too if given.

    With a ``path`` the index (``moov``) is placed before the frames (``faststart``), as streaming
    services do; in memory it follows them, as most cameras do.
    """
    width, height = frames[0].size
    target: str | io.BytesIO = str(path) if path is not None else io.BytesIO()
    options = {"movflags": "faststart"} if path is not None else {}
    with av.open(target, "w", format="mp4", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
        for image in frames:
            frame = av.VideoFrame.from_image(image.convert("RGB").crop((0, 0, stream.width, stream.height)))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return Path(path).read_bytes() if path is not None else target.getvalue()
