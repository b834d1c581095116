"""Token and cost planning: what an image or a video costs under a model spec, known without weights.

The model is assembled on PyTorch's ``meta`` device (shapes, no storage), so a 16 GB NVILA-8B costs
nothing to build. Token counts come from the encoder's own ``processor().plan`` and the compressor's
``output_shape`` (the same numbers the model uses to expand placeholders). FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` while the real forward code runs on meta tensors; peak
activation memory by torch's ``MemTracker`` in the same pass. So plans follow whatever the components
actually do, including third-party plugins, instead of a formula that could drift from the code.
Attention is counted as its matmuls (on meta, SDPA runs its math path), which is also what fused kernels
compute; torch has no FLOP formula for the fused CPU kernel, so compare with real runs under SDPA's math backend.

The language-model prefill is planned as serving runs it: every position through the decoder, the
output layer on the last position only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from nvila.core.errors import NvilaError
from nvila.core.model import ModelSpec, NvilaModel
from nvila.core.registry import Registry

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Grid = tuple[int, int]


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: its output tokens and width, its FLOPs and peak activation memory."""

    name: str
    tokens: int
    """Tokens (feature positions) this stage outputs."""
    width: int
    """Channels of each output token."""
    flops: int
    """Floating-point operations of the stage's forward (a multiply-add counts 2)."""
    activation_bytes: int | None = None
    """Peak memory of tensors the stage allocates (None when torch's MemTracker is unavailable)."""


@dataclass(frozen=True)
class Plan:
    """What one image (or one video) costs under a model spec."""

    media: str
    """'image HxW (HxW)' or 'N frames'."""
    tiles: int
    """Tiles the encoder runs on (all scales, all frames)."""
    tile_grid: Grid
    """(rows, cols) of tiles at the largest scale, for an image; (1, 1) per frame for a video."""
    block_grid: Grid
    """(rows, cols) of feature blocks of an image; (frames, 1) for a video."""
    block_size: Grid
    """(h, w) features per block."""
    tokens_per_block: int
    """Tokens the compressor makes of each block."""
    visual_tokens: int
    """Tokens the media adds to the language model's input (end tokens included)."""
    llm_tokens: int
    """Language-model prefill length: visual plus text tokens."""
    stages: tuple[Stage, ...]
    """encoder, compressor, projector, llm prefill."""
    kv_cache_bytes: int | None
    """Keys and values the prefill leaves in the cache (None when the LLM does not describe its layers)."""
    dtype: str
    notes: tuple[str, ...] = field(default=())

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def flops(self) -> int:
        return sum(s.flops for s in self.stages)


