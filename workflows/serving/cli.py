"""``nvila serve`` options -> :class:`ServeSettings`; light to import (no web framework, no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nvila.core.errors import NvilaError
from nvila.workflows.serving.settings import MediaLimits, ServeSettings

_SERVE, _MEDIA = ServeSettings(), MediaLimits()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``nvila serve`` options."""
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint directory: nvila's (spec.yaml, model.safetensors) or a released NVILA one")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None,
                        help="the model id clients send and /v1/models lists (default: the checkpoint folder's name)")
    parser.add_argument("--max-batch", type=int, default=_SERVE.max_batch, help="most requests decoding together")
    parser.add_argument("--prefill-batch", type=int, default=_SERVE.prefill_batch,
                        help="most waiting requests prefilled together in one step")
    parser.add_argument("--prefill-tokens", type=int, default=_SERVE.prefill_tokens,
                        help="most tokens in one prefill, prompts padded to the longest (a longer prompt goes alone)")
    parser.add_argument("--max-queue", type=int, default=_SERVE.max_queue,
                        help="most requests waiting for a place in the batch; more are answered 429")
    parser.add_argument("--timeout", type=float, default=_SERVE.request_timeout_s,
                        help="seconds a request may take in all before it is cancelled (504)")
    parser.add_argument("--default-max-tokens", type=int, default=_SERVE.default_max_tokens,
                        help="answer length when a request sets no max_tokens")
    parser.add_argument("--compile", action="store_true",
                        help="decode through torch.compile: faster tokens; compiles before listening (tens of "
                             "seconds; needs a C++ compiler on a CPU)")
    parser.add_argument("--max-images", type=int, default=_MEDIA.max_images, help="images per request")
    parser.add_argument("--max-frames", type=int, default=_MEDIA.max_frames,
                        help="frames of a video sent as a list of images")
    parser.add_argument("--video-frames", type=int, default=_MEDIA.video_frames,
                        help="frames sampled from a video sent as an mp4/webm data URL")
    parser.add_argument("--max-pixels", type=int, default=_MEDIA.max_pixels,
                        help="largest image or video frame, width x height (checked before decoding)")
    parser.add_argument("--max-media-mb", type=float, default=_MEDIA.max_bytes / 2**20,
                        help="largest image or video, in MiB")
    parser.add_argument("--allow-remote-media", action="store_true",
                        help="fetch http(s) image and video URLs (off: only base64 data URLs); the server then "
                             "makes requests wherever its clients point it")


def settings(args: argparse.Namespace) -> ServeSettings:
    """The settings the options describe; refuses values that make no sense."""
    wholes = {"--max-batch": args.max_batch, "--prefill-batch": args.prefill_batch,
              "--prefill-tokens": args.prefill_tokens, "--max-queue": args.max_queue,
              "--default-max-tokens": args.default_max_tokens, "--max-images": args.max_images,
              "--max-frames": args.max_frames, "--video-frames": args.video_frames, "--max-pixels": args.max_pixels}
    bad = [f"{name} must be at least 1, got {value}" for name, value in wholes.items() if value < 1]
    if not args.timeout > 0:
        bad.append(f"--timeout must be positive, got {args.timeout}")
    if not args.max_media_mb > 0:
        bad.append(f"--max-media-mb must be positive, got {args.max_media_mb}")
    if not 0 < args.port < 65536:
        bad.append(f"--port must be in 1..65535, got {args.port}")
    if bad:
        raise NvilaError("nvila serve: " + "; ".join(bad) + ".")
    media = MediaLimits(max_images=args.max_images, max_frames=args.max_frames, video_frames=args.video_frames,
                        max_pixels=args.max_pixels, max_bytes=int(args.max_media_mb * 2**20),
                        allow_remote=args.allow_remote_media)
    return ServeSettings(model_name=args.model_name or Path(args.ckpt).resolve().name, max_batch=args.max_batch,
                         prefill_batch=args.prefill_batch, prefill_tokens=args.prefill_tokens,
                         max_queue=args.max_queue, request_timeout_s=args.timeout,
                         default_max_tokens=args.default_max_tokens, compile_decode=args.compile, media=media)


def run(args: argparse.Namespace) -> None:
    """``nvila serve``: check the options, load the checkpoint, serve until interrupted."""
    try:
        import fastapi  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise NvilaError(f"nvila serve needs the serving packages ({exc.name} is missing): "
                         "pip install 'nvila[serve]'.") from None
    from nvila.workflows.serving.app import serve

    serve(args.ckpt, args.host, args.port, settings(args))
