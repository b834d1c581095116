"""Turns a conversation with images and videos into model inputs: token ids, labels, pixels and block grids.

Each media placeholder in the text is expanded to exactly as many placeholder ids as the image will
have visual tokens (known from the encoder's block grid and the compressor's output shape), so the
model can splice visual embeddings in place and batches can be padded like text. A ``<video>``
placeholder becomes, for each frame left after temporal compression, the frame's visual-token slots
followed by the frame-end text's token ids (NVILA: a newline), which the language model embeds itself.
An ``<image>`` placeholder becomes the image's slots followed by the image-end ids (NVILA: a newline); when
the encoder's tiles are separate images (dynamic tiles), every tile is followed by them, and by the tile-end
ids. A newline written right after a placeholder whose medium brings end ids of its own is dropped, as
NVILA's data path drops it, so that ``"<image>\\nWhat?"`` has one newline after the image, not two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from nvila.core.errors import NvilaError
from nvila.core.interfaces import ImageProcessor

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SampleTooLong(NvilaError, ValueError):
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
    videos: torch.Tensor | None = None
    """(T, 3, S, S) tiles of every frame of every video in order, or None."""
    video_grids: list[tuple[int, int, int]] = field(default_factory=list)
    """(frames, rows, cols) of each video: its frame count and each frame's block grid."""


def every_frame(frames: int) -> int:
    """No temporal compression: every frame is kept."""
    return frames


