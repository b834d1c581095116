"""``nvila generate``: answer one question about images or a video with a checkpoint, printing tokens as they come.

Everything goes through the inference engine (``nvila.core.engine``); this module only reads the media,
builds the request and writes the stream.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from nvila.core.errors import NvilaError

if TYPE_CHECKING:  # the engine imports torch: `nvila --help` and the other commands do not wait for it
    from PIL import Image

    from nvila.core.engine import ChatRequest, Completion, DecodingConfig, Engine, Step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``nvila generate`` options."""
    parser.add_argument("--ckpt", required=True, help="checkpoint directory, nvila layout or released NVILA")
    parser.add_argument("--prompt", required=True,
                        help="the question; <image> / <video> in it mark where the media go (default: before the text)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="an image; repeat for more")
    parser.add_argument("--video", metavar="PATH", help="a video clip (.mp4, or anything PyAV reads)")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled uniformly from --video")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) answers greedily")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold, in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="seed for a reproducible sampled answer")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end the answer before this text; repeat for more")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decoding step with torch.compile: faster tokens after a one-time compile of "
                             "tens of seconds (needs a C++ compiler on a CPU)")
    parser.add_argument("--stats", action="store_true",
                        help="print prompt and visual tokens, prefill time and decode speed to stderr at the end")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> Completion:
    """``nvila generate`` from parsed arguments: stream the answer to ``out`` (stdout), return it.

    With ``args.stats``, a line of counts and timings goes to ``err`` (stderr) at the end.
    """
    from nvila.core.engine import ChatRequest, DecodingConfig, Engine
    from nvila.workflows.pretrained import load_model

    out, err = out or sys.stdout, err or sys.stderr
    config = DecodingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=tuple(args.stop))
    images = [read_image(path) for path in args.image]
    videos = [read_video(args.video, args.frames)] if args.video else []
    engine = Engine(load_model(args.ckpt), compile_decode=getattr(args, "compile", False))  # ours or released
    request = ChatRequest([{"role": "user", "content": with_placeholders(args.prompt, len(images), len(videos))}],
                          images=images, videos=videos)
    answer = stream_answer(engine, request, config, out)
    if getattr(args, "stats", False):
        err.write(f"{answer.prompt_tokens} prompt tokens ({answer.visual_tokens} visual), "
                  f"{answer.completion_tokens} generated ({answer.finish_reason}), prefill "
                  f"{answer.prefill_s * 1000:.1f} ms, decode {answer.decode_tokens_per_s:.1f} tokens/s\n")
    return answer


def stream_answer(engine: Engine, request: ChatRequest, config: DecodingConfig, out: TextIO) -> Completion:
    """Write one request's answer to ``out`` token by token (flushing each), then a newline; return it."""
    inputs = engine.inputs([request])

    def echo(steps: Iterator[Step]) -> Iterator[Step]:
        for step in steps:
            for event in step.events:
                if event.text:
                    out.write(event.text)
                    out.flush()
            yield step

    (answer,) = engine.collect(inputs, echo(engine.stream_inputs(inputs, config)))
    out.write("\n")
    out.flush()
    return answer


def with_placeholders(prompt: str, images: int, videos: int) -> str:
    """The prompt with one placeholder per medium, put first when the prompt does not place them itself."""
    from nvila.core.processor import IMAGE_TOKEN, VIDEO_TOKEN

    head = ""
    if videos and VIDEO_TOKEN not in prompt:
        head += f"{VIDEO_TOKEN}\n" * videos
    if images and IMAGE_TOKEN not in prompt:
        head += f"{IMAGE_TOKEN}\n" * images
    return head + prompt


def read_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as RGB; its header is held to the pixel limit before it is decoded."""
    from nvila.core.media import open_image

    if not Path(path).is_file():
        raise NvilaError(f"Cannot read image '{path}': no such file")
    return open_image(path, name=f"--image '{path}'").convert("RGB")


def read_video(path: str | Path, frames: int) -> list[Image.Image]:
    """``frames`` frames sampled uniformly from the clip at ``path``, as RGB PIL images."""
    from nvila.core.data.video import VideoDecodeError, VideoSampling, decode_video

    if frames < 1:
        raise NvilaError(f"--frames must be at least 1, got {frames}")
    if not Path(path).is_file():
        raise NvilaError(f"Cannot read video '{path}': no such file")
    try:
        return decode_video(Path(path), VideoSampling(num_frames=frames))
    except VideoDecodeError as exc:
        raise NvilaError(f"Cannot read video '{path}': {exc}") from None
