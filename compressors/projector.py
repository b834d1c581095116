"""Projectors: map visual tokens from the compressor's width to the language model's width."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from nvila.compressors.configs import LinearProjectorConfig, MLP3x3ProjectorConfig, MLPProjectorConfig
from nvila.core.errors import NvilaError


def mlp_projector(config: MLPProjectorConfig, in_dim: int, out_dim: int) -> nn.Sequential:
    """Two-layer MLP projector, as in NVILA's STC 2x2 projector."""
    norm = [nn.LayerNorm(in_dim)] if config.layer_norm else []
    return nn.Sequential(*norm, nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def linear_projector(config: LinearProjectorConfig, in_dim: int, out_dim: int) -> nn.Linear:
    """Single linear projector."""
    return nn.Linear(in_dim, out_dim, bias=config.bias)


def mlp_3x3_projector(config: MLP3x3ProjectorConfig, in_dim: int, out_dim: int) -> nn.Sequential:
    """Three-layer MLP projector with NVILA's module order, as in its STC 3x3 projector."""
    if in_dim % config.reduction:
        raise NvilaError(f"projector 'mlp-3x3': key 'reduction' = {config.reduction} does not divide the incoming "
                         f"width {in_dim}; choose a divisor of it (NVILA: 3, for STC 3x3 tokens of width 9C)")
    mid = in_dim // config.reduction
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, mid), nn.GELU(), nn.LayerNorm(mid),
                         nn.Linear(mid, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


VILA_PREFIXES = ("mm_projector.layers.", "layers.")
"""Where a released NVILA projector's layers sit: ``mm_projector.layers.N.*`` in the model's own state dict,
``layers.N.*`` in a released ``mm_projector/model.safetensors`` (the official save strips ``mm_projector.``)."""


def vila_projector_state_dict(state: Mapping[str, torch.Tensor],
                              prefix: str | None = None) -> dict[str, torch.Tensor]:
    """A released NVILA projector's weights, renamed for our ``mlp`` / ``mlp-3x3`` projector.

    NVILA's projector is one ``nn.Sequential`` whose layer 0 is its parameter-free downsample block (our STC
    compressor) followed by the same layers in the same order as ours; so its layer ``i`` is our layer
    ``i - 1`` (``layers.2.weight`` -> ``1.weight``). ``prefix`` None accepts both layouts (see
    :data:`VILA_PREFIXES`); keys outside it are ignored. Load the result with
    ``model.projector.load_state_dict(..., strict=True)``.
    """
    prefixes = VILA_PREFIXES if prefix is None else (prefix,)
    out = {}
    for key, value in state.items():
        start = next((p for p in prefixes if key.startswith(p)), None)
        if start is None:
            continue
        index, _, rest = key[len(start):].partition(".")
        if not index.isdigit() or int(index) == 0:
            raise NvilaError(f"'{key}' is not a layer of an NVILA mlp_downsample projector (layer 0, the "
                             "downsample block, has no weights)")
        out[f"{int(index) - 1}.{rest}"] = value
    return out


def vila_projector_export(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`vila_projector_state_dict`: our projector's weights under the released file's names
    (``1.weight`` -> ``layers.2.weight``), as NVILA's save writes ``mm_projector/model.safetensors``."""
    out = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        if not index.isdigit():
            raise NvilaError(f"'{key}' is not a layer of a sequential projector; only mlp and mlp-3x3 export")
        out[f"layers.{int(index) + 1}.{rest}"] = value
    return out
