"""DeltaLoss data pruning (NVILA, arXiv 2412.04468): keep the samples a large model finds much easier than a small one.

A sample's score is the log-probability ratio of the large model over the small model on its answer
tokens, per token: ``mean_t [log p_large(y_t | y_<t, x) - log p_small(y_t | y_<t, x)]``, which is the small
model's mean answer-token loss minus the large model's. Samples both models find easy, or both find
hard, score near zero; samples only the small model gets right score below zero ("distracting"). The
top fraction of each source data set is kept. ``docs/data.md`` has the formula and how it reads the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from nvila.core.pruning import Pruner, ScoringBatch, answer_losses
from nvila.plugins.configs import DeltaLossConfig


class DeltaLossPruner(Pruner):
    """Score = small model's answer loss - large model's (the log-probability ratio large / small)."""

    models = ("small", "large")

    def __init__(self, config: DeltaLossConfig) -> None:
        self.config = config

    def score(self, batch: ScoringBatch, models: dict[str, nn.Module]) -> torch.Tensor:
        small = answer_losses(models["small"], batch.inputs["small"], self.config.reduction)  # (B,)
        large = answer_losses(models["large"], batch.inputs["large"], self.config.reduction)  # (B,)
        return small - large
