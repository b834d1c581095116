"""The LightningModule that trains an NVILA model (SFT; later stages change only the recipe)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from nvila_core.errors import NvilaError
from nvila_core.model import MODEL_PARTS, ModelSpec, NvilaModel
from nvila_core.processor import IGNORE_INDEX
from nvila_core.specs import build, validate_all


class NvilaModule(L.LightningModule):
    """Trains an NVILA model whose parts are plugin specs (plain dicts resolved by the registry).

    Args:
        encoder: vision encoder spec, e.g. ``{name: siglip, feature_layer: -2}``.
        compressor: token compressor spec, e.g. ``{name: stc, ratio: 2}``.
        projector: projector spec, e.g. ``{name: mlp}``.
        llm: language model spec, e.g. ``{name: qwen2, checkpoint: /path/to/Qwen2-7B}``.
        precision: precision backend spec, e.g. ``{name: fp32}``; sets the Trainer's precision.
        freeze: model parts to keep frozen (any of encoder, compressor, projector, llm).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        max_length: longest tokenized sample, visual tokens included.
    """

    def __init__(self, encoder: dict | None = None, compressor: dict | None = None,
                 projector: dict | None = None, llm: dict | None = None, precision: dict | None = None,
                 freeze: list[str] | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 50, max_length: int = 2048) -> None:
        super().__init__()
        self.save_hyperparameters()
        defaults = ModelSpec()
        spec = ModelSpec(encoder=encoder or defaults.encoder, compressor=compressor or defaults.compressor,
                         projector=projector or defaults.projector, llm=llm or defaults.llm)
        validate_all({"model.precision": ("precision", precision or {"name": "fp32"}),
                      **{f"model.{part}": (part, getattr(spec, part)) for part in MODEL_PARTS}})
        self.precision_backend = build("precision", precision or {"name": "fp32"})
        self.precision_backend.check_available()
        self.model = self.precision_backend.prepare(NvilaModel(spec, max_length=max_length))
        for part in freeze or []:
            if part not in ("encoder", "compressor", "projector", "llm"):
                raise NvilaError(f"Cannot freeze '{part}': the model's parts are encoder, compressor, "
                                 "projector and llm.")
            getattr(self.model, part).requires_grad_(False)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model(**batch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=size)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self(batch)
        size = batch["input_ids"].shape[0]
        self.log("val/loss", out["loss"], prog_bar=True, batch_size=size, sync_dist=True)
        self.log("val/exact_match", answer_exact_match(out["logits"], batch["labels"]).mean(),
                 prog_bar=True, batch_size=size, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise NvilaError("Every part of the model is frozen: nothing to train. Check `model.freeze`.")
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
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
