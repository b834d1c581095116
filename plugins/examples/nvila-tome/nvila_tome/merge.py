"""ToMe-style token merging: bipartite soft matching on each feature block, repeated to a fixed token count.

One round (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, Sec. 3): split the N tokens
into two alternating sets, A (even positions) and B (odd positions); match each A token to its most
similar B token by the cosine similarity of their features; merge the r best-matched A tokens into
their B partners by size-weighted averaging (a token's size is how many original tokens it stands for);
the other A tokens stay. Rounds repeat until ``ceil(h * w / ratio)`` tokens remain, so the output count
depends only on the block size and ``output_shape`` is exact. Survivors keep the raster order of their
positions, so the language model still reads tokens top-left to bottom-right.

Unlike ToMe inside a ViT, which matches attention keys in every layer, this runs once, after the
encoder, on the features themselves. It has no parameters and keeps the feature width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from nvila.core.interfaces import Compressor


@dataclass
class TokenMergingConfig:
    """Token-merging settings."""

    ratio: int = 4
    """Merge until ceil(h*w / ratio) tokens remain per feature block (4 gives STC 2x2's token count)."""
    merge_fraction: float = 0.5
    """Share of set A merged in each round, in (0, 1]. Smaller shares take more rounds and re-match after
    each one, so dissimilar tokens stay apart longer; 1.0 merges every A token each round."""
    size_weighted: bool = True
    """Weight each side of a merge by how many original tokens it stands for, so a merged token is the
    mean of its originals (ToMe); false takes plain means at each merge."""

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ValueError(f"ratio must be a positive integer, got {self.ratio}")
        if not 0.0 < self.merge_fraction <= 1.0:
            raise ValueError(f"merge_fraction must be in (0, 1], got {self.merge_fraction}")


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (M, k) of ``x`` (M, N, D) -> (M, k, D)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def merge_round(x: torch.Tensor, size: torch.Tensor, pos: torch.Tensor, r: int,
                size_weighted: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One bipartite matching round: the r best-matched A tokens merge into B; N -> N - r tokens.

    ``x`` (M, N, C) features, ``size`` (M, N, 1) original tokens per token, ``pos`` (M, N) raster position.
    """
    c = x.shape[-1]
    a, b = x[:, ::2], x[:, 1::2]  # (M, Na, C), (M, Nb, C)
    size_a, size_b = size[:, ::2], size[:, 1::2]  # (M, Na, 1), (M, Nb, 1)
    scores = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)  # (M, Na, Nb) cosine
    best, partner = scores.max(dim=-1)  # (M, Na): each A token's most similar B token
    order = best.argsort(dim=-1, descending=True, stable=True)  # (M, Na) best matches first
    merged, kept = order[:, :r], order[:, r:]  # (M, r), (M, Na - r) indices into A
    dst = partner.gather(1, merged).unsqueeze(-1)  # (M, r, 1) indices into B

    weight_a, weight_b = (size_a, size_b) if size_weighted else (torch.ones_like(size_a), torch.ones_like(size_b))
    src_weight = _take(weight_a, merged)  # (M, r, 1)
    b_sum = (b * weight_b).scatter_add(1, dst.expand(-1, -1, c), _take(a, merged) * src_weight)  # (M, Nb, C)
    b = b_sum / weight_b.scatter_add(1, dst, src_weight)  # (M, Nb, C) weighted means
    b_size = size_b.scatter_add(1, dst, _take(size_a, merged))  # (M, Nb, 1) originals per B token

    x = torch.cat([_take(a, kept), b], dim=1)  # (M, N - r, C)
    size = torch.cat([_take(size_a, kept), b_size], dim=1)  # (M, N - r, 1)
    pos = torch.cat([pos[:, ::2].gather(1, kept), pos[:, 1::2]], dim=1)  # (M, N - r)
    raster = pos.argsort(dim=1)  # (M, N - r) back to top-left-to-bottom-right order
    return _take(x, raster), _take(size, raster), pos.gather(1, raster)


def merge_tokens(x: torch.Tensor, target: int, merge_fraction: float = 0.5,
                 size_weighted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens ``(M, N, C)`` down to ``(M, target, C)``; also returns each token's size ``(M, target, 1)``."""
    m, n, _ = x.shape
    size = x.new_ones(m, n, 1)  # (M, N, 1)
    pos = torch.arange(n, device=x.device).expand(m, n)  # (M, N)
    while n > target:
        r = min(n - target, max(1, int(math.ceil(n / 2) * merge_fraction)))  # at most |A| = ceil(n/2)
        x, size, pos = merge_round(x, size, pos, r, size_weighted)  # (M, n - r, C)
        n -= r
    return x, size


class TokenMerging(Compressor):
    """ToMe bipartite soft matching on each feature block, down to ceil(h*w / ratio) tokens; no parameters."""

    def __init__(self, config: TokenMergingConfig, in_channels: int | None = None) -> None:
        super().__init__()
        self.config = config

    def output_shape(self, block_size: tuple[int, int], channels: int) -> tuple[int, int]:
        h, w = block_size
        return -(-h * w // self.config.ratio), channels

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        m, h, w, c = blocks.shape
        target, _ = self.output_shape((h, w), c)
        # float32 inside: similarities and sizes (counts up to h*w) lose too much in bf16
        tokens, _ = merge_tokens(blocks.float().reshape(m, h * w, c), target,  # (M, h*w, C) -> (M, n, C)
                                 self.config.merge_fraction, self.config.size_weighted)
        return tokens.to(blocks.dtype)
