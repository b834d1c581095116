"""Average pooling: each k x k neighbourhood of features becomes their mean (a parameter-free baseline).

Unlike STC, the channel width stays C, so k^2 fewer tokens carry k^2 less information. A grid whose sides
are not multiples of k is pooled with partial windows at the bottom and right edges, each averaged over
the features it really covers (no zero padding dilutes the edge tokens, nothing is cropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nvila.compressors.configs import AvgPoolConfig
from nvila.compressors.grid import merged_grid
from nvila.core.interfaces import Compressor


class AveragePool(Compressor):
    """k x k mean pooling of each feature block; no parameters."""

    def __init__(self, config: AvgPoolConfig, in_channels: int | None = None) -> None:
        super().__init__()
        self.k = config.ratio

    def output_shape(self, block_size: tuple[int, int], channels: int) -> tuple[int, int]:
        rows, cols = merged_grid(self.k, block_size)
        return rows * cols, channels

    def token_grid(self, block_size: tuple[int, int]) -> tuple[int, int] | None:
        return merged_grid(self.k, block_size)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        x = blocks.permute(0, 3, 1, 2)  # (M, C, h, w)
        # ceil_mode without padding: edge windows are clipped to the grid and divide by what they cover
        x = F.avg_pool2d(x, self.k, self.k, ceil_mode=True)  # (M, C, ceil(h/k), ceil(w/k))
        return x.flatten(2).transpose(1, 2)  # (M, n, C)
