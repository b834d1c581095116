"""Streams webdataset shards into tokenized samples, split by DDP rank and DataLoader worker.

A shard sample is one JSON conversation (``.json``) plus its media: images (``.png``, ``.jpg``,
``.jpeg``, ``.webp``) and videos (``.mp4`` and what else PyAV reads), numbered when there are several
(``0.jpg``, ``1.jpg``, ...; taken in number order). ``docs/data.md`` describes the format. A sample that
cannot be used becomes a counted :class:`~nvila.core.data.skips.Skipped` record, named in the log, and
training goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from nvila.core.data.packing import Batching, skips_only
from nvila.core.data.shardset import PARTIAL, check_set
from nvila.core.data.skips import DataHealth, ShardErrors, Skipped
from nvila.core.data.video import VideoDecodeError, VideoSampling, decode_video
from nvila.core.errors import NvilaError
from nvila.core.media import ImageRefused, max_image_pixels, open_images
from nvila.core.processor import IMAGE_TOKEN, Encoded, NvilaProcessor, SampleTooLong

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
VIDEO_TOKEN = "<video>"
"""Where a video goes in a conversation (the model side expands it; see docs/data.md)."""


def find_shards(location: str | Path) -> list[str]:
    """Tar shards of a directory (sorted), or a single shard file; a clear error when there are none, a warning
    for a set an interrupted writer left (:mod:`nvila.core.data.shardset`)."""
    path = Path(location)
    if path.is_file() and path.name.endswith(PARTIAL):
        raise NvilaError(f"'{location}' is a shard its writer never finished (it was interrupted); rerun the "
                         "writer, which removes it and starts clean.")
    if path.is_file():
        return [str(path)]
    if not path.exists():
        raise NvilaError(f"Shard directory '{location}' does not exist. Create shards with "
                         "`nvila data synth --out DIR` or point the recipe at your own.")
    shards = sorted(str(p) for p in path.glob("*.tar"))  # never a writer's unfinished `*.tar.partial`
    if not shards:
        raise NvilaError(f"No *.tar shards in '{location}'. A shard set is a directory of webdataset tar "
                         "files; `nvila data synth --out DIR` writes an example.")
    check_set(path, shards)
    return shards


def _log_and_skip(exc: Exception) -> bool:
    log.warning("skipped a sample: %s", exc)
    return True


def media_keys(sample: dict[str, Any], extensions: tuple[str, ...]) -> list[str]:
    """The sample's entries with one of ``extensions`` (``jpg``, ``0.jpg``, ``1.jpg``...), in number order."""
    found = [k for k in sample if not k.startswith("__") and k.rsplit(".", 1)[-1].lower() in extensions]

    def order(key: str) -> tuple[int, str]:
        number = re.match(r"^(\d+)\.", key)
        return (int(number.group(1)) if number else -1, key)

    return sorted(found, key=order)


def _placeholders(conversations: list[dict], token: str) -> int:
    return sum(str(turn.get("value", turn.get("content", ""))).count(token) for turn in conversations)


@dataclasses.dataclass
class Decoded:
    """A raw sample's parts, checked and decoded, before tokenization (what evaluation asks questions from)."""

    record: dict[str, Any]
    """The whole ``.json`` record (``conversations``, and ``qtype``, ``source``... when present)."""
    images: list[Image.Image]
    videos: list[list[Image.Image]]
    where: str
    """``shard:key``."""

    @property
    def conversations(self) -> list[dict]:
        return self.record["conversations"]


