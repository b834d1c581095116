"""Callbacks: export an nvila checkpoint directory when training ends; measure training throughput; report
progress by steps (a bar on a terminal, plain lines elsewhere)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

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

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        health = getattr(trainer.datamodule, "health", None)
        if health is not None and trainer.is_global_zero:
            print(health.summary(), file=sys.stderr, flush=True)


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


class StepProgressBar(TQDMProgressBar):
    """A terminal progress bar over training *steps* (``max_steps``), not epochs: streamed shards have no
    epoch length, and Lightning's own bar showed ``Epoch 1/-2`` for them."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        bar.set_description("train", refresh=False)
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.n = trainer.global_step  # resumed runs start where they left off

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self.train_progress_bar is not None and self._should_update(trainer.global_step,
                                                                       self.train_progress_bar.total):
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
            self.train_progress_bar.refresh()


class PlainProgress(L.Callback):
    """One plain line every ``every_s`` seconds (step, loss, samples/s, time left) for output that is not a
    terminal (a file, a pipe, CI), where a progress bar would print nothing readable."""

    def __init__(self, every_s: float = 10.0, stream: TextIO | None = None) -> None:
        self.every_s, self.stream = every_s, stream
        self._start = self._last = 0.0
        self._samples = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.perf_counter()
        self._first_step, self._samples = trainer.global_step, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._samples += int(batch["input_ids"].shape[0]) if isinstance(batch, dict) else 0
        now = time.perf_counter()
        if now - self._last < self.every_s or not trainer.is_global_zero:
            return
        self._last = now
        print(progress_line(trainer.global_step, trainer.max_steps, outputs, self._samples, now - self._start,
                            trainer.global_step - self._first_step), file=self.stream or sys.stdout, flush=True)


def progress_line(step: int, max_steps: int, outputs: Any, samples: int, seconds: float, steps_done: int) -> str:
    """``step 120/1500 (8%)  loss 1.234  95 samples/s  elapsed 0:01:05  left ~0:12:30``."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    parts = [f"step {step}/{max_steps} ({step / max_steps:.0%})" if max_steps > 0 else f"step {step}"]
    if loss is not None:
        parts.append(f"loss {float(loss):.4f}")
    parts.append(f"{samples / seconds:.0f} samples/s" if seconds > 0 else "")
    parts.append(f"elapsed {_clock(seconds)}")
    if max_steps > 0 and steps_done > 0:
        parts.append(f"left ~{_clock(seconds / steps_done * (max_steps - step))}")
    return "  ".join(p for p in parts if p)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
