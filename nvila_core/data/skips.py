"""Samples the pipeline could not use: why, where, and how many, from the DataLoader workers to the run.

A sample that cannot be decoded becomes a :class:`Skipped` record in the worker: it is logged there with
its shard and key, and travels to the main process inside the next batch (``batch["skipped"]``), since
workers are separate processes. There :class:`DataHealth` counts the records by reason, and stops the
run once more than ``max_fraction`` of the samples seen were skipped, so that a broken data set is not
silently trained on.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nvila.core.data.shardset import MANIFEST as _MANIFEST
from nvila.core.data.shardset import sample_counts
from nvila.core.errors import NvilaError

log = logging.getLogger(__name__)

REASONS: dict[str, str] = {
    "malformed_json": "the .json is not valid JSON or holds no conversation (LLaVA turns)",
    "missing_json": "a sample with media files but no .json conversation",
    "bad_image": "an image PIL cannot decode",
    "image_too_large": "an image whose header claims more pixels than the limit (not decoded)",
    "bad_video": "a video PyAV cannot decode (corrupt or truncated)",
    "placeholder_without_media": "more <image>/<video> placeholders than media files",
    "media_without_placeholder": "more media files than <image>/<video> placeholders",
    "video_unsupported": "video not supported by this model's processor",
    "too_long": "more tokens than max_length (truncating would cut through media or the answer)",
    "unreadable_shard": "a sample lost to a truncated or unreadable tar shard (one record per sample lost when "
                        "the shard set records its counts, else one per shard)",
    "encode_error": "the processor refused the sample for another reason",
}
"""Every reason a sample is skipped, with what it means (also the columns of the training logs)."""


@dataclass  # not frozen: Lightning rebuilds dataclasses in a batch when it moves the batch to the device
class Skipped:
    """One sample that was not used (for ``unreadable_shard`` without counts: the unknown rest of a shard)."""

    reason: str
    """One of :data:`REASONS`."""
    where: str
    """``shard:key`` of the sample (just the shard for a shard-level error)."""
    detail: str = ""
    """The error, for the log."""

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown skip reason {self.reason!r}; known: {', '.join(REASONS)}")

    def log(self) -> Skipped:
        """Name the sample in the log (once, in the process that found it) and return self."""
        log.warning("skipped %s: %s [%s]", self.where, self.detail, self.reason)
        return self


class ShardErrors:
    """Shard-level damage (a truncated or unreadable tar) as :class:`Skipped` records, one per sample lost.

    Two parts work together in the worker that reads the shards: the webdataset ``handler`` (``__call__``)
    notes a shard's read error, and the :meth:`check_ends` stage counts the samples read from each shard and,
    at the shard's end, settles its account. When the shard set has a manifest of sample counts
    (:mod:`nvila.core.data.shardset`), a shard that yielded fewer samples than it holds gives one
    ``unreadable_shard`` record per sample lost, so the skip total is the true number; without counts (shards
    another tool wrote) a damaged shard gives one record, whose detail says the number lost is unknown.
    Each shard is read by exactly one worker of one rank, so every loss is counted once. :meth:`drain` hands
    the records to the batching stage.
    """

    def __init__(self) -> None:
        self.pending: list[Skipped] = []
        self._errors: dict[str, str] = {}
        """Shards with a read error not yet settled: url -> the error."""
        self._settled: set[str] = set()
        self._counts: dict[str, dict[str, int] | None] = {}
        """Per shard directory, the manifest's samples per shard (None: no manifest)."""

    def __call__(self, exc: Exception) -> bool:
        # webdataset appends (stream, url) to the error's args, or " @ <file object>" to its message
        message = str(exc.args[0]) if exc.args else ""
        urls = [a for a in exc.args[1:] if isinstance(a, str)]
        named = re.search(r" @ <.*name='(.*)'>", message)
        shard = urls[-1] if urls else named.group(1) if named else "?"
        self.report(shard, f"{type(exc).__name__}: {message.split(' @ ')[0]}")  # often reported twice
        return True  # go on with the next shard

    def report(self, shard: str, detail: str) -> None:
        """Note a shard-level problem (the first per shard is kept); counted when the shard's account is settled."""
        if shard not in self._settled:
            self._errors.setdefault(shard, detail)

    def check_ends(self, samples: Iterator[dict]) -> Iterator[dict]:
        """A webdataset stage: passes raw samples through, counting them per shard, and settles each shard's
        account when the stream moves past it. A local shard read to the end must end with tar's
        end-of-archive marker: Python's tarfile stops silently at a header cut short, so a shard truncated
        between or inside member headers looks like a shorter, valid one.
        """
        current, read = None, 0
        for sample in samples:
            url = sample.get("__url__")
            if url != current:
                self._settle(current, read)
                self._settle_unread(keep=url)
                current, read = url, 0
            read += 1
            yield sample
        self._settle(current, read)
        self._settle_unread(keep=None)

    def _settle_unread(self, keep: str | None) -> None:
        """Settle the shards that failed before yielding a single sample (all their samples are lost)."""
        for shard in [s for s in self._errors if s != keep]:
            self._settle(shard, 0)

    def _settle(self, url: str | None, read: int) -> None:
        if url is None or url in self._settled:
            return
        self._settled.add(url)
        detail = self._errors.pop(url, None)
        if detail is None and os.path.isfile(url):
            detail = _missing_end(url)
        expected = self._expected(url)
        if expected is not None and read < expected:
            lost = expected - read
            detail = (f"{detail or 'the shard ended early'}; {lost} of its {expected} samples lost "
                      f"({read} read)")
            log.warning("skipped %d samples of %s: %s [unreadable_shard]", lost, url, detail)
            self.pending.extend(Skipped("unreadable_shard", url, detail) for _ in range(lost))
        elif detail is not None and expected is None:
            self.pending.append(Skipped("unreadable_shard", url, f"{detail}; the number of samples lost is "
                                        f"unknown (no {_MANIFEST} beside the shard lists its count)").log())
        elif detail is not None:  # every sample was read: only the archive's tail (its end marker) is damaged
            log.warning("%s: %s, but all its %d samples were read", url, detail, expected)

    def _expected(self, url: str) -> int | None:
        """Samples the shard holds, from its set's manifest; None when unknown."""
        if url == "?" or "://" in url or url.startswith("pipe:"):  # a remote shard: no manifest to ask
            return None
        path = Path(url)
        directory = str(path.parent)
        if directory not in self._counts:
            self._counts[directory] = sample_counts(directory)
        counts = self._counts[directory]
        return None if counts is None else counts.get(path.name)

    def drain(self) -> list[Skipped]:
        out, self.pending = self.pending, []
        return out