class SampleDecoder:
    """Raw webdataset sample -> its conversation, images and video frames -> ``Encoded``, or ``Skipped``.

    Picklable; runs in the DataLoader workers, so image and video decoding and the encoder's preprocessing
    happen there. Videos are handed to the processor as ``videos=[frames, ...]`` when its ``encode`` takes
    that argument; otherwise samples with videos are skipped as ``video_unsupported``. Every image header is
    held to the pixel limit (``max_pixels``, see :mod:`nvila.core.media`) before any image is decoded.
    :meth:`decode` stops before tokenization: evaluation reads samples through it, with the same skips.
    """

    def __init__(self, processor: NvilaProcessor, video: VideoSampling | None = None,
                 max_pixels: int | None = None) -> None:
        self.processor, self.video = processor, video or VideoSampling()
        self.max_pixels = max_image_pixels(max_pixels)
        self.accepts_videos = "videos" in inspect.signature(processor.encode).parameters

    def decode(self, sample: dict[str, Any]) -> Decoded | Skipped:
        """The sample's record, images and video frames, or the reason it cannot be used."""
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"

        def skip(reason: str, detail: str) -> Skipped:
            return Skipped(reason, where, detail).log()

        if "json" not in sample:
            files = ", ".join(k for k in sample if not k.startswith("__"))
            return skip("missing_json", f"files: {files or 'none'}")
        try:
            record = json.loads(sample["json"])
            conversations = record["conversations"]
            self.processor.messages(conversations)  # checks every turn
        except Exception as exc:
            return skip("malformed_json", f"{type(exc).__name__}: {exc}")
        image_keys = media_keys(sample, IMAGE_EXTENSIONS)
        video_keys = media_keys(sample, VIDEO_EXTENSIONS)
        for kind, token, keys in (("image", IMAGE_TOKEN, image_keys), ("video", VIDEO_TOKEN, video_keys)):
            wanted = _placeholders(conversations, token)
            if wanted > len(keys):
                return skip("placeholder_without_media", f"{wanted} {token} placeholder(s), {len(keys)} {kind}(s)")
            if wanted < len(keys):
                return skip("media_without_placeholder", f"{len(keys)} {kind}(s) ({', '.join(keys)}), "
                            f"{wanted} {token} placeholder(s)")
        try:
            images = open_images([sample[k] for k in image_keys], self.max_pixels, names=image_keys)
        except ImageRefused as exc:
            return skip("image_too_large" if exc.reason == "too_large" else "bad_image", str(exc))
        try:
            videos = [decode_video(sample[k], self.video) for k in video_keys]
        except VideoDecodeError as exc:
            return skip("bad_video", str(exc))
        return Decoded(record, images, videos, where)

    def __call__(self, sample: dict[str, Any]) -> Encoded | Skipped:
        decoded = self.decode(sample)
        if isinstance(decoded, Skipped):
            return decoded

        def skip(reason: str, detail: str) -> Skipped:
            return Skipped(reason, decoded.where, detail).log()

        videos = decoded.videos
        if videos and not self.accepts_videos:  # after decoding, so that a corrupt clip is named as such
            return skip("video_unsupported", "video not supported by this model's processor")
        try:
            extra = {"videos": videos} if videos else {}
            encoded = self.processor.encode(decoded.conversations, decoded.images, **extra)
        except SampleTooLong as exc:
            return skip("too_long", str(exc))
        except Exception as exc:
            return skip("encode_error", f"{type(exc).__name__}: {exc}")
        return dataclasses.replace(encoded, key=decoded.where)


def _every_shard(urls: Iterator[Any]) -> Iterator[Any]:
    """A node splitter that keeps all shards: every rank reads the whole set."""
    return urls


def _pipeline(shards: list[str] | list[Path], decoder: SampleDecoder, shuffle: int, seed: int,
              errors: ShardErrors, split_by_rank: bool = True) -> wds.WebDataset:
    dataset = wds.WebDataset(
        [str(s) for s in shards], handler=errors, shardshuffle=len(shards) if shuffle else False,
        seed=seed, nodesplitter=wds.split_by_node if split_by_rank else _every_shard,
        workersplitter=wds.split_by_worker,
        empty_check=False).compose(errors.check_ends)
    if shuffle:
        dataset = dataset.shuffle(shuffle, seed=seed)
    return dataset.map(decoder)


