"""SigLIP vision encoder (transformers' ``SiglipVisionModel``), as NVILA uses it.

Features come from a chosen hidden layer (NVILA: the second-to-last), without the attention-pool head.
SigLIP has no class token, so every output token is a patch feature. Defaults build a tiny
random-initialised model for tests and the demo; ``checkpoint`` loads real weights from a local Hugging
Face directory (e.g. a downloaded ``Efficient-Large-Model/paligemma-siglip-so400m-patch14-448``), and its
``preprocessor_config.json``, when present, supplies the normalisation constants.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from nvila.core.errors import NvilaError
from nvila.core.interfaces import VisionEncoder
from nvila.encoders.preprocess import DEFAULT_MAX_PIXELS, TileProcessor, check_decoding


@dataclass
class SiglipConfig:
    """SigLIP encoder settings; architecture fields are ignored when ``checkpoint`` is set."""

    checkpoint: str | None = None
    """Local Hugging Face directory with SigLIP weights; None builds a random-initialised model."""
    feature_layer: int = -2
    """Hidden layer whose output is used as features (negative counts from the end; NVILA: -2)."""
    image_size: int = 64
    """Input resolution of one tile, in pixels (NVILA: 448)."""
    patch_size: int = 8
    """Patch side in pixels (so400m: 14)."""
    hidden_size: int = 64
    """Feature width C (so400m: 1152)."""
    intermediate_size: int = 128
    """MLP width (so400m: 4304)."""
    num_layers: int = 2
    """Transformer layers (so400m: 27)."""
    num_heads: int = 4
    """Attention heads (so400m: 16)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: 'sdpa' (default, any device), 'eager', or 'flash_attention_2' (GPU, flash-attn)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest image (width x height) the processor accepts; a guard against decompression bombs."""
    alpha: str = "white"
    """Transparent pixels: 'white' composites them onto white (nvila); 'drop' discards alpha (released NVILA)."""
    exif_rotate: bool = True
    """Turn photos upright by their EXIF orientation (nvila); released NVILA never does (false)."""

    def __post_init__(self) -> None:
        if self.checkpoint is None and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        check_decoding(self.alpha, self.max_pixels)


class SiglipEncoder(VisionEncoder):
    """SigLIP vision tower: each tile becomes one (S/p, S/p) block of features."""

    # SigLIP normalises to [-1, 1]; a checkpoint's preprocessor_config.json overrides these.
    MEAN = (0.5, 0.5, 0.5)
    STD = (0.5, 0.5, 0.5)

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.config = config
        if config.checkpoint:
            try:
                self.vision = SiglipVisionModel.from_pretrained(
                    config.checkpoint, attn_implementation=config.attn_implementation, local_files_only=True)
            except OSError as exc:
                raise NvilaError(f"Cannot load SigLIP weights from '{config.checkpoint}': {exc}. "
                                 "Point `checkpoint` at a local directory with config.json and "
                                 "*.safetensors.") from None
        else:
            hf = SiglipVisionConfig(
                hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                image_size=config.image_size, patch_size=config.patch_size, vision_use_head=False)
            hf._attn_implementation = config.attn_implementation
            self.vision = SiglipVisionModel(hf)
        self.mean, self.std = _normalisation(config.checkpoint, self.MEAN, self.STD)
        hf = self.vision.config
        self.image_size = hf.image_size
        self.out_channels = hf.hidden_size
        side = hf.image_size // hf.patch_size
        self.block_size = (side, side)
        layers = hf.num_hidden_layers
        if not -layers - 1 <= config.feature_layer <= layers:
            raise NvilaError(f"feature_layer {config.feature_layer} is out of range for a SigLIP with {layers} "
                             f"layers (valid: {-layers - 1}..{layers}).")
        # Layers after the feature layer and the final norm never reach the features: drop them, which saves
        # their compute and leaves no unused parameters (DDP requires that).
        keep = config.feature_layer % (layers + 1)  # hidden state i is the output of the first i layers
        self.vision.encoder.layers = self.vision.encoder.layers[:keep]
        self.vision.post_layernorm = nn.Identity()

    def processor(self) -> TileProcessor:
        return TileProcessor(self.image_size, self.mean, self.std, self.config.max_pixels, self.config.alpha,
                             self.config.exif_rotate)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        if any(g != (1, 1) for g in grids) or len(grids) != pixels.shape[0]:
            raise ValueError("SigLIP encodes one tile per image; use a multi-scale encoder for tiled images")
        features = self.vision(pixel_values=pixels.to(self.vision.dtype)).last_hidden_state  # (T, h*w, C)
        h, w = self.block_size
        return features.reshape(features.shape[0], h, w, -1)  # (T, h, w, C)

    def enable_gradient_checkpointing(self) -> None:
        self.vision.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def fsdp_wrap_modules(self) -> set[type[torch.nn.Module]]:
        return {SiglipEncoderLayer}


def _normalisation(checkpoint: str | None, mean: tuple[float, ...],
                   std: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from a checkpoint's preprocessor_config.json, else the given defaults."""
    path = Path(checkpoint) / "preprocessor_config.json" if checkpoint else None
    if path is None or not path.is_file():
        return mean, std
    settings = json.loads(path.read_text())
    return tuple(settings.get("image_mean", mean)), tuple(settings.get("image_std", std))