class Planner:
    """Plans images and videos for one model spec; the model is built once, on the meta device."""

    def __init__(self, spec: ModelSpec | dict[str, Any], dtype: str = "bf16", registry: Registry | None = None,
                 measure_memory: bool = True) -> None:
        if dtype not in DTYPES:
            raise NvilaError(f"Unknown dtype '{dtype}' for planning; choose one of {', '.join(DTYPES)}.")
        self.dtype = dtype
        with torch.device("meta"):
            self.model = NvilaModel(spec, registry).to(DTYPES[dtype])
        self.processor = self.model.processor.image_processor
        self.tokens_per_block = self.model.tokens_per_block
        self.memory = _memory_tracker() if measure_memory else None

    # -- token counts only (cheap: no forward) -------------------------------------------------------
    def image_tokens(self, width: int, height: int) -> int:
        """Tokens a ``width`` x ``height`` image (upright size) adds to the language model's input: its visual
        tokens and the image-end tokens after it (or after each tile), what ``<image>`` expands to."""
        return self.model.processor.image_tokens(self.processor.plan(width, height).grid)

    def video_tokens(self, frames: int) -> int:
        """Tokens a video of ``frames`` frames adds to the language model's input: the frames the temporal
        compressor keeps, one block each, each followed by the frame-end tokens (what ``<video>`` expands to)."""
        return self.model.processor.video_tokens(frames)

    # -- full plans ----------------------------------------------------------------------------------
    def image(self, width: int, height: int, text_tokens: int = 0) -> Plan:
        """Tile grid, tokens after every stage, FLOPs and activation memory for one image."""
        _check_size(width, height)
        plan = self.processor.plan(width, height)
        tile_grid = getattr(self.processor, "tile_grid", None)
        tiles_at_largest = tile_grid(width, height) if tile_grid else plan.grid
        return self._plan(f"image {width} wide x {height} high", plan.tiles, [plan.grid], tiles_at_largest, plan.grid,
                          text_tokens, ())

    def video(self, frames: int, text_tokens: int = 0) -> Plan:
        """The same for ``frames`` video frames, each encoded at the base resolution as one tile."""
        if frames < 1:
            raise NvilaError(f"A video needs at least one frame, got {frames}.")
        temporal = self.model.temporal
        note = (f"temporal compression ({temporal.where}): {frames} frames -> "
                f"{temporal.output_frames(frames)}, each followed by {len(self.model.processor.frame_end_ids)} "
                "frame-end token(s)",)
        return self._plan(f"{frames} frames", frames, [(1, 1)] * frames, (1, 1), (frames, 1), text_tokens, note,
                          video_frames=frames)

    def _plan(self, media: str, tiles: int, grids: list[Grid], tile_grid: Grid, block_grid: Grid,
              text_tokens: int, notes: tuple[str, ...], video_frames: int | None = None) -> Plan:
        model, size = self.model, self._tile_size()

        def pool(x: torch.Tensor, stage: str) -> torch.Tensor:  # a video's frames, pooled where the spec says
            if video_frames is None or model.temporal.where != stage:
                return x
            return model.pool_frames(x, [(video_frames, 1, 1)])

        pixels = torch.empty(tiles, 3, size, size, device="meta", dtype=DTYPES[self.dtype])  # (T, 3, S, S)
        with torch.no_grad():
            with self._tracking() as peak, FlopCounterMode(display=False) as counter:
                blocks = pool(model.encoder(pixels, grids), "after-encoder")  # (M, h, w, C)
            encoder = Stage("encoder", blocks.shape[0] * blocks.shape[1] * blocks.shape[2], blocks.shape[3],
                            counter.get_total_flops(), peak())
            with self._tracking() as peak, FlopCounterMode(display=False) as counter:
                tokens = pool(model.compressor(blocks), "after-compressor")  # (M, n, C')
            compressor = Stage("compressor", tokens.shape[0] * tokens.shape[1], tokens.shape[2],
                               counter.get_total_flops(), peak())
            with self._tracking() as peak, FlopCounterMode(display=False) as counter:
                visual = pool(model.projector(tokens), "after-projector")  # (M, n, D)
            projector = Stage("projector", visual.shape[0] * visual.shape[1], visual.shape[2],
                              counter.get_total_flops(), peak())
            made, ends = projector.tokens, 0
            expected = sum(r * c for r, c in grids) * self.tokens_per_block
            if video_frames is not None:  # the processor adds frame-end text tokens after each kept frame
                ends = model.temporal.output_frames(video_frames) * len(model.processor.frame_end_ids)
                expected = self.video_tokens(video_frames) - ends
            else:  # and image-end text tokens after each image (or tile)
                ends = model.processor.image_tokens(block_grid) - expected
            if made != expected:
                raise NvilaError(f"The model made {made} visual tokens where the processor's plan says "
                                 f"{expected}; the encoder or compressor breaks its shape contract.")
            visual_tokens = made + ends
            length = visual_tokens + text_tokens
            llm, kv = self._prefill(length)
        return Plan(media=media, tiles=tiles, tile_grid=tuple(tile_grid), block_grid=tuple(block_grid),
                    block_size=tuple(model.encoder.block_size), tokens_per_block=self.tokens_per_block,
                    visual_tokens=visual_tokens, llm_tokens=length, stages=(encoder, compressor, projector, llm),
                    kv_cache_bytes=kv, dtype=self.dtype, notes=notes)

    def _prefill(self, length: int) -> tuple[Stage, int | None]:
        """The decoder over ``length`` positions and the output layer on the last one."""
        llm = self.model.llm
        embeds = torch.empty(1, length, llm.hidden_size, device="meta", dtype=DTYPES[self.dtype])  # (1, L, D)
        # A ready-made 4D mask keeps transformers from inspecting mask values, which meta tensors lack.
        mask = torch.ones(1, 1, length, length, device="meta", dtype=torch.bool)  # (1, 1, L, L)
        with self._tracking() as peak, FlopCounterMode(display=False) as counter:
            hidden = llm.hidden_states(embeds, attention_mask=mask)  # (1, L, D)
            logits = llm.output_layer()(hidden[:, -1:])  # (1, 1, V)
        del logits
        return Stage("llm prefill", length, llm.hidden_size, counter.get_total_flops(), peak()), self._kv_bytes(length)

    def _kv_bytes(self, length: int) -> int | None:
        config = getattr(getattr(self.model.llm, "model", None), "config", None)
        if config is None or not hasattr(config, "num_hidden_layers"):
            return None
        heads = getattr(config, "num_attention_heads", 1)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        element = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return 2 * config.num_hidden_layers * kv_heads * head_dim * length * element

    def _tile_size(self) -> int:
        probe = self.processor.frame(_blank())
        return probe.pixels.shape[-1]

    @contextlib.contextmanager
    def _tracking(self) -> Iterator[Any]:
        """Yields a function that returns the peak activation bytes of the enclosed code (or None)."""
        if self.memory is None:
            yield lambda: None
            return
        tracker = self.memory()
        tracker.track_external(self.model)
        with tracker:
            yield lambda: _activation_peak(tracker)


