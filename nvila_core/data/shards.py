"""Streams webdataset shards into tokenized samples, split by DDP rank and DataLoader worker.

A shard sample is one JSON conversation (``.json``) plus its images (``.png``, ``.jpg``, ``.jpeg``,
``.webp``; several are taken in key order). A sample that cannot be decoded is skipped, named in the
log, and training goes on.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from nvila_core.errors import NvilaError
from nvila_core.processor import Encoded, NvilaProcessor

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def find_shards(location: str | Path) -> list[str]:
    """Tar shards of a directory (sorted), or a single shard file; a clear error when there are none."""
    path = Path(location)
    if path.is_file():
        return [str(path)]
    if not path.exists():
        raise NvilaError(f"Shard directory '{location}' does not exist. Create shards with "
                         "`nvila data synth --out DIR` or point the recipe at your own.")
    shards = sorted(str(p) for p in path.glob("*.tar"))
    if not shards:
        raise NvilaError(f"No *.tar shards in '{location}'. A shard set is a directory of webdataset tar "
                         "files; `nvila data synth --out DIR` writes an example.")
    return shards


def _log_and_skip(exc: Exception) -> bool:
    log.warning("skipped a sample: %s", exc)
    return True


class SampleDecoder:
    """Raw webdataset sample -> the conversation and images it holds -> ``Encoded``; picklable."""

    def __init__(self, processor: NvilaProcessor) -> None:
        self.processor = processor

    def __call__(self, sample: dict[str, Any]) -> Encoded:
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        try:
            record = json.loads(sample["json"])
            images = [Image.open(io.BytesIO(sample[k])) for k in sorted(sample)
                      if k.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
            for image in images:
                image.load()
            return dataclasses.replace(self.processor.encode(record["conversations"], images), key=where)
        except Exception as exc:
            raise ValueError(f"{where}: {type(exc).__name__}: {exc}") from exc


def sample_stream(shards: list[str] | list[Path], processor: NvilaProcessor, shuffle: int = 0,
                  seed: int = 0) -> wds.WebDataset:
    """An iterable of ``Encoded`` samples over ``shards``; ``shuffle`` > 0 shuffles shards and samples.

    The order is a pure function of ``seed`` (and of the rank and worker split), so a run can be replayed.
    """
    dataset = wds.WebDataset(
        [str(s) for s in shards], handler=_log_and_skip, shardshuffle=len(shards) if shuffle else False,
        seed=seed, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, empty_check=False)
    if shuffle:
        dataset = dataset.shuffle(shuffle, seed=seed)
    return dataset.map(SampleDecoder(processor), handler=_log_and_skip)


class EpochStream(IterableDataset):
    """A shard stream rebuilt each epoch with the seed ``seed + epoch``: a new order every epoch, replayable."""

    def __init__(self, shards: list[str], processor: NvilaProcessor, shuffle: int = 0, seed: int = 0) -> None:
        self.shards, self.processor, self.shuffle, self.seed = shards, processor, shuffle, seed
        self.epoch = 0

    def __iter__(self) -> Iterator[Encoded]:
        yield from sample_stream(self.shards, self.processor, self.shuffle, self.seed + self.epoch)


class ResumableLoader(DataLoader):
    """A DataLoader over an :class:`EpochStream` that Lightning can checkpoint and resume mid-epoch.

    Lightning saves ``state_dict()`` in its checkpoints and hands it back on ``--ckpt_path``; the loader
    then replays the epoch's stream and skips the batches the interrupted run had already trained on, so
    a resumed run sees exactly the batches an uninterrupted one would have.
    """

    PREFETCHED = 1
    """Batches Lightning's data fetcher draws ahead of the one being trained on."""

    def __init__(self, dataset: EpochStream, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch, self._yielded, self._skip = 0, 0, 0

    def __iter__(self) -> Iterator[Any]:
        self.dataset.epoch = self.epoch  # copied into the workers when they start
        batches = super().__iter__()
        self._yielded = 0
        for _ in range(self._skip):
            if next(batches, None) is None:
                break
            self._yielded += 1
        self._skip = 0
        for batch in batches:
            self._yielded += 1
            yield batch
        self.epoch, self._yielded = self.epoch + 1, 0  # between epochs: the next one starts from its beginning

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": max(self._yielded - self.PREFETCHED, 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._skip = state["epoch"], state["batches"]


def read_records(shards: list[str] | list[Path]) -> Iterator[tuple[dict, list[Image.Image]]]:
    """(conversation record, images) of every sample, in shard order, for evaluation and inspection."""
    urls = [str(s) for s in shards]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False, handler=_log_and_skip):
        record = json.loads(sample["json"])
        images = [Image.open(io.BytesIO(sample[k])).convert("RGB") for k in sorted(sample)
                  if k.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
        yield record, images
