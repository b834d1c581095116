"""Callbacks: export an nvila checkpoint directory when training ends; measure training throughput."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L

from nvila.core.checkpoint import save_checkpoint
from nvila.workflows.peft import merge_lora


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


class TrainingThroughput(L.Callback):
    """Training samples per second, validation excluded, logged as ``train/samples_per_s`` and written to
    ``<log dir>/throughput.json`` when training ends (so short runs that log no step still report it).

    The clock runs from the end of one training batch to the end of the next, so data loading counts and
    the first batch (warm-up) does not; it stops during validation. Under DDP it is rank 0's own rate.
    """

    FILE = "throughput.json"

    def __init__(self) -> None:
        self.samples, self.seconds, self._last = 0, 0.0, None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        size = int(batch["input_ids"].shape[0])
        if self._last is not None:
            self.samples, self.seconds = self.samples + size, self.seconds + (now - self._last)
            pl_module.log("train/samples_per_s", self.samples / self.seconds, batch_size=size)
        self._last = now

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None  # the next training batch restarts the clock

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(trainer.log_dir or trainer.default_root_dir) / self.FILE  # log_dir broadcasts: every rank asks
        if trainer.is_global_zero and self.seconds > 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"samples_per_s": self.samples / self.seconds, "samples": self.samples,
                                        "seconds": self.seconds}))