def decoded_stream(shards: list[str] | list[Path], decoder: SampleDecoder, shuffle: int = 0,
                   seed: int = 0, split_by_rank: bool = True) -> Iterator[Encoded | Skipped]:
    """Every sample of ``shards`` (this rank's and worker's share) as ``Encoded`` or ``Skipped``, in order.

    ``shuffle`` > 0 shuffles shards and samples; the order is a pure function of ``seed`` (and of the rank
    and worker split), so a run can be replayed. Unreadable shards become ``unreadable_shard`` records.
    ``split_by_rank=False`` gives every distributed rank all the shards (still split across workers).
    """
    errors = ShardErrors()
    for item in _pipeline(shards, decoder, shuffle, seed, errors, split_by_rank):
        yield from errors.drain()
        yield item
    yield from errors.drain()


def _usable(item: Encoded | Skipped) -> bool:
    return isinstance(item, Encoded)


def sample_stream(shards: list[str] | list[Path], processor: NvilaProcessor, shuffle: int = 0,
                  seed: int = 0, video: VideoSampling | None = None) -> wds.WebDataset:
    """An iterable dataset of the usable samples of ``shards`` as ``Encoded`` (skips are logged, left out)."""
    return _pipeline(shards, SampleDecoder(processor, video), shuffle, seed, ShardErrors()).select(_usable)


class EpochStream(IterableDataset):
    """A shard stream rebuilt each epoch with the seed ``seed + epoch``: a new order every epoch, replayable.

    With ``batching`` it yields batches formed in each DataLoader worker (load it with ``batch_size=None``),
    each carrying the skip records met while forming it (``batch["skipped"]``): that is how counts from the
    worker processes reach the main process; a worker whose whole share was skipped yields one batch of skip
    records alone (``skip_only_batches=False`` leaves it out). Without, it yields the usable ``Encoded`` samples.
    """

    def __init__(self, shards: list[str], processor: NvilaProcessor, shuffle: int = 0, seed: int = 0,
                 batching: Batching | None = None, video: VideoSampling | None = None,
                 split_by_rank: bool = True, skip_only_batches: bool = True, max_pixels: int | None = None) -> None:
        self.shards, self.processor, self.shuffle, self.seed = shards, processor, shuffle, seed
        self.skip_only_batches, self.max_pixels = skip_only_batches, max_pixels
        self.batching, self.video, self.split_by_rank = batching, video, split_by_rank
        self.epoch = 0

    def __iter__(self) -> Iterator[Encoded] | Iterator[dict[str, Any]]:
        items = decoded_stream(self.shards, SampleDecoder(self.processor, self.video, self.max_pixels), self.shuffle,
                               self.seed + self.epoch, self.split_by_rank)
        if self.batching is not None:
            yield from (b for b in self.batching(items) if self.skip_only_batches or not skips_only(b))
        else:
            yield from (item for item in items if isinstance(item, Encoded))


@functools.cache
def _cpu_group() -> Any:
    """The process group for the per-batch flag: gloo, on CPU memory, so that agreeing never waits behind a
    GPU's queued work (NCCL would). Made once, by every rank alike, when the first epoch starts."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def while_every_rank_has_one(batches: Iterator[Any]) -> Iterator[Any]:
    """``batches`` for as long as every distributed rank still has a batch; all ranks stop together.

    Ranks stream different shards, so their epochs hold different numbers of batches (a shard count not
    divisible by the world size, uneven shards, skipped samples, packing). A rank that stopped alone would
    leave the others waiting in a gradient all-reduce it never joins; so before each batch the ranks agree,
    with one tiny all-reduce, that all of them have one, and the epoch ends at the shortest rank's end.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield from batches
        return
    group, end = _cpu_group(), object()
    while True:
        batch = next(batches, end)
        have = torch.tensor([batch is not end], dtype=torch.int32)
        dist.all_reduce(have, op=dist.ReduceOp.MIN, group=group)
        if not have.item():
            if batch is not end:
                log.info("rank %d ends its epoch with batches left: another rank's share ran out first",
                         dist.get_rank())
            return
        yield batch


