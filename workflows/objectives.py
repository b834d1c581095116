"""Training objectives, chosen by ``model.loss`` in a recipe: the same next-token cross-entropy, computed three
ways that trade memory for speed. The model knows nothing of them: it hands over logits or hidden states.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nvila.core.losses import chunked_loss, fused_loss
from nvila.core.model import NvilaModel


def _standard(model: NvilaModel, batch: dict[str, Any], chunk_size: int) -> torch.Tensor:
    return model(**batch)["loss"]  # full (B, L, V) logits


def _chunked(model: NvilaModel, batch: dict[str, Any], chunk_size: int) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return chunked_loss(model.hidden_states(**inputs), model.llm.output_layer(), batch["labels"], chunk_size)


def _fused(model: NvilaModel, batch: dict[str, Any], chunk_size: int) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return fused_loss(model.hidden_states(**inputs), model.llm.output_layer(), batch["labels"])


OBJECTIVES: dict[str, Callable[[NvilaModel, dict[str, Any], int], torch.Tensor]] = {
    "standard": _standard,  # full logits: fastest at short sequences and small vocabularies
    "chunked": _chunked,  # one chunk of logits alive at a time, any device
    "fused": _fused,  # Liger's fused linear + cross-entropy kernel, CUDA only
}
"""``model.loss`` name -> ``objective(model, batch, chunk_size) -> scalar loss``."""