def _missing_end(url: str) -> str | None:
    """Why a local tar file is cut short (no end-of-archive marker), or None when it ends as tar should."""
    size = os.path.getsize(url)
    with open(url, "rb") as f:
        f.seek(max(size - 1024, 0))
        tail = f.read()
    if size % 512 or size < 1024 or tail.strip(b"\0"):
        return f"truncated: {size} bytes and no end-of-archive marker"
    return None


@dataclass
class DataHealth:
    """Skip counts of a run (on one rank), and the threshold that stops it."""

    max_fraction: float = 0.05
    """Stop when more than this share of the samples seen so far were skipped."""
    min_samples: int = 100
    """Samples to see before the threshold applies (two bad samples of the first ten are not a verdict)."""
    samples: int = 0
    """Samples seen: used plus skipped."""
    skipped: Counter = field(default_factory=Counter)
    """Skips by reason."""

    def update(self, used: int, skipped: list[Skipped]) -> None:
        """Count a batch's ``used`` samples and its skip records."""
        self.samples += used + len(skipped)
        self.skipped.update(s.reason for s in skipped)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def fraction(self) -> float:
        return self.total_skipped / self.samples if self.samples else 0.0

    def check(self, final: bool = False) -> None:
        """Raise NvilaError, naming the counts, once too many samples were skipped."""
        if (final or self.samples >= self.min_samples) and self.fraction > self.max_fraction:
            counts = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common())
            raise NvilaError(
                f"Stopping: {self.total_skipped} of {self.samples} samples ({self.fraction:.1%}) could not be used, "
                f"more than data.max_skip_fraction={self.max_fraction:.0%} ({counts}). The log names each one "
                "(shard:key); fix or drop them, or raise data.max_skip_fraction to train on anyway.")

    def summary(self) -> str:
        """``data: 3 of 1,200 samples skipped (0.2%): bad_image: 2, too_long: 1``: the line a run ends with."""
        counts = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common())
        return (f"data: {self.total_skipped:,} of {self.samples:,} samples skipped ({self.fraction:.1%})"
                + (f": {counts}; the log names each one" if counts else ""))

    def metrics(self) -> dict[str, float]:
        """Counts for the training logs: the total, the fraction and one entry per reason."""
        out = {"data/skipped": float(self.total_skipped), "data/skipped_fraction": self.fraction}
        out.update({f"data/skipped/{reason}": float(self.skipped.get(reason, 0)) for reason in REASONS})
        return out

    def state_dict(self) -> dict:
        return {"samples": self.samples, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.samples, self.skipped = state["samples"], Counter(state["skipped"])
