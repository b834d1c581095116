"""Registers the built-in precision backends (training) and quantizers (inference).

Each factory is registered lazily, by module and name, and imported when it is first built: listing and
describing components (``nvila plugins``) then reads only the torch-free configs.
"""

from nvila.core import hookimpl
from nvila.core.registry import Registrar, lazy
from nvila.quant.configs import BF16Config, FP8Config, FP32Config, W4A16Config, W8A8Config, W16A16Config


@hookimpl
def nvila_register(registry: Registrar) -> None:
    registry.add("precision", "fp32", lazy("nvila.quant.full_precision", "FP32"), FP32Config)
    registry.add("precision", "bf16", lazy("nvila.quant.full_precision", "BF16"), BF16Config)
    registry.add("precision", "fp8", lazy("nvila.quant.fp8", "FP8Training"), FP8Config)
    registry.add("quantizer", "w8a8", lazy("nvila.quant.w8a8", "W8A8"), W8A8Config)
    registry.add("quantizer", "w4a16", lazy("nvila.quant.w4a16", "W4A16"), W4A16Config)
    registry.add("quantizer", "w16a16", lazy("nvila.quant.w16a16", "W16A16"), W16A16Config)
