"""Registers the built-in precision backends."""

from nvila.core import hookimpl
from nvila.core.registry import Registrar
from nvila.quant.fp8 import FP8Config, FP8Training
from nvila.quant.full_precision import BF16, FP32, BF16Config, FP32Config


@hookimpl
def nvila_register(registry: Registrar) -> None:
    registry.add("precision", "fp32", FP32, FP32Config)
    registry.add("precision", "bf16", BF16, BF16Config)
    registry.add("precision", "fp8", FP8Training, FP8Config)
