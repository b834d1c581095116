"""SigLIP vision encoder (transformers' ``SiglipVisionModel``), as NVILA uses it.

Features come from a chosen hidden layer (NVILA: the second-to-last), without the attention-pool head.
Defaults build a tiny random-initialised model for tests and the demo; ``checkpoint`` loads real
weights from a local Hugging Face directory (e.g. a downloaded ``google/siglip-so400m-patch14-384``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from encoders.preprocess import to_rgb, to_tensor
from nvila_core.errors import NvilaError
from nvila_core.interfaces import ImageProcessor, PreparedImage, TilePlan, VisionEncoder


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

    def __post_init__(self) -> None:
        if self.checkpoint is None and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


class SiglipProcessor(ImageProcessor):
    """Resize to one square tile and normalise with the encoder's constants."""

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.image_size, self.mean, self.std = image_size, mean, std

    def __call__(self, image: Image.Image) -> PreparedImage:
        pixels = to_tensor(to_rgb(image), (self.image_size, self.image_size), self.mean, self.std)
        return PreparedImage(pixels[None], grid=(1, 1))  # (1, 3, S, S)

    def plan(self, width: int, height: int) -> TilePlan:
        return TilePlan(tiles=1, grid=(1, 1))


class SiglipEncoder(VisionEncoder):
    """SigLIP vision tower: each tile becomes one (S/p, S/p) block of features."""

    # SigLIP normalises to [-1, 1]; checkpoints' preprocessor configs say the same.
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

    def processor(self) -> SiglipProcessor:
        return SiglipProcessor(self.image_size, self.MEAN, self.STD)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        if any(g != (1, 1) for g in grids) or len(grids) != pixels.shape[0]:
            raise ValueError("SigLIP encodes one tile per image; use a multi-scale encoder for tiled images")
        features = self.vision(pixel_values=pixels.to(self.vision.dtype)).last_hidden_state  # (T, h*w, C)
        h, w = self.block_size
        return features.reshape(features.shape[0], h, w, -1)  # (T, h, w, C)

    def enable_gradient_checkpointing(self) -> None:
        self.vision.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def fsdp_wrap_modules(self) -> set[type[torch.nn.Module]]:
        return {SiglipEncoderLayer}
