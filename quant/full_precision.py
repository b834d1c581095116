"""Full and half precision for training: fp32, and bf16 mixed precision (Lightning's autocast)."""

from __future__ import annotations

from dataclasses import dataclass

from nvila_core.interfaces import PrecisionBackend


@dataclass
class FP32Config:
    """Plain float32 everywhere: the fastest choice on CPUs (bf16 matmuls are slow there)."""


class FP32(PrecisionBackend):
    """float32 weights and activations."""

    lightning_precision = "32-true"

    def __init__(self, config: FP32Config) -> None:
        self.config = config


@dataclass
class BF16Config:
    """bfloat16 mixed precision: fp32 master weights, bf16 autocast for matmuls."""

    true_bf16: bool = False
    """Store the weights in bf16 too (halves memory; loses fp32 master weights)."""


class BF16(PrecisionBackend):
    """bfloat16 mixed (or true) precision through Lightning."""

    def __init__(self, config: BF16Config) -> None:
        self.config = config
        self.lightning_precision = "bf16-true" if config.true_bf16 else "bf16-mixed"
