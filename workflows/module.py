"""The LightningModule behind every training stage: alignment, encoder pretraining, pretraining, SFT, PEFT.

A stage is a recipe, not a script: which parts train (``freeze``, ``peft``), their learning rates
(``lr``, ``lr_multipliers``), where the weights start (``init_from``: the previous stage's checkpoint
directory), and memory switches (``gradient_checkpointing``, ``loss``).
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, get_type_hints

import lightning as L
import torch

from nvila.core.checkpoint import load_tokenizer, load_weights, read_spec
from nvila.core.errors import NvilaError
from nvila.core.model import MODEL_PARTS, ModelSpec, NvilaModel
from nvila.core.processor import IGNORE_INDEX
from nvila.core.registry import did_you_mean
from nvila.core.specs import build
from nvila.workflows.objectives import OBJECTIVES
from nvila.workflows.peft import apply_peft, parse_peft

log = logging.getLogger(__name__)


@dataclass
class TrainingSettings:
    """How a stage trains the model (everything a recipe's ``model:`` section holds besides the ModelSpec)."""

    init_from: str | None = field(default=None, metadata={
        "doc": "checkpoint directory (the previous stage's) whose weights and tokenizer to start from"})
    freeze: list[str] | None = field(default=None, metadata={
        "doc": "modules to keep frozen: model parts (encoder, compressor, projector, llm) or dotted submodule "
               "paths (encoder.vision.encoder.layers.0)"})
    peft: dict | None = field(default=None, metadata={
        "doc": "parameter-efficient fine-tuning, e.g. {lora: {r: 16}, vision: layernorm}; None trains every "
               "unfrozen parameter"})
    lr: float = field(default=1e-3, metadata={"doc": "peak learning rate of AdamW (the language model's)"})
    lr_multipliers: dict[str, float] | None = field(default=None, metadata={
        "doc": "per-part factors on lr, e.g. {encoder: 0.1} (NVILA: vision 5-50x lower)"})
    weight_decay: float = field(default=0.0, metadata={"doc": "AdamW weight decay"})
    warmup_steps: int = field(default=50, metadata={"doc": "linear warm-up steps before the cosine decay"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "doc": "recompute encoder and language-model activations in backward"})
    loss: str = field(default="standard", metadata={
        "doc": f"training objective: {', '.join(OBJECTIVES)} (see nvila.workflows.objectives)"})
    loss_chunk_size: int = field(default=1024, metadata={"doc": "positions per chunk for the chunked loss"})

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"model.lr must be a positive learning rate, got {self.lr}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            problems.append(f"model.weight_decay must be 0 or more, got {self.weight_decay}")
        if self.warmup_steps < 0:
            problems.append(f"model.warmup_steps must be 0 or more, got {self.warmup_steps}")
        if self.loss_chunk_size < 1:
            problems.append(f"model.loss_chunk_size must be at least 1, got {self.loss_chunk_size}")
        bad = {k: v for k, v in (self.lr_multipliers or {}).items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            problems.append(f"model.lr_multipliers must be 0 or more, got {bad}")
        if problems:
            raise NvilaError("Invalid training settings: " + "; ".join(problems) + ".")


class NvilaModule(L.LightningModule):
    """Trains an NVILA model: a :class:`ModelSpec` (what the model is) plus :class:`TrainingSettings` (how)."""

    def __init__(self, spec: ModelSpec, settings: TrainingSettings | None = None) -> None:
        super().__init__()
        self.spec, self.settings = spec, settings or TrainingSettings()
        self.save_hyperparameters({**spec.to_dict(), **asdict(self.settings)})
        self.spec.validate(prefix="model.")
        train = self.settings
        if train.loss not in OBJECTIVES:
            raise NvilaError(f"model.loss '{train.loss}' is unknown.{did_you_mean(train.loss, list(OBJECTIVES))} "
                             f"Choose one of: {', '.join(OBJECTIVES)}.")
        unknown = sorted(set(train.lr_multipliers or {}) - set(MODEL_PARTS))
        if unknown:
            raise NvilaError(f"model.lr_multipliers names {unknown}; the model's parts are {', '.join(MODEL_PARTS)}.")
        peft_settings = parse_peft(train.peft) if train.peft is not None else None
        self.precision_backend = build("precision", self.spec.precision)
        self.precision_backend.check_available()

        tokenizer = load_tokenizer(train.init_from) if train.init_from else None
        self.model = self._build_model(tokenizer, peft_settings is not None)
        if peft_settings is not None:
            apply_peft(self.model, peft_settings)
        for name in train.freeze or []:
            self._submodule(name).requires_grad_(False)
        if train.gradient_checkpointing:
            for part in (self.model.encoder, self.model.llm):
                try:
                    part.enable_gradient_checkpointing()
                except NotImplementedError as exc:
                    raise NvilaError(f"model.gradient_checkpointing: {exc}.") from None
        self.precision_backend.prepare(self.model)

    def _build_model(self, tokenizer: Any, lora: bool) -> NvilaModel:
        """The model, with ``init_from``'s weights. A quantized spec (a W4A16 language model under LoRA: QLoRA-style,
        see :mod:`nvila.workflows.qlora`) starts from a checkpoint quantized the same way (``nvila quantize``), or
        from a full-precision one that is quantized here with round-to-nearest scales."""
        init_from, quant = self.settings.init_from, self.spec.quant
        start_quant = read_spec(init_from).quant if init_from else {}
        if start_quant:  # the int4 weights (AWQ's scales included) come from the checkpoint, as it was quantized
            if not quant:
                raise NvilaError(f"model.init_from '{init_from}' is quantized ({start_quant}); training over it needs "
                                 "model.quant in the recipe (stages/qlora), or start from its full-precision "
                                 "checkpoint.")
            differ = {k: v for part, spec in quant.items() for k, v in spec.items()
                      if start_quant.get(part, {}).get(k) != v}
            if differ:
                log.warning("model.quant: init_from '%s' was quantized as %s; training keeps those weights (the "
                            "recipe's %s applies to a full-precision start only)", init_from, start_quant, differ)
            quant = start_quant
            self.spec = replace(self.spec, quant=quant)
        if quant:
            from nvila.workflows.qlora import check_quantized_training

            check_quantized_training(quant, lora, starts_quantized=bool(start_quant))
        if start_quant:
            return load_weights(NvilaModel(self.spec, tokenizer=tokenizer), init_from)
        model = NvilaModel(replace(self.spec, quant={}), tokenizer=tokenizer)
        if init_from:
            load_weights(model, init_from)
        if quant:
            model.quantize(quant)
        return model

    def _submodule(self, name: str) -> torch.nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise NvilaError(f"Cannot freeze '{name}': no such module. Freeze a model part "
                             f"({', '.join(MODEL_PARTS)}) or a dotted path inside one "
                             "(e.g. encoder.vision.encoder.layers.0).") from None

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model(**batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = OBJECTIVES[self.settings.loss](self.model, batch, self.settings.loss_chunk_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self(batch)
        size = batch["input_ids"].shape[0]
        self.log("val/loss", out["loss"], prog_bar=True, batch_size=size, sync_dist=True)
        self.log("val/exact_match", answer_exact_match(out["logits"], batch["labels"]).mean(),
                 prog_bar=True, batch_size=size, sync_dist=True)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters grouped by model part, each with its own learning rate."""
        multipliers = self.settings.lr_multipliers or {}
        groups = []
        for part in MODEL_PARTS:
            params = [p for p in getattr(self.model, part).parameters() if p.requires_grad]
            if params:
                groups.append({"name": part, "params": params, "lr": self.settings.lr * multipliers.get(part, 1.0)})
        if not groups:
            raise NvilaError("Every part of the model is frozen: nothing to train. Check `model.freeze`.")
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameter_groups(), weight_decay=self.settings.weight_decay)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        warmup = self.settings.warmup_steps

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not math.isfinite(total) or total <= warmup:
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def answer_exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample, 1.0 when every supervised token is the model's argmax (what greedy decoding would say)."""
    predicted = logits[:, :-1].argmax(-1)  # (B, L-1)
    targets = labels[:, 1:]  # (B, L-1)
    supervised = targets != IGNORE_INDEX
    wrong = (predicted != targets) & supervised
    return (~wrong.any(-1)).float()  # (B,)


def build_module(**section: Any) -> NvilaModule:
    """An :class:`NvilaModule` from a recipe's flat ``model:`` section (spec fields and training settings mixed).

    Args:
{args}
    """
    spec_keys = {f.name for f in fields(ModelSpec)}
    settings = TrainingSettings(**{k: v for k, v in section.items() if k not in spec_keys})
    return NvilaModule(ModelSpec.pick(section), settings)


def _section_signature() -> inspect.Signature:
    """The ``model:`` section's keys, typed and with defaults: ModelSpec's fields, then TrainingSettings'."""
    params = []
    for settings in (ModelSpec, TrainingSettings):
        hints = get_type_hints(settings)
        for f in fields(settings):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=hints[f.name]))
    return inspect.Signature(params, return_annotation=NvilaModule)


# What LightningCLI reads to type-check `model.*` and print `--help`: derived, so the dataclasses stay the one list.
build_module.__signature__ = _section_signature()
build_module.__doc__ = build_module.__doc__.format(args="\n".join(
    f"        {f.name}: {f.metadata['doc']}" for settings in (ModelSpec, TrainingSettings) for f in fields(settings)))
