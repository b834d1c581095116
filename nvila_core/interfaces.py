"""One small interface per plugin kind, with its shape contract.

Shapes travel between components as plain tensors plus a little typed description:
an encoder returns feature *blocks* ``(M, h, w, C)``; each image contributes ``rows * cols`` blocks
(one for a plain encoder, the tile grid of the largest scale for DynS2). A compressor turns each block
into ``n`` tokens, so an image costs ``rows * cols * n`` visual tokens, known before the model runs.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from nvila.core.errors import NvilaError
from nvila.core.registry import TEMPORAL_STAGES  # noqa: F401  (defined torch-free, for configs)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedImage:
    """One image after its encoder's preprocessing: tiles, and the grid of feature blocks they yield."""

    pixels: torch.Tensor
    """(T, 3, S, S) normalised tiles."""
    grid: tuple[int, int] = (1, 1)
    """(rows, cols) of feature blocks this image produces."""

    @property
    def num_blocks(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class TilePlan:
    """What an encoder will do with an image of a given size, known without decoding it."""

    tiles: int
    """Tiles the encoder runs on (all scales together)."""
    grid: tuple[int, int] = (1, 1)
    """(rows, cols) of feature blocks the image yields."""


class ImageProcessor(ABC):
    """Pixels for an encoder; small and picklable, because it runs in DataLoader workers."""

    @abstractmethod
    def __call__(self, image: Image.Image) -> PreparedImage: ...

    @abstractmethod
    def plan(self, width: int, height: int) -> TilePlan:
        """Tiles and block grid for a ``width`` x ``height`` image, exactly as ``__call__`` would produce."""

    def frame(self, image: Image.Image) -> PreparedImage:
        """One video frame: by default like an image; multi-scale encoders use their base resolution only."""
        return self(image)


class VisionEncoder(nn.Module, ABC):
    """Pixels -> feature blocks ``(M, h, w, C)``; owns its preprocessing."""

    out_channels: int
    """C, the width of each feature."""
    block_size: tuple[int, int]
    """(h, w) of each feature block."""
    blocks_form_one_map: bool = False
    """True when an image's blocks are tiles of one feature map (S2, DynS2), so that its visual tokens are
    stitched back into that map and read row by row across it, as NVILA does; False keeps them block by
    block (independent tiles)."""

    @abstractmethod
    def processor(self) -> ImageProcessor:
        """The preprocessing this encoder expects, detached from its weights."""

    @abstractmethod
    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """Tiles ``(T, 3, S, S)`` of a batch of images, their block grids -> blocks ``(sum r*c, h, w, C)``."""

    def fsdp_wrap_modules(self) -> set[type[nn.Module]]:
        """Module classes FSDP should wrap individually (the transformer layers)."""
        return set()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward instead of storing them."""
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")


class Compressor(nn.Module, ABC):
    """Feature blocks ``(M, h, w, C)`` -> tokens ``(M, n, C')``."""

    @abstractmethod
    def output_shape(self, block_size: tuple[int, int], channels: int) -> tuple[int, int]:
        """(n tokens per block, C' channels per token) for blocks of ``block_size`` with ``channels``.

        Exact for every grid (odd sizes too): the processor expands placeholders by it before the model
        runs. Raises ValueError naming the setting and its valid range when the grid is too small for it.
        """

    @abstractmethod
    def forward(self, blocks: torch.Tensor) -> torch.Tensor: ...

    def token_grid(self, block_size: tuple[int, int]) -> tuple[int, int] | None:
        """(rows, cols) when a block's tokens are a row-major spatial grid, None when they are not spatial
        (learned queries); spatial tokens of neighbouring blocks can then be stitched into one map."""
        return None


class TemporalCompressor(nn.Module, ABC):
    """A video's frames ``(F, *rest)`` -> fewer frames ``(output_frames(F), *rest)``.

    ``rest`` is whatever the stage named by ``where`` holds per frame (blocks, tokens or embeddings);
    the same position in every frame lines up, so a temporal compressor never mixes positions.
    """

    where: str = "after-projector"
    """One of TEMPORAL_STAGES."""
    frame_end: str | None = None
    """Text whose token embeddings end each output frame (NVILA: a newline), or None."""

    @abstractmethod
    def output_frames(self, frames: int) -> int:
        """Frames out for ``frames`` in; raises ValueError naming the setting when ``frames`` is invalid."""

    @abstractmethod
    def forward(self, frames: torch.Tensor) -> torch.Tensor: ...


class LanguageModel(nn.Module, ABC):
    """A causal language model that accepts input embeddings (so visual tokens can be spliced in)."""

    hidden_size: int

    @abstractmethod
    def load_tokenizer(self) -> Any:
        """Its tokenizer (a transformers tokenizer with a chat template)."""

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, D)."""

    @abstractmethod
    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) -> logits (B, L, V)."""

    @abstractmethod
    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) -> final hidden states (B, L, D), before the output layer (for memory-lean losses)."""

    @abstractmethod
    def output_layer(self) -> nn.Linear:
        """The layer that maps hidden states to vocabulary logits."""

    def forward_with_cache(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                           position_ids: torch.Tensor, cache: Any = None,
                           last_only: bool = True) -> tuple[torch.Tensor, Any]:
        """One step of inference: new tokens' embeddings (B, L, D) -> (logits, cache).

        ``cache`` is None for the prompt (prefill) and afterwards what the previous call returned; the
        inference engine (``nvila.core.engine``) treats it as opaque. ``attention_mask`` (B, past + L) covers
        the cached tokens and the new ones (0 on left padding); ``position_ids`` (B, L) are the new tokens'
        positions. Logits are (B, 1, V) for the last new token when ``last_only``, else (B, L, V).

        This default keeps the embeddings and recomputes the whole sequence at every step: correct for any
        language model, but slow. Backbones with a KV cache (Qwen2) override it.
        """
        if not getattr(type(self), "_warned_no_kv_cache", False):
            type(self)._warned_no_kv_cache = True
            log.warning("%s has no KV cache (it does not override LanguageModel.forward_with_cache): decoding "
                        "recomputes the whole sequence at every step.", type(self).__name__)
        new = inputs_embeds.shape[1]
        if cache is not None:
            inputs_embeds = torch.cat([cache[0], inputs_embeds], dim=1)  # (B, past + L, D)
            position_ids = torch.cat([cache[1], position_ids], dim=1)  # (B, past + L)
        logits = self(inputs_embeds, attention_mask=attention_mask, position_ids=position_ids)  # (B, past + L, V)
        return logits[:, -1 if last_only else -new:], (inputs_embeds, position_ids)

    def select_cache(self, cache: Any, rows: torch.Tensor, start: int = 0) -> Any:
        """The cache of some sequences only: ``rows`` (a 1-D index tensor), without the first ``start`` positions
        (left padding that every kept row has). Consumes ``cache``.

        Continuous batching (``nvila.core.scheduler``) drops finished sequences with this. The default handles
        the recomputing cache above and transformers' ``DynamicCache`` of full-attention layers; a backbone
        with another kind of cache overrides this and :meth:`concat_caches`.
        """
        if isinstance(cache, tuple):  # the recomputing cache: (embeds (B, L, D), position ids (B, L))
            return tuple(t[rows, start:] for t in cache)
        for layer in _full_attention_layers(self, cache):  # a growing layer's room goes with the assignment
            layer.keys = layer.keys[rows, :, start:]  # (B', H, L - start, d)
            layer.values = layer.values[rows, :, start:]
        return cache

    def concat_caches(self, caches: list[Any], lengths: list[int]) -> Any:
        """Several batches' caches as one batch, in order: each of ``lengths[i]`` positions is left-padded with
        zeros to the longest (the attention mask covers the padding). Consumes ``caches``.

        Continuous batching joins a newly prefilled request to the running batch with this.
        """
        longest = max(lengths)
        if all(isinstance(c, tuple) for c in caches):
            return tuple(torch.cat([nn.functional.pad(c[k], (0, 0) * (c[k].ndim - 2) + (longest - n, 0))
                                    for c, n in zip(caches, lengths)]) for k in range(len(caches[0])))
        per_cache = [_full_attention_layers(self, c) for c in caches]
        for layer, *others in zip(*per_cache):
            for name in ("keys", "values"):
                tensors = [getattr(x, name) for x in (layer, *others)]  # each (B_i, H, n_i, d)
                setattr(layer, name, torch.cat([nn.functional.pad(t, (0, 0, longest - n, 0))
                                                for t, n in zip(tensors, lengths)]))  # (sum B_i, H, longest, d)
        return caches[0]

    @abstractmethod
    def resize_vocab(self, size: int) -> None:
        """Grow the embedding and output layers to ``size`` tokens (for added media tokens)."""

    def fsdp_wrap_modules(self) -> set[type[nn.Module]]:
        return set()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward instead of storing them."""
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")

    def lora_target_modules(self) -> list[str]:
        """Default module names LoRA adapts (the attention and MLP projections)."""
        return []


