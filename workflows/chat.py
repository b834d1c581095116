"""``nvila chat``: talk with a checkpoint in the terminal; answers stream token by token through the engine.

The conversation is kept (each answer sees the earlier turns, and their images), so follow-up questions work.
Lines that start with ``/`` are commands (:data:`HELP`); ``/image`` and ``/video`` attach media to the next
message. After each answer a line gives its length and speed. Reads standard input line by line, so it can be
driven by a script as well as typed at.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any, TextIO

from nvila.core.errors import NvilaError

HELP = """Type a message and press Enter. Commands:
  /image PATH        attach an image to your next message (repeat for more)
  /video PATH [N]    attach a video, N frames sampled uniformly (default: --frames)
  /reset             forget the conversation and any attached media
  /help              this text
  /quit              leave (Ctrl-D too)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``nvila chat`` options."""
    parser.add_argument("--ckpt", required=True,
                        help="checkpoint directory: nvila's (spec.yaml, model.safetensors) or a released NVILA one")
    parser.add_argument("--system", default=None, help="a system message that opens the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) answers greedily")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold, in (0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampled answers")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled from each /video")


class Chat:
    """One terminal conversation: its turns, the media waiting for the next message, and the engine."""

    def __init__(self, engine: Any, config: Any, frames: int = 8, system: str | None = None,
                 out: TextIO | None = None) -> None:
        self.engine, self.config, self.frames, self.system = engine, config, frames, system
        self.out = out or sys.stdout
        self.turns: list[dict[str, Any]] = []
        self.attached: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        self.turns = [{"role": "system", "content": self.system}] if self.system else []
        self.attached = []

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the user wants to leave."""
        line = line.strip()
        if not line:
            return True
        if line.startswith("/"):
            return self.command(line)
        self.ask(line)
        return True

    def command(self, line: str) -> bool:
        from nvila.workflows.generate import read_image, read_video

        try:
            name, *args = shlex.split(line)
        except ValueError as exc:
            self.say(f"! {exc}")
            return True
        try:
            if name in ("/quit", "/exit"):
                return False
            if name == "/help":
                self.say(HELP)
            elif name == "/reset":
                self.reset()
                self.say("(conversation cleared)")
            elif name == "/image" and len(args) == 1:
                self.attached.append({"type": "image", "image": read_image(args[0])})
                self.say(f"(image attached: {args[0]})")
            elif name == "/video" and len(args) in (1, 2):
                frames = int(args[1]) if len(args) == 2 and args[1].isdigit() else self.frames
                self.attached.append({"type": "video", "video": read_video(args[0], frames)})
                self.say(f"(video attached: {args[0]}, {frames} frames)")
            else:
                self.say(f"! unknown command or wrong arguments: {line}\n{HELP}")
        except NvilaError as exc:
            self.say(f"! {exc}")
        return True

    def ask(self, text: str) -> None:
        """Answer one message (with the attached media), streaming; keep both turns in the conversation."""
        from nvila.core.engine import ChatRequest
        from nvila.workflows.generate import stream_answer

        message = {"role": "user", "content": [*self.attached, {"type": "text", "text": text}]}
        request = ChatRequest([*self.turns, message])
        self.out.write("nvila> ")
        try:
            answer = stream_answer(self.engine, request, self.config, self.out)
        except NvilaError as exc:  # too long for the context, media the model cannot take: the turn is dropped
            self.say(f"! {exc} (the message is dropped)")
            return
        except KeyboardInterrupt:
            self.say("\n(interrupted; the message is dropped)")
            return
        self.turns += [message, {"role": "assistant", "content": answer.text}]
        self.attached = []
        speed = f"{answer.decode_tokens_per_s:.1f} tokens/s" if answer.completion_tokens > 1 else "-"
        self.say(f"[{answer.completion_tokens} tokens ({answer.finish_reason}), {speed}, first token in "
                 f"{answer.prefill_s * 1000:.0f} ms, {answer.prompt_tokens} prompt tokens "
                 f"({answer.visual_tokens} visual)]")


def run(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None) -> None:
    """``nvila chat`` from parsed arguments: read lines from ``stdin`` until /quit or end of input."""
    from nvila.core.engine import DecodingConfig, Engine
    from nvila.workflows.pretrained import load_model

    stdin, out = stdin or sys.stdin, out or sys.stdout
    config = DecodingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    if args.frames < 1:
        raise NvilaError(f"--frames must be at least 1, got {args.frames}")
    chat = Chat(Engine(load_model(args.ckpt)), config, args.frames, args.system, out)
    interactive = stdin.isatty()
    if interactive:
        import readline  # noqa: F401 - line editing and history for input()
    chat.say(f"nvila chat with {args.ckpt}. /help for commands, /quit to leave.")
    while True:
        try:
            if interactive:
                line = input("you> ")
            else:
                line = stdin.readline()
                if not line:
                    break
        except (EOFError, KeyboardInterrupt):
            break
        if not chat.handle(line):
            break
    chat.say("bye")
