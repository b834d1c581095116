"""Projectors: map visual tokens from the compressor's width to the language model's width."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class MLPProjectorConfig:
    """NVILA's 2x2 projector: LayerNorm(C') -> Linear(C', D) -> GELU -> Linear(D, D)."""

    layer_norm: bool = True
    """Normalise the incoming tokens first (NVILA: yes, the STC output is un-normalised)."""


def mlp_projector(config: MLPProjectorConfig, in_dim: int, out_dim: int) -> nn.Sequential:
    """Two-layer MLP projector, as in NVILA's STC 2x2 projector."""
    norm = [nn.LayerNorm(in_dim)] if config.layer_norm else []
    return nn.Sequential(*norm, nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


@dataclass
class LinearProjectorConfig:
    """A single linear map (LLaVA-1's projector)."""

    bias: bool = True
    """Add a bias term."""


def linear_projector(config: LinearProjectorConfig, in_dim: int, out_dim: int) -> nn.Linear:
    """Single linear projector."""
    return nn.Linear(in_dim, out_dim, bias=config.bias)
