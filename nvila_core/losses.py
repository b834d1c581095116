"""Next-token cross-entropy, plain or memory-lean for large vocabularies.

The plain loss materialises logits for every position, ``(B, L, V)`` floats: for Qwen2's 152k vocabulary
and 4k tokens that is 2.5 GB per sample before the backward pass doubles it. The chunked loss computes
logits a chunk of positions at a time and recomputes them in backward (activation checkpointing), so
only one chunk's logits are alive at once. On a GPU with Liger installed, its fused kernel does the same
in one Triton kernel.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nvila.core.errors import NvilaError
from nvila.core.processor import IGNORE_INDEX

log = logging.getLogger(__name__)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for each position: the next token's label, -100 at the end. (B, L) -> (B, L)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def standard_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised positions, from full logits (B, L, V)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), shift_labels(labels).flatten(), ignore_index=IGNORE_INDEX)


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()  # (chunk, V)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_loss(hidden: torch.Tensor, output: torch.nn.Linear, labels: torch.Tensor,
                 chunk_size: int = 1024) -> torch.Tensor:
    """The same value as :func:`standard_loss`, holding one chunk of logits at a time (also in backward)."""
    targets = shift_labels(labels).flatten()  # (B*L,)
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden.flatten(0, 1)[keep], targets[keep]  # only supervised positions need logits
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(_chunk_loss_sum, hidden[start:end], output.weight, output.bias,
                                   targets[start:end], use_reentrant=False)
    return total / keep.sum().clamp(min=1)


@functools.cache
def _liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise NvilaError("loss 'fused' needs Liger's kernel on a CUDA GPU: `pip install 'nvila[gpu]'` there, "
                         "or use loss 'chunked', which works everywhere.") from None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)


def fused_loss(hidden: torch.Tensor, output: torch.nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear + cross-entropy kernel (CUDA only)."""
    if not hidden.is_cuda:
        raise NvilaError("loss 'fused' runs Liger's Triton kernel and needs a CUDA GPU; on this device use "
                         "loss 'chunked' (same memory saving, plain PyTorch).")
    targets = shift_labels(labels).flatten()
    return _liger_loss()(output.weight, hidden.flatten(0, 1), targets, output.bias)
