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
    "unreadable_shard": "a truncated or unreadable tar shard (the rest of that shard is lost)",
    "encode_error": "the processor refused the sample for another reason",
}
"""Every reason a sample is skipped, with what it means (also the columns of the training logs)."""


@dataclass  # not frozen: Lightning rebuilds dataclasses in a batch when it moves the batch to the device
class Skipped:
    """One sample (or, for ``unreadable_shard``, the rest of a shard) that was not used."""

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
    """A webdataset ``handler`` that records shard-level errors (a truncated tar) as :class:`Skipped`.

    Lives in the worker next to the stream it handles; :meth:`drain` hands the records to the batching stage.
    """

    def __init__(self) -> None:
        self.pending: list[Skipped] = []
        self._reported: set[str] = set()

    def __call__(self, exc: Exception) -> bool:
        # webdataset appends (stream, url) to the error's args, or " @ <file object>" to its message
        message = str(exc.args[0]) if exc.args else ""
        urls = [a for a in exc.args[1:] if isinstance(a, str)]
        named = re.search(r" @ <.*name='(.*)'>", message)
        shard = urls[-1] if urls else named.group(1) if named else "?"
        self.report(shard, f"{type(exc).__name__}: {message.split(' @ ')[0]}")  # often reported twice
        return True  # go on with the next shard

    def report(self, shard: str, detail: str) -> None:
        """Record a shard-level problem found elsewhere (once per shard)."""
        if shard not in self._reported:
            self._reported.add(shard)
            self.pending.append(Skipped("unreadable_shard", shard, detail).log())

    def check_ends(self, samples: Iterator[dict]) -> Iterator[dict]:
        """A webdataset stage: passes raw samples through, and reports each local shard it has read to the end
        that lacks tar's end-of-archive marker. Python's tarfile stops silently at a header cut short, so a
        shard truncated between or inside member headers looks like a shorter, valid one.
        """
        current = None
        for sample in samples:
            url = sample.get("__url__")
            if url != current:
                self._check_end(current)
                current = url
            yield sample
        self._check_end(current)

    def _check_end(self, url: str | None) -> None:
        if url is None or not os.path.isfile(url):
            return
        size = os.path.getsize(url)
        with open(url, "rb") as f:
            f.seek(max(size - 1024, 0))
            tail = f.read()
        if size % 512 or size < 1024 or tail.strip(b"\0"):
            self.report(url, f"truncated: {size} bytes and no end-of-archive marker")

    def drain(self) -> list[Skipped]:
        out, self.pending = self.pending, []
        return out


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
