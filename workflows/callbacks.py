"""Callbacks: export an nvila checkpoint directory when training ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from nvila_core.checkpoint import save_checkpoint
from workflows.peft import merge_lora


class ExportCheckpoint(L.Callback):
    """Writes ``<log dir>/checkpoint`` (spec, safetensors weights, tokenizer) at the end of ``fit``."""

    def __init__(self, dirname: str = "checkpoint") -> None:
        self.dirname = dirname
        self.path: Path | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / self.dirname
        merge_lora(pl_module.model)  # a PEFT checkpoint has the plain architecture's layout
        if trainer.is_global_zero:
            save_checkpoint(pl_module.model, self.path)


class DataHealthLogger(L.Callback):
    """Logs the data module's skip counts (total, fraction, per reason) with the training metrics."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        health = getattr(trainer.datamodule, "health", None)
        if health is None:
            return
        for name, value in health.metrics().items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        health = getattr(trainer.datamodule, "health", None)
        if health is not None:
            health.check(final=True)  # an epoch shorter than min_samples is judged too