class NoProgress(NvilaError):
    """A training epoch that formed no batch at all: every sample was skipped, or there were none."""

    def __init__(self, epoch: int, health: DataHealth | None) -> None:
        if health is None or not health.total_skipped:
            message = (f"Stopping: training epoch {epoch} formed no batch: data.train holds no sample this rank "
                       "could read. Check the shards (nvila data convert writes a report of what it left out).")
        else:
            counts = ", ".join(f"{reason}: {n}" for reason, n in health.skipped.most_common())
            message = (f"Stopping: training epoch {epoch} formed no batch: every sample was skipped ({counts}); "
                       "nothing was trained and no checkpoint is exported.")
            if health.skipped.most_common(1)[0][0] == "too_long":
                message += (" Each sample is longer than model.max_length (or data.pack_tokens): raise "
                            "model.max_length, or lower the encoder's tiles.")
            else:
                message += (" The log names each skipped sample (shard:key); fix the shards or point data.train "
                            "elsewhere.")
        super().__init__(message)


class ResumableLoader(DataLoader):
    """A DataLoader over an :class:`EpochStream` that Lightning can checkpoint and resume mid-epoch.

    Lightning saves ``state_dict()`` in its checkpoints and hands it back on ``--ckpt_path``; the loader
    then replays the epoch's stream and skips the batches the interrupted run had already trained on, so
    a resumed run sees exactly the batches an uninterrupted one would have. Under DDP every rank ends the
    epoch at the same batch (:func:`while_every_rank_has_one`).
    """

    PREFETCHED = 1
    """Batches Lightning's data fetcher draws ahead of the one being trained on."""

    def __init__(self, dataset: EpochStream, health: DataHealth | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.health = health
        self.epoch, self._yielded, self._skip = 0, 0, 0

    def __iter__(self) -> Iterator[Any]:
        self.dataset.epoch = self.epoch  # copied into the workers when they start
        self._counted = False
        batches = while_every_rank_has_one(self._counting(super().__iter__()))
        self._yielded = replayed = 0
        for _ in range(self._skip):
            if next(batches, None) is None:
                break
            self._yielded += 1
            replayed += 1
        self._skip, self._counted = 0, True
        for batch in batches:
            self._yielded += 1
            yield batch
        if self._yielded == 0 and replayed == 0:
            raise NoProgress(self.epoch, self.health)
        self.epoch, self._yielded = self.epoch + 1, 0  # between epochs: the next one starts from its beginning

    def _counting(self, batches: Iterator[Any]) -> Iterator[Any]:
        """``batches`` without the skip-only ones, whose records go straight to ``health`` (not while replaying:
        a resumed run's counts come from its checkpoint)."""
        for batch in batches:
            if not skips_only(batch):
                yield batch
            elif self.health is not None and self._counted:
                self.health.update(0, batch["skipped"])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": max(self._yielded - self.PREFETCHED, 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._skip = state["epoch"], state["batches"]


def read_records(shards: list[str] | list[Path], max_pixels: int | None = None,
                 ) -> Iterator[tuple[dict, list[Image.Image]]]:
    """(conversation record, images) of every readable sample, in shard order, for inspection; samples with an
    unreadable record or image (or one past the pixel limit) are logged and left out. Evaluation reads through
    :meth:`SampleDecoder.decode` instead, which checks a sample as training does."""
    urls = [str(s) for s in shards]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False, handler=_log_and_skip):
        keys = media_keys(sample, IMAGE_EXTENSIONS)
        try:
            record = json.loads(sample["json"])
            images = [i.convert("RGB") for i in open_images([sample[k] for k in keys], max_pixels, names=keys)]
        except (KeyError, ValueError, NvilaError) as exc:
            log.warning("skipped %s:%s: %s", sample.get("__url__"), sample.get("__key__"), exc)
            continue
        yield record, images
