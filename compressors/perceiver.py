"""Perceiver resampler (Flamingo, Alayrac et al., 2022): K learned latents read the visual tokens.

Each layer lets the latents cross-attend to the block's features and to themselves (keys and values are
the features and the latents together, as in Flamingo), then passes them through a feed-forward layer,
both with residual connections. The output is the K latents of width C, whatever the grid size. The
encoder's features already carry position embeddings, so the resampler adds none of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nvila.compressors.configs import PerceiverConfig
from nvila.core.errors import NvilaError
from nvila.core.interfaces import Compressor


class CrossAttention(nn.Module):
    """Latents attend to [features; latents]: Flamingo's ``PerceiverAttention``."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm_media(features), self.norm_latents(latents)  # (M, N, C), (M, K, C)
        q = self.to_q(latents).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (M, H, K, d)
        kv = self.to_kv(torch.cat([features, latents], dim=1))  # (M, N+K, 2*H*d)
        k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in kv.chunk(2, dim=-1))  # (M, H, N+K, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (M, H, K, d)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (M, K, C)


class PerceiverLayer(nn.Module):
    """Cross-attention then feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, ff_mult: int) -> None:
        super().__init__()
        self.attention = CrossAttention(dim, heads, head_dim)
        self.feed_forward = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                                          nn.Linear(dim * ff_mult, dim, bias=False))

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attention(features, latents)  # (M, K, C)
        return latents + self.feed_forward(latents)  # (M, K, C)


class PerceiverResampler(Compressor):
    """K learned latents, refined by a few cross-attention layers over each block's features."""

    def __init__(self, config: PerceiverConfig, in_channels: int | None = None) -> None:
        super().__init__()
        if in_channels is None:
            raise NvilaError("compressor 'perceiver' needs the encoder's width (in_channels) to be built")
        self.latents = nn.Parameter(torch.randn(config.num_latents, in_channels) * 0.02)  # (K, C)
        self.layers = nn.ModuleList(PerceiverLayer(in_channels, config.heads, config.head_dim, config.ff_mult)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(in_channels)

    def output_shape(self, block_size: tuple[int, int], channels: int) -> tuple[int, int]:
        return self.latents.shape[0], channels

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        features = blocks.flatten(1, 2)  # (M, h*w, C)
        # a copy per block, not an expand() view: a view of a parameter made under no_grad still claims
        # requires_grad without a grad_fn, which breaks tools that hook module inputs (torch's MemTracker)
        latents = self.latents.repeat(features.shape[0], 1, 1)  # (M, K, C)
        for layer in self.layers:
            latents = layer(features, latents)  # (M, K, C)
        return self.norm(latents)  # (M, K, C)
