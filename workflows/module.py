"""The LightningModule behind every training stage: alignment, encoder pretraining, pretraining, SFT, PEFT.

A stage is a recipe, not a script: which parts train (``freeze``, ``peft``), their learning rates
(``lr``, ``lr_multipliers``), where the weights start (``init_from``: the previous stage's checkpoint
directory), and memory switches (``gradient_checkpointing``, ``loss``).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from nvila.core.checkpoint import load_tokenizer, load_weights
from nvila.core.errors import NvilaError
from nvila.core.losses import LOSSES
from nvila.core.model import MODEL_PARTS, ModelSpec, NvilaModel
from nvila.core.processor import IGNORE_INDEX
from nvila.core.registry import did_you_mean
from nvila.core.specs import build, validate_all
from nvila.workflows.peft import apply_peft, parse_peft


class NvilaModule(L.LightningModule):
    """Trains an NVILA model whose parts are plugin specs (plain dicts resolved by the registry).

    Args:
        encoder: vision encoder spec, e.g. ``{name: siglip, feature_layer: -2}``.
        compressor: token compressor spec, e.g. ``{name: stc, ratio: 2}``.
        temporal: temporal compressor spec for video, e.g. ``{name: temporal-average, group: 8}``.
        projector: projector spec, e.g. ``{name: mlp}``.
        llm: language model spec, e.g. ``{name: qwen2, checkpoint: /path/to/Qwen2-7B}``.
        precision: precision backend spec, e.g. ``{name: fp32}``; sets the Trainer's precision.
        init_from: checkpoint directory (the previous stage's) whose weights and tokenizer to start from.
        freeze: modules to keep frozen: model parts (encoder, compressor, projector, llm) or dotted
            submodule paths (``encoder.vision.encoder.layers.0``).
        peft: parameter-efficient fine-tuning, e.g. ``{lora: {r: 16}, vision: layernorm}``; None trains
            every unfrozen parameter.
        lr: peak learning rate of AdamW (the language model's).
        lr_multipliers: per-part factors on ``lr``, e.g. ``{encoder: 0.1}`` (NVILA: vision 5-50x lower).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        max_length: longest tokenized sample, visual tokens included.
        gradient_checkpointing: recompute encoder and language-model activations in backward.
        loss: 'standard' (full logits), 'chunked' (memory-lean, any device) or 'fused' (Liger, CUDA).
        loss_chunk_size: positions per chunk for the chunked loss.
    """

    def __init__(self, encoder: dict | None = None, compressor: dict | None = None,
                 projector: dict | None = None, llm: dict | None = None, precision: dict | None = None,
                 init_from: str | None = None, freeze: list[str] | None = None, peft: dict | None = None,
                 lr: float = 1e-3, lr_multipliers: dict[str, float] | None = None, weight_decay: float = 0.0,
                 warmup_steps: int = 50, max_length: int = 2048, gradient_checkpointing: bool = False,
                 loss: str = "standard", loss_chunk_size: int = 1024, temporal: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        defaults = ModelSpec()
        spec = ModelSpec(encoder=encoder or defaults.encoder, compressor=compressor or defaults.compressor,
                         projector=projector or defaults.projector, llm=llm or defaults.llm,
                         temporal=temporal or defaults.temporal)
        validate_all({"model.precision": ("precision", precision or {"name": "fp32"}),
                      **{f"model.{part}": (part, getattr(spec, part)) for part in MODEL_PARTS}})
        if loss not in LOSSES:
            raise NvilaError(f"model.loss '{loss}' is unknown.{did_you_mean(loss, list(LOSSES))} "
                             f"Choose one of: {', '.join(LOSSES)}.")
        unknown = sorted(set(lr_multipliers or {}) - set(MODEL_PARTS))
        if unknown:
            raise NvilaError(f"model.lr_multipliers names {unknown}; the model's parts are {', '.join(MODEL_PARTS)}.")
        peft_settings = parse_peft(peft) if peft is not None else None
        self.precision_backend = build("precision", precision or {"name": "fp32"})
        self.precision_backend.check_available()

        tokenizer = load_tokenizer(init_from) if init_from else None
        self.model = NvilaModel(spec, tokenizer=tokenizer, max_length=max_length)
        if init_from:
            load_weights(self.model, init_from)
        if peft_settings is not None:
            apply_peft(self.model, peft_settings)
        for name in freeze or []:
            self._submodule(name).requires_grad_(False)
        if gradient_checkpointing:
            for part in (self.model.encoder, self.model.llm):
                try:
                    part.enable_gradient_checkpointing()
                except NotImplementedError as exc:
                    raise NvilaError(f"model.gradient_checkpointing: {exc}.") from None
        self.precision_backend.prepare(self.model)

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
        out = self.model(**batch, loss=self.hparams.loss, loss_chunk_size=self.hparams.loss_chunk_size)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=size)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self(batch)
        size = batch["input_ids"].shape[0]
        self.log("val/loss", out["loss"], prog_bar=True, batch_size=size, sync_dist=True)
        self.log("val/exact_match", answer_exact_match(out["logits"], batch["labels"]).mean(),
                 prog_bar=True, batch_size=size, sync_dist=True)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters grouped by model part, each with its own learning rate."""
        multipliers = self.hparams.lr_multipliers or {}
        groups = []
        for part in MODEL_PARTS:
            params = [p for p in getattr(self.model, part).parameters() if p.requires_grad]
            if params:
                groups.append({"name": part, "params": params, "lr": self.hparams.lr * multipliers.get(part, 1.0)})
        if not groups:
            raise NvilaError("Every part of the model is frozen: nothing to train. Check `model.freeze`.")
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameter_groups(), weight_decay=self.hparams.weight_decay)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        warmup = self.hparams.warmup_steps

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
