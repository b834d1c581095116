"""Identity compressor: every feature becomes a token (the no-compression baseline)."""

from __future__ import annotations

import torch

from nvila.compressors.configs import IdentityConfig
from nvila.core.interfaces import Compressor


class IdentityCompressor(Compressor):
    """Flattens each block's grid into tokens, unchanged."""

    def __init__(self, config: IdentityConfig, in_channels: int | None = None) -> None:
        super().__init__()

    def output_shape(self, block_size: tuple[int, int], channels: int) -> tuple[int, int]:
        return block_size[0] * block_size[1], channels

    def token_grid(self, block_size: tuple[int, int]) -> tuple[int, int] | None:
        return block_size

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.flatten(1, 2)  # (M, h*w, C)
