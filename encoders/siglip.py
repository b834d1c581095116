"""SigLIP vision encoder (transformers' ``SiglipVisionModel``), as NVILA uses it.

Features come from a chosen hidden layer (NVILA: the second-to-last), without the attention-pool head.
SigLIP has no class token, so every output token is a patch feature. Defaults build a tiny
random-initialised model for tests and the demo; ``checkpoint`` loads real weights from a local Hugging
Face directory (e.g. a downloaded ``Efficient-Large-Model/paligemma-siglip-so400m-patch14-448``), and its
``preprocessor_config.json``, when present, supplies the normalisation constants.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from nvila.core.errors import NvilaError
from nvila.core.interfaces import VisionEncoder
from nvila.encoders.configs import SiglipConfig
from nvila.encoders.preprocess import TileProcessor
from nvila.plugins import attention


class SiglipEncoder(VisionEncoder):
    """SigLIP vision tower: each tile becomes one (S/p, S/p) block of features."""

    # SigLIP normalises to [-1, 1]; a checkpoint's preprocessor_config.json overrides these.
    MEAN = (0.5, 0.5, 0.5)
    STD = (0.5, 0.5, 0.5)

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.config = config
        # 'sdpa' runs nvila's SDPA function: transformers' own, but bf16 inference on CPUs takes nvila's kernel
        implementation = attention.register() if config.attn_implementation == "sdpa" else config.attn_implementation
        if config.checkpoint:
            try:
                self.vision = SiglipVisionModel.from_pretrained(
                    config.checkpoint, attn_implementation=implementation, local_files_only=True)
            except OSError as exc:
                raise NvilaError(f"Cannot load SigLIP weights from '{config.checkpoint}': {exc}. "
                                 "Point `checkpoint` at a local directory with config.json and "
                                 "*.safetensors.") from None
        else:
            hf = SiglipVisionConfig(
                hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                image_size=config.image_size, patch_size=config.patch_size, vision_use_head=False)
            hf._attn_implementation = implementation
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
        # transformers' patch embedding returns a transposed view ((T, C, h*w) seen as (T, h*w, C)), and every
        # residual add after it keeps that layout: each LayerNorm then copies its input first and each add walks it
        # strided (0.2 s of the mid tower at 896x896 on one core, in bf16 and W8A8 alike). One copy here instead.
        self.vision.embeddings.register_forward_hook(_contiguous)

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


def _contiguous(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()


def _normalisation(checkpoint: str | None, mean: tuple[float, ...],
                   std: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from a checkpoint's preprocessor_config.json, else the given defaults."""
    path = Path(checkpoint) / "preprocessor_config.json" if checkpoint else None
    if path is None or not path.is_file():
        return mean, std
    settings = json.loads(path.read_text())
    return tuple(settings.get("image_mean", mean)), tuple(settings.get("image_std", std))
