"""Registers the built-in precision backends (training) and quantizers (inference)."""

from nvila.core import hookimpl
from nvila.core.registry import Registrar
from nvila.quant.fp8 import FP8Config, FP8Training
from nvila.quant.full_precision import BF16, FP32, BF16Config, FP32Config
from nvila.quant.w4a16 import W4A16, W4A16Config
from nvila.quant.w8a8 import W8A8, W8A8Config


@hookimpl
def nvila_register(registry: Registrar) -> None:
    registry.add("precision", "fp32", FP32, FP32Config)
    registry.add("precision", "bf16", BF16, BF16Config)
    registry.add("precision", "fp8", FP8Training, FP8Config)
    registry.add("quantizer", "w8a8", W8A8, W8A8Config)
    registry.add("quantizer", "w4a16", W4A16, W4A16Config)