def _full_attention_layers(llm: LanguageModel, cache: Any) -> list[Any]:
    """The layers of a transformers ``DynamicCache`` whose every layer keeps all positions (no sliding window)."""
    from transformers.cache_utils import DynamicLayer

    from nvila.core import kv_cache

    layers = getattr(cache, "layers", None)
    if layers is None or not all(type(layer) in (DynamicLayer, kv_cache.GrowingLayer) for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or ()}) or [type(cache).__name__]
        raise NvilaError(f"{type(llm).__name__} keeps a cache ({', '.join(kinds)}) that continuous batching cannot "
                         "split or join: override LanguageModel.select_cache and concat_caches for it.")
    return list(layers)


class PrecisionBackend(ABC):
    """How training stores and computes weights and activations (fp32, bf16, FP8).

    Training only: inference-time quantization of a trained model is a kind of its own (quantizers).
    """

    lightning_precision: str = "32-true"
    """The Lightning ``precision`` flag this backend trains with."""

    def check_available(self) -> None:
        """Raise NvilaError naming what is missing when this machine cannot run the backend."""

    def prepare(self, model: nn.Module) -> nn.Module:
        """Convert the model (in place where possible) before training or serving."""
        return model


Calibration = Callable[[], None]
"""Runs the whole model on calibration samples once; a quantizer hooks its part's layers to see their inputs."""