def _blank() -> Any:
    from PIL import Image

    return Image.new("RGB", (8, 8))


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise NvilaError(f"An image of {width}x{height} pixels is empty; give a positive width and height.")


def _memory_tracker() -> Any:
    """torch's MemTracker class, or None (said once) when this torch lacks it."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as exc:  # a private torch module: absent in some builds
        log.warning("Activation memory is not planned: torch's MemTracker is unavailable (%s).", exc)
        return None
    return MemTracker


def _activation_peak(tracker: Any) -> int:
    """Peak bytes of activations and temporaries the tracker saw on the meta device."""
    snapshot = tracker.get_tracker_snapshot("peak")
    for device, kinds in snapshot.items():
        if torch.device(device).type == "meta":
            return sum(v for k, v in kinds.items() if getattr(k, "value", k) in ("Activation", "Temp"))
    return 0


def _flops(n: int) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} FLOP"


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_plan(plan: Plan, title: str = "") -> str:
    """A small table of a plan, as ``nvila plan`` prints it."""
    rows, cols = plan.tile_grid
    lines = [f"{title + ': ' if title else ''}{plan.media}, {plan.dtype}",
             f"  tiles: {plan.tiles} (largest-scale grid {rows} x {cols}); blocks: {plan.block_grid[0]} x "
             f"{plan.block_grid[1]} of {plan.block_size[0]} x {plan.block_size[1]} features; "
             f"{plan.tokens_per_block} tokens per block",
             f"  {'stage':<12} {'tokens':>8} {'width':>7} {'compute':>14} {'peak activations':>18}"]
    for s in plan.stages:
        memory = _bytes(s.activation_bytes)
        lines.append(f"  {s.name:<12} {s.tokens:>8,} {s.width:>7,} {_flops(s.flops):>14} {memory:>18}")
    lines.append(f"  {'total':<12} {'':>8} {'':>7} {_flops(plan.flops):>14}")
    lines.append(f"  visual tokens into the LLM: {plan.visual_tokens:,}; prefill length {plan.llm_tokens:,}; "
                 f"KV cache after prefill: {_bytes(plan.kv_cache_bytes)}")
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)
