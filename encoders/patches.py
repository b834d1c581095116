"""Patches: each tile's pixel patches as features, with no weights.

The identity of encoders: a baseline with no learned vision, and the probe that shows multi-scale
tiling and stitching lose and misplace nothing (with ``patch_size: 1`` the features are the pixels).
"""

from __future__ import annotations

import torch

from nvila.core.interfaces import VisionEncoder
from nvila.encoders.configs import PatchesConfig
from nvila.encoders.preprocess import TileProcessor


class PatchesEncoder(VisionEncoder):
    """Pixels regrouped into (S/p, S/p) patches of 3 p^2 values (channel, row, column within the patch)."""

    MEAN = (0.5, 0.5, 0.5)
    STD = (0.5, 0.5, 0.5)

    def __init__(self, config: PatchesConfig) -> None:
        super().__init__()
        self.config = config
        side = config.image_size // config.patch_size
        self.block_size = (side, side)
        self.out_channels = 3 * config.patch_size**2

    def processor(self) -> TileProcessor:
        return TileProcessor(self.config.image_size, self.MEAN, self.STD, self.config.max_pixels)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        if any(g != (1, 1) for g in grids) or len(grids) != pixels.shape[0]:
            raise ValueError("patches encodes one tile per image; use a multi-scale encoder for tiled images")
        p = self.config.patch_size
        t, c, height, width = pixels.shape
        x = pixels.reshape(t, c, height // p, p, width // p, p)  # (T, 3, h, p, w, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(t, height // p, width // p, c * p * p)  # (T, h, w, 3p^2)