class NvilaProcessor:
    """Tokenizer + image processor + token accounting; picklable, so it runs in DataLoader workers.

    ``frames_out`` says how many frames a video of F frames keeps after temporal compression (the
    temporal compressor's ``output_frames``); ``frame_end_ids`` are the token ids that end each kept frame.
    ``image_end_ids`` end each image, or each block when ``end_per_block`` (the encoder's blocks are separate
    tiles), then followed by ``tile_end_ids`` too. ``strip_media_newline`` drops a newline right after a
    placeholder whose medium has end ids. With ``single_image_tiling``, an image is tiled only when it is the
    sample's only one; several images are each one tile at the base resolution (``ImageProcessor.frame``).
    """

    def __init__(self, tokenizer: Any, image_processor: ImageProcessor,
                 tokens_per_block: int, max_length: int = 2048,
                 frames_out: Callable[[int], int] = every_frame, frame_end_ids: Sequence[int] = (),
                 image_end_ids: Sequence[int] = (), tile_end_ids: Sequence[int] = (), end_per_block: bool = False,
                 strip_media_newline: bool = False, single_image_tiling: bool = False) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.tokens_per_block, self.max_length = tokens_per_block, max_length
        self.frames_out, self.frame_end_ids = frames_out, list(frame_end_ids)
        self.image_end_ids, self.tile_end_ids = list(image_end_ids), list(tile_end_ids)
        self.end_per_block, self.strip_media_newline = end_per_block, strip_media_newline
        self.single_image_tiling = single_image_tiling
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise NvilaError(f"The tokenizer has no '{IMAGE_TOKEN}' token; add it as a special token.")
        video_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        # without the token, videos are refused with a message when one comes
        self.video_token_id = None if video_id is None or video_id == tokenizer.unk_token_id else video_id

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

    def image_ids(self, grid: tuple[int, int], tiled: bool = True) -> list[int]:
        """What an ``<image>`` placeholder becomes for an image of block grid ``grid``: its visual-token slots
        (``image_token_id``) and end ids; ``tiled`` is False for an image encoded as one base-resolution tile."""
        blocks, slots = grid[0] * grid[1], [self.image_token_id] * self.tokens_per_block
        if self.end_per_block:  # every tile is an image of its own (NVILA-Lite's dynamic tiles)
            return (slots + self.image_end_ids + (self.tile_end_ids if tiled else [])) * blocks
        return slots * blocks + self.image_end_ids

    def image_tokens(self, grid: tuple[int, int] = (1, 1), tiled: bool = True) -> int:
        """Tokens an ``<image>`` placeholder expands to for an image of block grid ``grid``, end tokens included."""
        return len(self.image_ids(grid, tiled))

    def video_tokens(self, frames: int, grid: tuple[int, int] = (1, 1)) -> int:
        """Tokens a ``<video>`` placeholder expands to for ``frames`` frames of block grid ``grid`` each."""
        per_frame = grid[0] * grid[1] * self.tokens_per_block + len(self.frame_end_ids)
        return self.frames_out(frames) * per_frame

    def encode(self, conversations: Sequence[dict], images: Sequence[Image.Image] = (),
               generation_prompt: bool = False, videos: Sequence[Sequence[Image.Image]] = ()) -> Encoded:
        """Tokenize a whole conversation; labels cover assistant turns only.

        ``images`` fill the ``<image>`` placeholders in order; ``videos`` (each a list of frames) fill
        the ``<video>`` placeholders in order.
        """
        messages = self._strip_media_newlines(self.messages(conversations))
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
        return self._with_media(ids, labels, images, videos)

    def _strip_media_newlines(self, messages: list[dict]) -> list[dict]:
        """Drop the newline right after each placeholder whose medium brings its own end ids (NVILA's data path
        removes ``"<image>\\n"`` before its encoder appends the end tokens)."""
        if not self.strip_media_newline:
            return messages
        tokens = [t for t, ends in ((IMAGE_TOKEN, self.image_end_ids), (VIDEO_TOKEN, self.frame_end_ids)) if ends]
        for message in messages:
            for token in tokens:
                message["content"] = message["content"].replace(token + "\n", token)
        return messages

    @staticmethod
    def _check_prefix(before: str, after: str) -> None:
        if not after.startswith(before):
            raise NvilaError("The tokenizer's chat template does not render a conversation prefix by prefix; "
                             "nvila needs that to keep labels on assistant turns only.")

    def _with_media(self, ids: list[int], labels: list[int], images: Sequence[Image.Image],
                    videos: Sequence[Sequence[Image.Image]]) -> Encoded:
        placeholders = ids.count(self.image_token_id)
        if placeholders != len(images):
            raise ValueError(f"{placeholders} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s)")
        video_slots = ids.count(self.video_token_id) if self.video_token_id is not None else 0
        if videos and self.video_token_id is None:
            raise NvilaError(f"The tokenizer has no '{VIDEO_TOKEN}' token; add it as a special token.")
        if video_slots != len(videos):
            raise ValueError(f"{video_slots} {VIDEO_TOKEN} placeholder(s) but {len(videos)} video(s)")
        tiled = len(images) == 1 or not self.single_image_tiling
        prepare = self.image_processor if tiled else self.image_processor.frame
        prepared = [prepare(image) for image in images]
        clips = [self._prepare_video(frames) for frames in videos]
        out_ids: list[int] = []
        out_labels: list[int] = []
        media, clip_iter = iter(prepared), iter(clips)
        for token, label in zip(ids, labels):
            if token == self.image_token_id:
                expanded = self.image_ids(next(media).grid, tiled)
                out_ids += expanded
                out_labels += [IGNORE_INDEX] * len(expanded)
            elif token == self.video_token_id:
                _, (f, rows, cols) = next(clip_iter)
                frame = [self.video_token_id] * (rows * cols * self.tokens_per_block) + self.frame_end_ids
                out_ids += frame * self.frames_out(f)
                out_labels += [IGNORE_INDEX] * (len(frame) * self.frames_out(f))
            else:
                out_ids.append(token)
                out_labels.append(label)
        if len(out_ids) > self.max_length:
            raise SampleTooLong(f"sample has {len(out_ids)} tokens, more than max_length {self.max_length}")
        pixels = torch.cat([p.pixels for p in prepared]) if prepared else None
        video_pixels = torch.cat([pixels for pixels, _ in clips]) if clips else None
        return Encoded(torch.tensor(out_ids), torch.tensor(out_labels), pixels, [p.grid for p in prepared],
                       videos=video_pixels, video_grids=[grid for _, grid in clips])

    def _prepare_video(self, frames: Sequence[Image.Image]) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """A video's frames through the encoder's ``frame()`` preprocessing: tiles and (frames, rows, cols)."""
        if not frames:
            raise ValueError("a video with no frames")
        prepared = [self.image_processor.frame(frame) for frame in frames]
        grids = {p.grid for p in prepared}
        if len(grids) > 1:
            raise ValueError(f"the frames of one video must share a block grid, got {sorted(grids)}")
        (grid,) = grids
        self.frames_out(len(frames))  # refuses a frame count the temporal compressor cannot take
        return torch.cat([p.pixels for p in prepared]), (len(frames), *grid)


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
    video_list = [s.videos for s in samples if s.videos is not None]
    return {
        "input_ids": input_ids,  # (B, L)
        "labels": labels,  # (B, L)
        "attention_mask": attention_mask,  # (B, L)
        "pixels": torch.cat(pixel_list) if pixel_list else None,  # (T, 3, S, S)
        "grids": [g for s in samples for g in s.grids],
        "videos": torch.cat(video_list) if video_list else None,  # (T_video, 3, S, S)
        "video_grids": [g for s in samples for g in s.video_grids],
    }


def collator(pad_id: int, left_pad: bool = False) -> Callable[[Sequence[Encoded]], dict[str, Any]]:
    """A picklable DataLoader ``collate_fn``."""
    import functools

    return functools.partial(collate, pad_id=pad_id, left_pad=left_pad)
