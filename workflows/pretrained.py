"""A Hugging Face-style face for nvila models: ``NVILA.from_pretrained``, ``save_pretrained``, ``generate``.

::

    from nvila.workflows.pretrained import NVILA

    model = NVILA.from_pretrained("NVILA-8B")          # a released checkpoint directory, or an nvila one
    print(model.generate([{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": "What is in the image?"}]}]))
    model.save_pretrained("out", layout="official")     # or layout="nvila"

Generation goes through the inference engine (:class:`nvila.core.engine.Engine`), like every other caller.
A model loaded from a released checkpoint keeps what the release holds besides the nvila model
(:class:`~nvila.workflows.official.Released`: the original config fields, SigLIP's unused layers); saving it
in nvila's layout writes them to ``released/`` beside the checkpoint, so a later export gives them back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from nvila.core.checkpoint import SPEC_FILE, load_checkpoint, save_checkpoint
from nvila.core.engine import ChatRequest, DecodingConfig, Engine
from nvila.core.errors import NvilaError
from nvila.core.model import NvilaModel
from nvila.workflows.official import Released, is_official, load_official, save_official

LAYOUTS = ("nvila", "official")
RELEASED_DIR = "released"

Conversation = Sequence[Mapping[str, Any]]


def load_model(directory: str | Path) -> NvilaModel:
    """An nvila model from a checkpoint directory in either layout (for commands that take ``--ckpt``)."""
    return NVILA.from_pretrained(directory).model


class NVILAProcessor:
    """Chat messages with images and videos -> the model's inputs, through the engine's processor.

    Messages are OpenAI-like (see :class:`nvila.core.engine.ChatRequest`): text content with ``<image>`` /
    ``<video>`` placeholders filled by ``images`` / ``videos``, or a list of parts ``{"type": "text" | "image" |
    "video", ...}``. One conversation, or a list of them for a batch (left-padded, ready to generate).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def requests(self, conversations: Conversation | Sequence[Conversation] | ChatRequest | Sequence[ChatRequest],
                 images: Sequence[Image.Image] = (), videos: Sequence[Sequence[Image.Image]] = ()
                 ) -> tuple[list[ChatRequest], bool]:
        """The conversations as engine requests, and whether one conversation (not a batch) was given."""
        if isinstance(conversations, ChatRequest):
            return [conversations], True
        if not conversations:
            raise NvilaError("No messages: give a conversation (a list of {role, content} messages) or a list of them.")
        single = isinstance(conversations[0], Mapping)
        batch = [conversations] if single else list(conversations)
        if (images or videos) and len(batch) != 1:
            raise NvilaError("images= and videos= go with one conversation; put media in each conversation's "
                             "content parts for a batch.")
        return [c if isinstance(c, ChatRequest) else ChatRequest(list(c), images=images, videos=videos)
                for c in batch], single

    def __call__(self, conversations: Conversation | Sequence[Conversation], images: Sequence[Image.Image] = (),
                 videos: Sequence[Sequence[Image.Image]] = ()) -> dict[str, Any]:
        """A left-padded batch on the model's device: ``input_ids``, ``attention_mask``, pixels and grids."""
        requests, _ = self.requests(conversations, images, videos)
        return self.engine.inputs(requests)


class NVILA(torch.nn.Module):
    """An :class:`NvilaModel` with Hugging Face-style loading, saving and generation."""

    def __init__(self, model: NvilaModel, released: Released | None = None) -> None:
        super().__init__()
        self.model, self.released = model, released
        self.engine = Engine(model)
        self.processor = NVILAProcessor(self.engine)

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def spec(self) -> Any:
        return self.model.spec

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> NVILA:
        """Load a released NVILA checkpoint directory (``config.json``, ``llm/``, ``vision_tower/``,
        ``mm_projector/``) or an nvila one (``spec.yaml``); local files only, nothing unpickled."""
        directory = Path(directory)
        if not directory.is_dir():
            raise NvilaError(f"'{directory}' is not a directory: give a released NVILA checkpoint directory or an "
                             "nvila checkpoint directory.")
        if (directory / SPEC_FILE).is_file():
            model, released = load_checkpoint(directory), _read_released(directory / RELEASED_DIR)
            if dtype is not None:
                model.to(dtype)
        elif is_official(directory) or (directory / "config.json").is_file():
            model, released = load_official(directory, dtype)
        else:
            raise NvilaError(f"'{directory}' is not a checkpoint: it has neither spec.yaml (nvila's layout) nor "
                             "config.json with llm/, vision_tower/ and mm_projector/ (the released NVILA layout).")
        out = cls(model.eval(), released)
        return out.to(device) if device is not None else out

    def save_pretrained(self, directory: str | Path, layout: str = "nvila", dtype: torch.dtype | None = None) -> Path:
        """Write the model in nvila's layout (``spec.yaml``, ``model.safetensors``, ``tokenizer/``) or the released
        NVILA layout (``layout="official"``: what NVlabs/VILA, SGLang and vLLM read; ``dtype`` defaults to the
        release's, bfloat16)."""
        if layout not in LAYOUTS:
            raise NvilaError(f"Unknown layout '{layout}'; choose one of {', '.join(LAYOUTS)}.")
        directory = Path(directory)
        if layout == "official":
            return save_official(self.model, directory, self.released, dtype)
        model = self.model if dtype is None else self.model.to(dtype)
        save_checkpoint(model, directory)
        if self.released is not None:
            _write_released(directory / RELEASED_DIR, self.released)
        return directory

    def forward(self, **inputs: Any) -> dict[str, torch.Tensor]:
        return self.model(**inputs)

    def generate(self, conversations: Conversation | Sequence[Conversation] | None = None, *,
                 images: Sequence[Image.Image] = (), videos: Sequence[Sequence[Image.Image]] = (),
                 inputs: Mapping[str, Any] | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = ()) -> str | list[str]:
        """Answer one conversation (a str) or a batch of them (a list), greedily unless ``temperature`` > 0.

        ``inputs`` (from :attr:`processor`) may stand in for the conversations.
        """
        config = DecodingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop=tuple(stop))
        if inputs is not None:
            return [c.text for c in self.engine.generate_inputs(inputs, config)]
        if conversations is None:
            raise NvilaError("generate() needs conversations or inputs.")
        requests, single = self.processor.requests(conversations, images, videos)
        answers = [c.text.strip() for c in self.engine.generate(requests, config)]
        return answers[0] if single else answers


def _write_released(directory: Path, released: Released) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(released.config, indent=2, sort_keys=True) + "\n")
    (directory / "report.json").write_text(json.dumps(released.report, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in released.unused.items()}, str(directory / "unused.safetensors"))


def _read_released(directory: Path) -> Released | None:
    if not (directory / "config.json").is_file():
        return None
    config = json.loads((directory / "config.json").read_text())
    unused = load_file(str(directory / "unused.safetensors")) if (directory / "unused.safetensors").is_file() else {}
    report = json.loads((directory / "report.json").read_text()) if (directory / "report.json").is_file() else []
    return Released(config, unused, report)
