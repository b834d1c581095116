"""k x k average pooling: each k x k window of neighbouring features becomes one token of the same width.

A deliberately simple compressor to start from. Edges that are not a multiple of k form smaller
windows (averaged over the features they hold), so nothing is cropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from nvila.core.interfaces import Compressor

from nvila_myplugin.configs import AveragePoolConfig


class AveragePool(Compressor):
    """k x k average pooling of each feature block; no parameters."""

    def __init__(self, config: AveragePoolConfig, in_channels: int | None = None) -> None:
        super().__init__()
        self.k = config.stride

    def output_shape(self, block_size: tuple[int, int], channels: int) -> tuple[int, int]:
        h, w = block_size
        return -(-h // self.k) * -(-w // self.k), channels  # ceil(h/k) * ceil(w/k) tokens, width unchanged

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        x = blocks.permute(0, 3, 1, 2)  # (M, C, h, w)
        x = F.avg_pool2d(x, self.k, ceil_mode=True)  # (M, C, ceil(h/k), ceil(w/k))
        return x.flatten(2).transpose(1, 2)  # (M, n, C)
