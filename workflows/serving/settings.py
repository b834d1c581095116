"""What the server accepts and how it batches: plain dataclasses, light to import (``nvila --help`` reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MediaLimits:
    """What one request may bring."""

    max_images: int = 8
    """Images in one request (all its messages together)."""
    max_videos: int = 1
    """Videos in one request."""
    max_frames: int = 32
    """Frames of a video sent as a list of images."""
    video_frames: int = 8
    """Frames sampled uniformly from a video sent as a clip (mp4, webm)."""
    max_pixels: int = 4096 * 4096
    """Pixels of one image or video frame (width x height), checked from the header before decoding."""
    max_bytes: int = 20 * 2**20
    """Bytes of one image or video, after base64 decoding."""
    allow_remote: bool = False
    """Fetch http(s) URLs (the server then makes requests wherever its clients point it); data URLs otherwise."""
    remote_timeout_s: float = 10.0


@dataclass
class ServeSettings:
    """How the server batches, queues, times out and what it accepts."""

    model_name: str = "nvila"
    """The id clients pass as ``model`` (``GET /v1/models`` lists it); another id is answered 404."""
    max_batch: int = 8
    """Most requests decoding together."""
    prefill_batch: int = 8
    """Most waiting requests prefilled together in one decoding step. Requests that arrive together are prefilled
    in one forward, much cheaper than one each; 1 makes a new prompt delay the running answers least."""
    prefill_tokens: int = 4096
    """Most tokens (prompts padded to the longest, visual tokens included) in one prefill: a long prompt is not
    batched with short ones it would pad out; one prompt longer than this is still prefilled, alone."""
    compile_decode: bool = False
    """Decode through ``torch.compile`` (``nvila.core.compiled``): faster steps; the server compiles before it
    listens (tens of seconds per batch shape) so that no request waits for it."""
    max_queue: int = 32
    """Most requests waiting for a place in the batch; one more is answered 429."""
    request_timeout_s: float = 300.0
    """A request not finished this long after it arrived is cancelled and answered 504."""
    default_max_tokens: int = 512
    """Tokens generated when a request sets no max_tokens (fewer if the context has less room left)."""
    max_body_bytes: int = 64 * 2**20
    """Largest request body (base64 media included); a larger one is answered 413."""
    media: MediaLimits = field(default_factory=MediaLimits)
