"""The LightningDataModule: streams webdataset shards, tokenized by the model's own processor."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from nvila_core.data.shards import find_shards, sample_stream
from nvila_core.processor import collator


class NvilaDataModule(L.LightningDataModule):
    """Train and validation shards, split across DDP ranks and DataLoader workers.

    Args:
        train: directory of training shards (``*.tar``).
        val: directory of validation shards; None skips validation.
        batch_size: samples per batch and device.
        num_workers: DataLoader worker processes (decoding and tokenization run there).
        shuffle_buffer: samples held for shuffling the training stream.
        seed: seed of the shard and sample shuffle.
    """

    def __init__(self, train: str = "nvila-demo/data/train", val: str | None = None, batch_size: int = 16,
                 num_workers: int = 1, shuffle_buffer: int = 1000, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_shards = find_shards(train)
        self.val_shards = find_shards(val) if val else None

    def _loader(self, shards: list[str], shuffle: int) -> DataLoader:
        model = self.trainer.lightning_module.model
        dataset = sample_stream(shards, model.processor, shuffle=shuffle, seed=self.hparams.seed)
        workers = min(self.hparams.num_workers, len(shards))
        return DataLoader(dataset, batch_size=self.hparams.batch_size, num_workers=workers,
                          collate_fn=collator(model.tokenizer.pad_token_id), persistent_workers=workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_shards, self.hparams.shuffle_buffer)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_shards, 0) if self.val_shards else []
