"""The LightningDataModule: streams webdataset shards, tokenized by the model's own processor.

Batches are formed in the DataLoader workers (padded, or packed up to ``pack_tokens``), and carry the
records of samples the workers had to skip; :meth:`NvilaDataModule.on_after_batch_transfer` counts them
in :attr:`NvilaDataModule.health`, stops the run past ``max_skip_fraction``, and hands the model only
its inputs.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from nvila.core.data.packing import Batching, as_formed, model_inputs
from nvila.core.data.shards import EpochStream, ResumableLoader, find_shards
from nvila.core.data.skips import DataHealth
from nvila.core.data.video import VideoSampling
from nvila.core.errors import NvilaError

log = logging.getLogger(__name__)


class NvilaDataModule(L.LightningDataModule):
    """Train and validation shards, split across DDP ranks and DataLoader workers.

    Args:
        train: directory of training shards (``*.tar``).
        val: directory of validation shards; None skips validation.
        batch_size: samples per batch and device; with ``packing``, packed rows per batch and device.
        num_workers: DataLoader worker processes (decoding, preprocessing, tokenization and packing run there).
        shuffle_buffer: samples held for shuffling the training stream.
        seed: seed of the shard and sample shuffle (epoch e uses seed + e).
        packing: pack several samples into each row (own position ids, no attention across samples).
        pack_tokens: token budget of a packed row; at least the model's ``max_length``.
        video_frames: frames sampled uniformly from each video; None samples by ``video_fps``.
        video_fps: frames per second of video to sample when ``video_frames`` is None.
        video_max_frames: cap on frames per video when sampling by fps.
        max_skip_fraction: stop training once more than this share of the samples seen had to be skipped.
        max_image_pixels: images whose header claims more pixels are skipped undecoded (``image_too_large``);
            None: ``$NVILA_MAX_IMAGE_PIXELS``, else 50,000,000.
    """

    def __init__(self, train: str = "nvila-demo/data/train", val: str | None = None, batch_size: int = 16,
                 num_workers: int = 1, shuffle_buffer: int = 1000, seed: int = 0, packing: bool = False,
                 pack_tokens: int = 4096, video_frames: int | None = 8, video_fps: float | None = None,
                 video_max_frames: int = 256, max_skip_fraction: float = 0.05,
                 max_image_pixels: int | None = None) -> None:
        super().__init__()
        _check_sizes(batch_size=batch_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                     pack_tokens=pack_tokens, max_image_pixels=max_image_pixels)
        self.save_hyperparameters()
        self.train_shards = find_shards(train)
        self.val_shards = find_shards(val) if val else None
        try:
            self.video = VideoSampling(video_frames, video_fps, video_max_frames)
        except ValueError as exc:
            raise NvilaError(f"data.video_*: {exc}") from None
        if not 0 <= max_skip_fraction <= 1:
            raise NvilaError(f"data.max_skip_fraction must be between 0 and 1, got {max_skip_fraction}.")
        self.health = DataHealth(max_fraction=max_skip_fraction)

    @property
    def _model(self):
        return self.trainer.lightning_module.model

    def _workers(self, shards: list[str]) -> int:
        return min(self.hparams.num_workers, len(shards))

    def _batching(self, packing: bool) -> Batching:
        max_length = self._model.processor.max_length
        if packing and self.hparams.pack_tokens < max_length:
            raise NvilaError(f"data.pack_tokens={self.hparams.pack_tokens} is below model.max_length={max_length}: "
                             "samples that fit the model could not be packed. Raise pack_tokens.")
        return Batching(self.hparams.batch_size, self._model.tokenizer.pad_token_id,
                        self.hparams.pack_tokens if packing else None)

    def train_dataloader(self) -> ResumableLoader:
        ranks = self.trainer.world_size
        if len(self.train_shards) % ranks:
            log.warning("data.train has %d shards for %d ranks: ranks get unequal shares, and each epoch ends when "
                        "the smallest share does (the others' last batches are left out of it). Use a multiple of "
                        "%d shards (nvila data convert --shard-size) to train on every sample each epoch.",
                        len(self.train_shards), ranks, ranks)
        stream = EpochStream(self.train_shards, self._model.processor, self.hparams.shuffle_buffer,
                             self.hparams.seed, self._batching(self.hparams.packing), self.video,
                             max_pixels=self.hparams.max_image_pixels)
        return ResumableLoader(stream, self.health, batch_size=None, collate_fn=as_formed,
                               num_workers=self._workers(self.train_shards))

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_shards:
            return []
        workers = self._workers(self.val_shards)
        # Validation runs no collective per batch, so ranks may hold different numbers of batches; but each
        # needs some (metrics are synchronised at the end): with fewer shards than ranks, every rank reads all.
        split = len(self.val_shards) >= self.trainer.world_size
        if not split:
            log.info("data.val has %d shard(s) for %d ranks: every rank validates on all of them",
                     len(self.val_shards), self.trainer.world_size)
        # validation batches are padded: per-sample metrics (exact match) read rows as samples
        stream = EpochStream(self.val_shards, self._model.processor, batching=self._batching(False), video=self.video,
                             split_by_rank=split, skip_only_batches=False,
                             max_pixels=self.hparams.max_image_pixels)
        return DataLoader(stream, batch_size=None, collate_fn=as_formed, num_workers=workers,
                          persistent_workers=workers > 0)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the batch's skip records (training only) and return the model's inputs alone."""
        if not isinstance(batch, dict) or "skipped" not in batch:
            return batch
        if self.trainer is not None and self.trainer.training:
            self.health.update(batch["num_samples"], batch["skipped"])
            self.health.check()
        # packed rows' additive masks take the dtype of the language model's hidden states: that of its first
        # parameter, the input embeddings (which frozen_in_bf16 leaves alone), as transformers' `.dtype` reads it
        llm = self._model.llm
        return model_inputs(batch, llm, next(llm.parameters()).dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"health": self.health.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "health" in state_dict:
            self.health.load_state_dict(state_dict["health"])


MAX_BATCH_SIZE = 1 << 16
"""Samples (or packed rows) per batch and device beyond which a setting is surely a typo."""
_LIMITS = {"batch_size": (1, MAX_BATCH_SIZE), "num_workers": (0, 1024), "shuffle_buffer": (0, 1 << 24),
           "pack_tokens": (1, 1 << 24), "max_image_pixels": (1, 1 << 40)}


def _check_sizes(**values: int | None) -> None:
    """Refuse counts outside their meaning (a negative batch, -1 workers, a batch no memory could hold)."""
    problems = []
    for name, value in values.items():
        low, high = _LIMITS[name]
        if value is None and name == "max_image_pixels":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            problems.append(f"data.{name} must be a whole number from {low} to {high:,}, got {value!r}")
    if problems:
        raise NvilaError("Invalid data settings: " + "; ".join(problems) + ".")
