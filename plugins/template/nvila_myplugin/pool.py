"""k x k average pooling: each k x k window of neighbouring features becomes one token of the same width.

A deliberately simple compressor to start from. Edges that are not a multiple of k form smaller
windows (averaged over the features they hold), so nothing is cropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from nvila.core.interfaces import Compressor


@dataclass
class AveragePoolConfig:
    """Average-pooling settings. Each field's docstring is what `nvila plugins --describe my-pool` shows."""

    stride: int = 2
    """Side k of the square window averaged into one token (2 keeps a quarter of the tokens)."""

    def __post_init__(self) -> None:
        # Runs when a spec is merged onto this config: the message reaches the user as a spec error.
        if self.stride < 1:
            raise ValueError(f"stride must be a positive integer, got {self.stride}")


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
