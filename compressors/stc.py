"""Spatial-to-channel (STC): each k x k block of neighbouring tokens becomes one token with k^2 x C channels.

NVILA's choice is k = 2 (4x fewer tokens); k = 3 is its ``mlp_downsample_3x3_fix`` variant (use it with the
``mlp-3x3`` projector). The channel layout matches NVILA's released projectors for both: within a block,
tokens are laid out row by row, ``[(0,0), (0,1), (1,0), (1,1)]`` for k = 2, each contributing its C
channels in turn. A grid whose sides are not multiples of k is zero-padded at the
bottom and right edges; nothing is cropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nvila.compressors.configs import STCConfig
from nvila.compressors.grid import merged_grid
from nvila.core.interfaces import Compressor


class SpatialToChannel(Compressor):
    """k x k spatial-to-channel reshape; no parameters."""

    def __init__(self, config: STCConfig, in_channels: int | None = None) -> None:
        super().__init__()
        self.k = config.ratio

    def output_shape(self, block_size: tuple[int, int], channels: int) -> tuple[int, int]:
        rows, cols = merged_grid(self.k, block_size)
        return rows * cols, channels * self.k**2

    def token_grid(self, block_size: tuple[int, int]) -> tuple[int, int] | None:
        return merged_grid(self.k, block_size)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        k = self.k
        m, h, w, c = blocks.shape
        blocks = F.pad(blocks, (0, 0, 0, (-w) % k, 0, (-h) % k))  # (M, H', W', C), H', W' multiples of k
        hk, wk = blocks.shape[1] // k, blocks.shape[2] // k
        x = blocks.reshape(m, hk, k, wk, k, c)  # (M, H'/k, k_row, W'/k, k_col, C)
        x = x.permute(0, 1, 3, 2, 4, 5)  # (M, H'/k, W'/k, k_row, k_col, C)
        return x.reshape(m, hk * wk, k * k * c)  # (M, N, k^2 C)
