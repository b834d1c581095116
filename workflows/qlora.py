"""PEFT over a W4A16 language model, as QLoRA (Dettmers et al., 2023) does for text LLMs.

The language model's linear layers stay int4 (:class:`~nvila.quant.w4a16.Int4WeightOnlyLinear`: 4 bits a weight
plus a 16-bit scale and zero per group, packed for the device's kernel); they are buffers, never trained. Their
output is differentiable in the input (backward dequantizes each weight again, one layer at a time, and drops
it), so LoRA adapters from ``peft`` train around them: :class:`Int4LoraLinear` is the LoRA layer that peft puts
around an int4 layer, registered through ``LoraConfig``'s custom-module mapping. The adapters are ordinary
``nn.Linear`` layers in the training dtype (fp32 master weights under bf16 mixed precision).

Training batches are long enough that every call dequantizes its weight (the CPU int4 kernel is made for
decoding), in forward and again in backward; so in training the int4 layers run W4A16's ``reference`` kernel
(:func:`use_training_kernel`), which keeps the plain two-values-a-byte tensors and dequantizes them in one fused
multiply-add: about 3x faster on a CPU than reading the CPU kernel's packing back, in the same memory (half a
byte a weight plus the scales), and with no device-specific unpacking in backward.

The stage recipe is ``workflows/recipes/stages/qlora.yaml``; :func:`check_quantized_training` says which
quantized specs train (W4A16 on the language model, under LoRA) and refuses the rest.

Export (``nvila.workflows.peft.merge_lora``, through :meth:`Int4LoraLinear.unload_and_optionally_merge_module` and
:func:`dequantize_linears`): each adapter is merged into its layer's *dequantized* weight, so the exported
checkpoint is a full-precision one (fp32 language-model linears, no ``quant.llm`` in its spec), loadable like any
other; ``nvila quantize --llm w4a16`` makes it a W4A16 serving checkpoint again. An int4 weight cannot take a
fine-tuning-sized update without rounding it away, which is why the merge does not re-quantize by itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners.lora import LoraConfig, LoraLayer
from torch import nn

from nvila.core.errors import NvilaError
from nvila.core.specs import as_dict
from nvila.quant.w4a16 import Int4WeightOnlyLinear

TRAINABLE_QUANTIZERS = ("w4a16",)
"""Quantizers whose layers LoRA trains over (their output is differentiable in the input)."""


def check_quantized_training(quant: Mapping[str, Any], lora: bool, starts_quantized: bool) -> None:
    """Refuse a quantized spec that cannot train, naming what does: W4A16 on the language model, frozen under
    LoRA (``stages/qlora``), with round-to-nearest scales unless the start checkpoint holds AWQ's."""
    if not quant:
        return
    quant = {part: as_dict(spec) for part, spec in quant.items()}
    how = ("QLoRA-style PEFT trains LoRA adapters over a W4A16 language model: nvila fit --config RECIPE --config "
           "stages/peft --config stages/qlora (model.quant: {llm: {name: w4a16, method: rtn}} with model.peft)")
    others = sorted(set(quant) - {"llm"})
    if others:
        raise NvilaError(f"model.quant.{others[0]} ({quant[others[0]].get('name')}) is for serving: only the language "
                         f"model may be quantized in training. {how}. Train the vision tower in full precision and "
                         "quantize it afterwards with `nvila quantize --vision w8a8`.")
    name = quant["llm"].get("name")
    if name not in TRAINABLE_QUANTIZERS:
        raise NvilaError(f"model.quant.llm '{name}' does not train: its layers have no backward. {how}.")
    if not lora:
        raise NvilaError("model.quant.llm: an int4 language model cannot be fully fine-tuned (its weights are "
                         f"frozen integers); set model.peft to train LoRA adapters over it. {how}.")
    if quant["llm"].get("method", "awq") == "awq" and not starts_quantized:
        raise NvilaError("model.quant.llm: AWQ's scales come from calibration samples, which training does not "
                         "draw. Quantize the checkpoint first (nvila quantize --ckpt CKPT --llm w4a16 --calib SHARDS "
                         "--out Q) and start from it (--model.init_from=Q), or set method: rtn (as stages/qlora does).")


class Int4LoraLinear(nn.Module, LoraLayer):
    """LoRA adapters around a frozen :class:`Int4WeightOnlyLinear`: ``y = int4(x) + B(A(dropout(x))) * scaling``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise NvilaError("DoRA over int4 layers is not supported; use plain LoRA.")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x)  # (..., N) in the int4 layer's 16-bit dtype
        if self.disable_adapters:
            return result
        dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(x, lora_a.weight.dtype)
            result = result + lora_b(lora_a(self.lora_dropout[name](h))) * self.scaling[name]  # (..., N)
        return result.to(dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``B @ A * scaling`` (N, K) in the adapters' dtype."""
        return self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool = False,
                                           adapter_names: list[str] | None = None) -> nn.Module:
        """What peft's ``merge_and_unload`` puts in this layer's place: with ``merge``, an ``nn.Linear`` holding the
        dequantized weight plus every active adapter's delta, in the adapters' dtype; otherwise the int4 layer."""
        base = self.get_base_layer()
        if not merge:
            return base
        names = [n for n in (adapter_names or self.active_adapters) if n in self.lora_A]
        dtype = self.lora_A[names[0]].weight.dtype if names else torch.float32
        dense = base.to_linear(dtype)
        with torch.no_grad():
            for name in names:
                delta = self.get_delta_weight(name).to(dtype)
                if safe_merge and not torch.isfinite(delta).all():
                    raise NvilaError(f"LoRA adapter '{name}' holds NaN or infinite values; not merged.")
                dense.weight += delta
        return dense

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_int4_lora(config: LoraConfig) -> LoraConfig:
    """Tell peft to wrap int4 layers with :class:`Int4LoraLinear` (peft's custom-module mapping)."""
    config._register_custom_module({Int4WeightOnlyLinear: Int4LoraLinear})
    return config


def use_training_kernel(part: nn.Module) -> int:
    """Switch every int4 layer of ``part`` to W4A16's ``reference`` kernel (see the module's docstring); how many.

    Training dequantizes at (nearly) every call, wrapped by an adapter or not; from the plain nibbles that is
    fastest, and it needs no device-specific unpacking in backward."""
    found = [m for m in part.modules() if isinstance(m, Int4WeightOnlyLinear)]
    for layer in found:
        layer.unpack_()  # packs again, for the new kernel, on its next call
        layer.kernel = "reference"
    return len(found)


def dequantize_linears(part: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every int4 layer left in ``part`` (those no adapter wrapped) by its dense ``nn.Linear``; how many."""
    from nvila.quant.packed_linear import replace_layer

    found = [(name, m) for name, m in part.named_modules() if isinstance(m, Int4WeightOnlyLinear)]
    for name, layer in found:
        replace_layer(part, name, layer.to_linear(dtype))
    return len(found)
