"""Full and half precision for training: fp32, and bf16 mixed precision (Lightning's autocast)."""

from __future__ import annotations

import torch
from torch import nn

from nvila.core.interfaces import PrecisionBackend
from nvila.quant.configs import BF16Config, FP32Config

# Layers whose weights autocast casts to bf16 at every use: storing a frozen one in bf16 changes no result.
AUTOCAST_MATMUL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FP32(PrecisionBackend):
    """float32 weights and activations."""

    lightning_precision = "32-true"

    def __init__(self, config: FP32Config) -> None:
        self.config = config


class BF16(PrecisionBackend):
    """bfloat16 mixed (or true) precision through Lightning."""

    def __init__(self, config: BF16Config) -> None:
        self.config = config
        self.lightning_precision = "bf16-true" if config.true_bf16 else "bf16-mixed"

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.config.frozen_in_bf16 and not self.config.true_bf16:
            store_frozen_weights(model, torch.bfloat16)
        return model


def store_frozen_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen parameters of linear and convolution layers to ``dtype``; returns how many.

    A parameter shared with another kind of layer (an output layer tied to the embeddings) keeps its
    dtype, since that layer would then compute in ``dtype`` too.
    """
    shared = {id(p) for m in model.modules() if not isinstance(m, AUTOCAST_MATMUL_LAYERS)
              for p in m.parameters(recurse=False)}
    cast = 0
    for module in model.modules():
        if not isinstance(module, AUTOCAST_MATMUL_LAYERS):
            continue
        for param in module.parameters(recurse=False):
            if not param.requires_grad and id(param) not in shared and param.dtype != dtype:
                param.data = param.data.to(dtype)
                cast += 1
    return cast
