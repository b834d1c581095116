"""The LightningDataModule: streams webdataset shards, tokenized by the model's own processor."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from nvila_core.data.shards import EpochStream, ResumableLoader, find_shards, sample_stream
from nvila_core.processor import collator


class NvilaDataModule(L.LightningDataModule):
    """Train and validation shards, split across DDP ranks and DataLoader workers.

    Args:
        train: directory of training shards (``*.tar``).
        val: directory of validation shards; None skips validation.
        batch_size: samples per batch and device.
        num_workers: DataLoader worker processes (decoding and tokenization run there).
        shuffle_buffer: samples held for shuffling the training stream.
        seed: seed of the shard and sample shuffle (epoch e uses seed + e).
    """

    def __init__(self, train: str = "nvila-demo/data/train", val: str | None = None, batch_size: int = 16,
                 num_workers: int = 1, shuffle_buffer: int = 1000, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_shards = find_shards(train)
        self.val_shards = find_shards(val) if val else None

    @property
    def _model(self):
        return self.trainer.lightning_module.model

    def _workers(self, shards: list[str]) -> int:
        return min(self.hparams.num_workers, len(shards))

    def train_dataloader(self) -> ResumableLoader:
        stream = EpochStream(self.train_shards, self._model.processor, self.hparams.shuffle_buffer,
                             self.hparams.seed)
        return ResumableLoader(stream, batch_size=self.hparams.batch_size,
                               num_workers=self._workers(self.train_shards),
                               collate_fn=collator(self._model.tokenizer.pad_token_id))

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_shards:
            return []
        workers = self._workers(self.val_shards)
        return DataLoader(sample_stream(self.val_shards, self._model.processor), batch_size=self.hparams.batch_size,
                          num_workers=workers, collate_fn=collator(self._model.tokenizer.pad_token_id),
                          persistent_workers=workers > 0)
