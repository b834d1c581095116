"""FP8 training through torchao's float8 linear layers (NVILA trains with FP8 to fit larger batches).

Real FP8 matmuls need an NVIDIA GPU with compute capability 8.9 or higher (Ada, Hopper, Blackwell).
``emulate: true`` runs torchao's emulation instead, which checks the numerics anywhere (CPU tests) but
brings no speedup; without it, FP8 on other hardware is refused before training starts.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from nvila.core.errors import NvilaError
from nvila.core.interfaces import PrecisionBackend
from nvila.quant.configs import FP8Config

log = logging.getLogger(__name__)
def fp8_capable_gpu() -> str | None:
    """The CUDA device's name when it can run FP8 matmuls (capability >= 8.9), else None."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name() if torch.cuda.get_device_capability() >= (8, 9) else None


class FP8Training(PrecisionBackend):
    """Swaps eligible ``nn.Linear`` layers for torchao float8 linears (dims divisible by 16)."""

    def __init__(self, config: FP8Config) -> None:
        self.config = config
        self.lightning_precision = config.lightning_precision

    def check_available(self) -> None:
        if self.config.emulate or fp8_capable_gpu():
            return
        found = (f"{torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})"
                 if torch.cuda.is_available() else "no CUDA GPU")
        raise NvilaError(f"FP8 training needs an NVIDIA GPU with compute capability 8.9 or higher (L4, L40, H100, "
                         f"H200, B200); this machine has {found}. Use precision bf16 or fp32 here, or set "
                         "`model.precision.emulate=true` to check FP8 numerics without a speedup.")

    def _eligible(self, module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if self.config.skip_output_layer and fqn.endswith("lm_head"):
            return False
        if ".lora_" in fqn:  # LoRA adapters (peft's lora_A / lora_B): rank-r matmuls gain nothing from FP8,
            return False  # and their small updates would drown in its rounding; the frozen base layer converts
        return module.in_features % 16 == 0 and module.out_features % 16 == 0

    def prepare(self, model: nn.Module) -> nn.Module:
        from nvila.quant._torchao import Float8LinearConfig, convert_to_float8_training

        config = Float8LinearConfig.from_recipe_name(self.config.recipe)
        if self.config.emulate:
            config = dataclasses.replace(config, emulate=True)
        before = sum(isinstance(m, nn.Linear) for m in model.modules())
        convert_to_float8_training(model, config=config, module_filter_fn=self._eligible)
        converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
        log.info("FP8 (%s%s): %d of %d linear layers converted", self.config.recipe,
                 ", emulated" if self.config.emulate else "", converted, before)
        if converted == 0:
            raise NvilaError("FP8 training found no linear layer with both dimensions divisible by 16; "
                             "nothing would run in FP8.")
        return model
