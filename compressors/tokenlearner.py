"""TokenLearner (Ryoo et al., 2021): K learned spatial attention maps, each pooling the grid into one token.

A small MLP scores every position of the (layer-normalised) feature grid for each of the K output tokens;
a softmax over positions turns each score map into weights, and each token is the weighted mean of the
raw features (the v1.1 form, whose maps sum to one). The token count is K whatever the grid size, and the
width stays C.
"""

from __future__ import annotations

import torch
from torch import nn

from nvila.compressors.configs import TokenLearnerConfig
from nvila.core.errors import NvilaError
from nvila.core.interfaces import Compressor


class TokenLearner(Compressor):
    """K spatial attention maps -> K tokens of width C per block."""

    def __init__(self, config: TokenLearnerConfig, in_channels: int | None = None) -> None:
        super().__init__()
        if in_channels is None:
            raise NvilaError("compressor 'tokenlearner' needs the encoder's width (in_channels) to be built")
        self.num_tokens = config.num_tokens
        self.norm = nn.LayerNorm(in_channels)
        self.score = nn.Sequential(nn.Linear(in_channels, config.hidden), nn.GELU(),
                                   nn.Linear(config.hidden, config.num_tokens))

    def output_shape(self, block_size: tuple[int, int], channels: int) -> tuple[int, int]:
        return self.num_tokens, channels

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        x = blocks.flatten(1, 2)  # (M, h*w, C)
        maps = self.score(self.norm(x)).transpose(1, 2).softmax(-1)  # (M, K, h*w), each map sums to 1
        return maps @ x  # (M, K, C)
