"""Parameter-efficient fine-tuning as NVILA does it: LoRA on the language model, LayerNorm tuning on the
vision encoder, and a lower learning rate for the vision side (set with ``lr_multipliers``).

LoRA comes from the ``peft`` library. For export, adapters are merged into the base weights, so a PEFT
checkpoint has exactly the layout of a fully fine-tuned one. Over a W4A16 language model (QLoRA-style, stage
``stages/qlora``) the adapters wrap its int4 layers instead (:mod:`nvila.workflows.qlora`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from nvila.core.errors import NvilaError
from nvila.core.model import NvilaModel
from nvila.core.specs import merge_config

VISION_MODES = ("layernorm", "frozen", "full")


@dataclass
class LoraSettings:
    """LoRA adapters on the language model."""

    r: int = 16
    """Rank of each adapter."""
    alpha: int = 32
    """Scaling numerator: adapters are scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] | None = None
    """Module names to adapt; None takes the language model's default (attention and MLP projections)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be at least 1, got {self.r}")


@dataclass
class PeftSettings:
    """What trains in PEFT: LoRA on the LLM, a vision-tuning mode, and the projector."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings for the language model."""
    vision: str = "layernorm"
    """Vision encoder: 'layernorm' (only its norm weights train; NVILA), 'frozen' or 'full'."""
    train_projector: bool = True
    """Train the projector fully."""

    def __post_init__(self) -> None:
        if self.vision not in VISION_MODES:
            raise ValueError(f"vision must be one of {', '.join(VISION_MODES)}, got '{self.vision}'")


def parse_peft(spec: dict[str, Any]) -> PeftSettings:
    return merge_config(PeftSettings, spec, "peft", hint="See workflows/recipes/stages/peft.yaml for an example.")


def apply_peft(model: NvilaModel, settings: PeftSettings) -> None:
    """Freeze the model, then make trainable exactly what ``settings`` says (LoRA, norms, projector)."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    targets = settings.lora.target_modules or model.llm.lora_target_modules()
    if not targets:
        raise NvilaError(f"The language model {type(model.llm).__name__} names no default LoRA targets; set "
                         "model.peft.lora.target_modules.")
    config = LoraConfig(r=settings.lora.r, lora_alpha=settings.lora.alpha, lora_dropout=settings.lora.dropout,
                        target_modules=list(targets), bias="none")
    if "llm" in model.spec.quant:  # a W4A16 language model: adapters around its int4 layers (QLoRA-style)
        from nvila.workflows.qlora import register_int4_lora

        register_int4_lora(config)
    try:
        model.llm.model = get_peft_model(model.llm.model, config)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.llm.named_modules() if isinstance(m, nn.Linear)})
        detail = " ".join(str(exc).split())[:200]
        raise NvilaError(f"LoRA target modules {targets} match nothing in the language model ({detail}). "
                         f"Its linear layers are named: {', '.join(names)}.") from None
    if "llm" in model.spec.quant:
        from nvila.workflows.qlora import use_training_kernel

        use_training_kernel(model.llm)
    if settings.vision == "layernorm":
        norms = [m for m in model.encoder.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))
                 or type(m).__name__.endswith("RMSNorm")]
        if not norms:
            raise NvilaError(f"vision 'layernorm' tuning found no norm layers in {type(model.encoder).__name__}.")
        for norm in norms:
            norm.requires_grad_(True)
    elif settings.vision == "full":
        model.encoder.requires_grad_(True)
    if settings.train_projector:
        model.projector.requires_grad_(True)


def merge_lora(model: NvilaModel) -> None:
    """Fold LoRA adapters into the base weights (for export); a no-op without adapters.

    A base weight stored in lower precision than its adapters (bf16 under ``frozen_in_bf16``) is first
    raised to the adapters' dtype: the fine-tuning's small updates would otherwise round away in the merge.
    Over a W4A16 language model the adapters merge into the dequantized weights and the whole language model
    leaves int4 for the adapters' dtype, its spec losing ``quant.llm`` (see :mod:`nvila.workflows.qlora`).
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model.llm.model, PeftModel):
        return
    adapter_dtype = None
    for layer in model.llm.model.modules():
        if isinstance(layer, LoraLayer) and layer.lora_A:
            base = layer.get_base_layer()
            adapter_dtype = next(iter(layer.lora_A.values())).weight.dtype
            weight = getattr(base, "weight", None)
            if weight is not None and weight.dtype.itemsize < adapter_dtype.itemsize:
                base.to(adapter_dtype)
    model.llm.model = model.llm.model.merge_and_unload()
    if "llm" in model.spec.quant:
        from nvila.workflows.qlora import dequantize_linears

        dtype = adapter_dtype or torch.float32
        dequantize_linears(model.llm, dtype)
        for param in model.llm.parameters():  # embeddings and norms, which W4A16 kept in 16 bits
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        model.spec = replace(model.spec, quant={k: v for k, v in model.spec.quant.items() if k != "llm"})
