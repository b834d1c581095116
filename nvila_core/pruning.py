"""The pruner interface, and what every pruner shares: per-sample answer losses and the keep rule.

A pruner scores training samples; ``nvila prune`` keeps the highest-scoring fraction of each source data
set of the mixture (the ``source`` field of each record), so that pruning never wipes out a small data set.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nvila.core.losses import shift_labels
from nvila.core.processor import IGNORE_INDEX


@dataclass
class ScoringBatch:
    """A batch of samples to score: who they are, and their model inputs for each model role."""

    ids: list[str]
    """``shard:key`` of each sample."""
    sources: list[str]
    """The source data set of each sample."""
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per model role (``small``, ``large``), the padded batch that model's processor made of the samples."""


class Pruner(ABC):
    """Scores samples: higher is kept first. Stateless between batches, so scoring can run on many devices."""

    models: tuple[str, ...] = ()
    """Roles of the checkpoints it scores with (``("small", "large")``); empty for model-free pruners."""

    @abstractmethod
    def score(self, batch: ScoringBatch, models: dict[str, nn.Module]) -> torch.Tensor:
        """(B,) float scores of the batch's samples, independent of their batch mates; NaN: cannot be scored."""


def answer_losses(model: nn.Module, inputs: dict[str, Any], reduction: str = "mean") -> torch.Tensor:
    """Per sample, the cross-entropy of its answer tokens (labels != -100): their mean or sum. (B,); NaN if none."""
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"})["logits"]  # (B, L, V)
    targets = shift_labels(inputs["labels"])  # (B, L)
    token_loss = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX,
                                 reduction="none")  # (B, L)
    counts = (targets != IGNORE_INDEX).sum(-1)  # (B,)
    total = token_loss.sum(-1)  # (B,)
    value = total / counts.clamp(min=1) if reduction == "mean" else total
    return torch.where(counts > 0, value, torch.full_like(value, math.nan))


@dataclass
class Selection:
    """The samples kept, and per source: how many there were, were kept, and the lowest kept score."""

    kept: set[str]
    per_source: dict[str, dict[str, float]]


def select(scored: dict[str, tuple[str, float]], keep: float) -> Selection:
    """Keep the top ``keep`` fraction (rounded to nearest) of each source by score; ties broken by id.

    ``scored`` maps sample id -> (source, score); NaN scores are never kept.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    by_source: dict[str, list[tuple[float, str]]] = {}
    unscorable: dict[str, int] = {}
    for sample_id, (source, score) in scored.items():
        if math.isnan(score):
            unscorable[source] = unscorable.get(source, 0) + 1
        else:
            by_source.setdefault(source, []).append((score, sample_id))
    kept: set[str] = set()
    per_source: dict[str, dict[str, float]] = {}
    for source in sorted(set(by_source) | set(unscorable)):
        ranked = sorted(by_source.get(source, []), key=lambda item: (-item[0], item[1]))
        n_keep = min(len(ranked), max(1 if ranked else 0, math.floor(keep * len(ranked) + 0.5)))
        kept.update(sample_id for _, sample_id in ranked[:n_keep])
        total = len(ranked) + unscorable.get(source, 0)
        per_source[source] = {
            "total": total, "scored": len(ranked), "kept": n_keep, "kept_fraction": n_keep / total if total else 0.0,
            "threshold": ranked[n_keep - 1][0] if n_keep else math.nan}
    return Selection(kept, per_source)
