"""Random data pruning, the baseline any scored pruner must beat: a seeded, order-free coin per sample."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from nvila.core.pruning import Pruner, ScoringBatch
from nvila.plugins.configs import RandomPrunerConfig


class RandomPruner(Pruner):
    """Uniform random scores from a hash of (seed, sample id): reproducible, independent of batching."""

    def __init__(self, config: RandomPrunerConfig) -> None:
        self.config = config

    def score(self, batch: ScoringBatch, models: dict[str, nn.Module]) -> torch.Tensor:
        draws = [int.from_bytes(hashlib.sha256(f"{self.config.seed}:{i}".encode()).digest()[:8], "big") / 2**64
                 for i in batch.ids]
        return torch.tensor(draws, dtype=torch.float64)