class Quantizer(ABC):
    """Inference-time quantization of one part of a trained model (W8A8 vision tower, W4A16 language model).

    ``quantize`` replaces layers of the part in place. The quantized layers' state dict holds plain tensors
    only (integers and their scales, no tensor subclasses and no packed kernel layouts), so a quantized
    model saves to safetensors like any other; loading rebuilds the model from its spec, whose ``quant``
    names the quantizer of each part, and the checkpoint's integers replace those of the rebuilt layers.
    Layers pack their integers into the layout of their device's kernel when they first run.

    Training only ever sees full-precision parts: quantization is for serving (see ``PrecisionBackend``).
    """

    calibrates: bool = False
    """True when ``quantize`` uses calibration (activation statistics, as AWQ does). Without calibration it must
    still make layers with the same state-dict keys and shapes, so that a model built from a spec loads any
    checkpoint written from that spec."""

    def check_available(self, device: torch.device) -> None:
        """Raise NvilaError naming what is needed, and the alternative, when ``device`` has no kernel for this."""

    @abstractmethod
    def quantize(self, part: nn.Module, calibrate: Calibration | None = None) -> list[str]:
        """Quantize ``part`` in place and return the names of the layers quantized (relative to ``part``).

        ``calibrate``, when given, runs the whole model on calibration samples; a quantizer that
        ``calibrates`` hooks the part's layers, calls it, and removes its hooks. Raise NvilaError for a
        layer it cannot take (a width its group size does not divide), naming the layer and the setting.
        """
