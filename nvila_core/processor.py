"""Turns a conversation with images into model inputs: token ids, labels, pixels and block grids.

Each media placeholder in the text is expanded to exactly as many placeholder ids as the image will
have visual tokens (known from the encoder's block grid and the compressor's output shape), so the
model can splice visual embeddings in place and batches can be padded like text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from nvila_core.errors import NvilaError
from nvila_core.interfaces import ImageProcessor

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SampleTooLong(ValueError):
    """A sample with more tokens than ``max_length``: it is skipped, never truncated through its media."""


@dataclass
class Encoded:
    """One tokenized sample, ready for collation."""

    input_ids: torch.Tensor
    """(L,) token ids, image placeholders already expanded."""
    labels: torch.Tensor
    """(L,) targets: the token id on assistant turns, -100 elsewhere."""
    pixels: torch.Tensor | None
    """(T, 3, S, S) tiles of all images in order, or None for text-only samples."""
    grids: list[tuple[int, int]]
    """Block grid of each image."""
    key: str = ""
    """Where the sample came from (shard:key), for logs and for checking data splits."""


class NvilaProcessor:
    """Tokenizer + image processor + token accounting; picklable, so it runs in DataLoader workers."""

    def __init__(self, tokenizer: Any, image_processor: ImageProcessor,
                 tokens_per_block: int, max_length: int = 2048) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.tokens_per_block, self.max_length = tokens_per_block, max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise NvilaError(f"The tokenizer has no '{IMAGE_TOKEN}' token; add it as a special token.")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    @staticmethod
    def messages(conversations: Sequence[dict]) -> list[dict]:
        """LLaVA turns (``from``/``value``) or chat turns (``role``/``content``) as chat messages."""
        out = []
        for turn in conversations:
            role = ROLES.get(turn.get("from", turn.get("role", "")))
            content = turn.get("value", turn.get("content"))
            if role is None or not isinstance(content, str):
                raise ValueError(f"malformed turn {turn!r}: needs from/value or role/content")
            out.append({"role": role, "content": content})
        return out

    def encode(self, conversations: Sequence[dict], images: Sequence[Image.Image] = (),
               generation_prompt: bool = False) -> Encoded:
        """Tokenize a whole conversation; labels cover assistant turns only."""
        messages = self.messages(conversations)
        ids: list[int] = []
        labels: list[int] = []

        def extend(text: str, supervised: bool) -> None:
            piece = self._ids(text)
            ids.extend(piece)
            labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))

        # Each turn is the difference between renderings of the growing conversation, which works for
        # any chat template that renders prefix by prefix. The assistant header ("<|im_start|>assistant")
        # is the generation prompt: context, not a target.
        rendered = ""
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = self._render(messages[:i], generation_prompt=True)
                self._check_prefix(rendered, prompt)
                extend(prompt[len(rendered):], supervised=False)
                rendered = prompt
            full = self._render(messages[: i + 1], generation_prompt=False)
            self._check_prefix(rendered, full)
            extend(full[len(rendered):], supervised=message["role"] == "assistant")
            rendered = full
        if generation_prompt:
            prompt = self._render(messages, generation_prompt=True)
            self._check_prefix(rendered, prompt)
            extend(prompt[len(rendered):], supervised=False)
        return self._with_images(ids, labels, images)

    @staticmethod
    def _check_prefix(before: str, after: str) -> None:
        if not after.startswith(before):
            raise NvilaError("The tokenizer's chat template does not render a conversation prefix by prefix; "
                             "nvila needs that to keep labels on assistant turns only.")

    def _with_images(self, ids: list[int], labels: list[int], images: Sequence[Image.Image]) -> Encoded:
        placeholders = ids.count(self.image_token_id)
        if placeholders != len(images):
            raise ValueError(f"{placeholders} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s)")
        prepared = [self.image_processor(image) for image in images]
        out_ids: list[int] = []
        out_labels: list[int] = []
        media = iter(prepared)
        for token, label in zip(ids, labels):
            if token == self.image_token_id:
                n = next(media).num_blocks * self.tokens_per_block
                out_ids += [self.image_token_id] * n
                out_labels += [IGNORE_INDEX] * n
            else:
                out_ids.append(token)
                out_labels.append(label)
        if len(out_ids) > self.max_length:
            raise SampleTooLong(f"sample has {len(out_ids)} tokens, more than max_length {self.max_length}")
        pixels = torch.cat([p.pixels for p in prepared]) if prepared else None
        return Encoded(torch.tensor(out_ids), torch.tensor(out_labels), pixels, [p.grid for p in prepared])


def collate(samples: Sequence[Encoded], pad_id: int, left_pad: bool = False) -> dict[str, Any]:
    """Pad a list of encoded samples into a batch (left padding for generation)."""
    length = max(len(s.input_ids) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        span = slice(length - n, length) if left_pad else slice(0, n)
        input_ids[i, span], labels[i, span], attention_mask[i, span] = s.input_ids, s.labels, 1
    pixel_list = [s.pixels for s in samples if s.pixels is not None]
    return {
        "input_ids": input_ids,  # (B, L)
        "labels": labels,  # (B, L)
        "attention_mask": attention_mask,  # (B, L)
        "pixels": torch.cat(pixel_list) if pixel_list else None,  # (T, 3, S, S)
        "grids": [g for s in samples for g in s.grids],
    }


def collator(pad_id: int, left_pad: bool = False) -> Callable[[Sequence[Encoded]], dict[str, Any]]:
    """A picklable DataLoader ``collate_fn``."""
    import functools

    return functools.partial(collate, pad_id=pad_id, left_pad=left_pad)
