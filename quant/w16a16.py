"""W16A16: a part's weights and activations in 16-bit floats, for the small parts of a serving mix.

A W8A8 vision tower computes its attention and norms in bf16 and a W4A16 language model takes bf16 activations, so
the projector between them, left as trained (fp32), would be the one part still computing in fp32: at 1920x1080
its two matmuls over 2,048 tokens took 357 ms in fp32 against 83 ms in bf16 on one Zen 5 core (docs/benchmarks.md).
``nvila quantize`` therefore puts the projector in W16A16 by default. Nothing is rounded beyond the cast, so no
calibration is needed; the weights are stored in the dtype the part computes in, halving them where it is 16 bits.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from nvila.core.interfaces import Calibration, Quantizer
from nvila.quant import w8a8
from nvila.quant.configs import W16A16Config
from nvila.quant.packed_linear import cast_floating
from nvila.quant.w4a16 import DTYPES  # the 16-bit names and their torch dtypes, as W4A16 takes them


def compute_dtype(name: str) -> torch.dtype | None:
    """The 16-bit dtype a part computes in for ``dtype: name``; None where ``auto`` keeps it as it is (no bf16
    hardware: fp32 is the fast format there)."""
    if name == "auto":
        return torch.bfloat16 if w8a8.bf16_is_fast() else None
    return DTYPES[name]


def _inputs_to(dtype: torch.dtype, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A forward pre-hook: floating-point positional tensor inputs in the part's dtype, whatever its caller computes
    in."""
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


class W16A16(Quantizer):
    """Every floating-point weight of a part cast to 16 bits, so that the part computes in them."""

    def __init__(self, config: W16A16Config) -> None:
        self.config = config

    def quantize(self, part: nn.Module, calibrate: Calibration | None = None) -> list[str]:
        """Cast the part and return its modules that hold weights (all of them are in the part's compute dtype now,
        also where ``auto`` kept fp32, so that a checkpoint from any machine loads into the part)."""
        dtype = compute_dtype(self.config.dtype)
        if dtype is not None:
            cast_floating(part, dtype)
            part.register_forward_pre_hook(functools.partial(_inputs_to, dtype))
        return [name for name, module in part.named_modules()
                if any(p.is_floating_point() for p in module.parameters(recurse=False))]
