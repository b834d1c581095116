"""Any timm Vision Transformer as the vision encoder, by its timm name.

The model is created with ``pretrained=False`` (nothing is downloaded); real weights come from a local
``.safetensors`` file. Features are one block's output taken with timm's ``forward_intermediates``; the
blocks after it, the final norm and the head are pruned once the weights are loaded (they would cost
compute and leave parameters without gradients, which DDP refuses). Prefix tokens (class and register
tokens) still take part in attention but are dropped from the output: the block contract is a spatial
grid, so only patch tokens have a place in it. Normalisation constants come from the model's timm
``pretrained_cfg``.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from nvila.core.errors import NvilaError
from nvila.core.interfaces import VisionEncoder
from nvila.encoders.configs import TimmViTConfig
from nvila.encoders.preprocess import TileProcessor


class TimmViTEncoder(VisionEncoder):
    """A timm Vision Transformer: each tile becomes one (S/p, S/p) block of patch features."""

    def __init__(self, config: TimmViTConfig) -> None:
        super().__init__()
        self.config = config
        try:
            self.vit = timm.create_model(config.model, pretrained=False, num_classes=0, **config.overrides())
        except RuntimeError as exc:
            if "Unknown model" not in str(exc):
                raise
            close = difflib.get_close_matches(config.model, timm.list_models(), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise NvilaError(f"timm has no model '{config.model}'.{hint} `timm.list_models('vit_*')` lists "
                             "the ViTs.") from None
        if not hasattr(self.vit, "forward_intermediates") or not hasattr(self.vit, "patch_embed"):
            raise NvilaError(f"timm model '{config.model}' is not a Vision Transformer (no patch embedding or "
                             "forward_intermediates); the timm-vit encoder takes ViTs only.")
        if config.checkpoint:
            self._load(Path(config.checkpoint))
        depth = len(self.vit.blocks)
        if not -depth <= config.feature_layer <= depth:
            raise NvilaError(f"feature_layer {config.feature_layer} is out of range for '{config.model}' with "
                             f"{depth} blocks (valid: -{depth}..-1 and 1..{depth}).")
        block_index = config.feature_layer if config.feature_layer < 0 else config.feature_layer - 1
        self.vit.prune_intermediate_layers([block_index], prune_norm=True, prune_head=True)  # feature block last
        self.image_size = self.vit.patch_embed.img_size[0]
        self.block_size = tuple(self.vit.patch_embed.grid_size)
        self.out_channels = self.vit.embed_dim
        pretrained = self.vit.pretrained_cfg
        self.mean = tuple(pretrained.get("mean", (0.5, 0.5, 0.5)))
        self.std = tuple(pretrained.get("std", (0.5, 0.5, 0.5)))

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise NvilaError(f"timm checkpoint '{path}' is not a file; `checkpoint` takes a local .safetensors "
                             "file.")
        try:
            weights = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise NvilaError(f"Cannot read timm weights from '{path}': {exc}") from None
        own = self.vit.state_dict()
        weights = {k: v for k, v in weights.items() if k in own or not k.startswith("head.")}  # no classifier
        missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        if missing or unexpected:
            raise NvilaError(f"timm weights '{path}' do not fit '{self.config.model}' as configured: missing "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}. Check the architecture fields.")
        try:
            self.vit.load_state_dict(weights, strict=True)
        except RuntimeError as exc:  # shape mismatches
            raise NvilaError(f"timm weights '{path}' do not fit '{self.config.model}': "
                             f"{str(exc).splitlines()[1] if len(str(exc).splitlines()) > 1 else exc}") from None

    def processor(self) -> TileProcessor:
        return TileProcessor(self.image_size, self.mean, self.std, self.config.max_pixels)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        if any(g != (1, 1) for g in grids) or len(grids) != pixels.shape[0]:
            raise ValueError("timm-vit encodes one tile per image; use a multi-scale encoder for tiled images")
        dtype = next(self.vit.parameters()).dtype
        (features,) = self.vit.forward_intermediates(  # the last kept block, prefix tokens dropped
            pixels.to(dtype), indices=[-1], intermediates_only=True, output_fmt="NLC")  # (T, h*w, C)
        h, w = self.block_size
        return features.reshape(features.shape[0], h, w, -1)  # (T, h, w, C)

    def enable_gradient_checkpointing(self) -> None:
        self.vit.set_grad_checkpointing(True)

    def fsdp_wrap_modules(self) -> set[type[torch.nn.Module]]:
        return {type(block) for block in self.vit.blocks}
