"""Batches formed in the DataLoader workers: padded, or packed several samples to a row up to a token budget.

Packing puts several samples into one row; each keeps its own position ids (0, 1, ... from its start)
and sees only itself: on SDPA and eager attention through a block-diagonal causal mask (additive, float:
a boolean 4D mask is silently wrong under eager attention), with flash-attention through the
variable-length kernel, which transformers drives from the position ids alone (rows are flattened into
one, and ``cu_seqlens`` come from where the position ids restart).

The loss of a packed batch is the mean over its supervised tokens, exactly as for a padded batch of the
same samples: a sample's first label is never a target of its own (targets are shifted by one), so it
is set to -100, and no token is asked to predict the start of the next sample.

Batches carry ``skipped`` (the :class:`~nvila.core.data.skips.Skipped` records met while forming them)
and ``num_samples``; :func:`model_inputs` strips both before the model sees the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from nvila.core.data.skips import Skipped
from nvila.core.processor import IGNORE_INDEX, Encoded, collate

log = logging.getLogger(__name__)
BATCH_EXTRAS = ("skipped", "num_samples", "keys")
"""Entries of a batch that describe it and are not model inputs."""


def pack_rows(samples: Iterable[Encoded], budget: int, open_rows: int = 16) -> Iterator[list[Encoded]]:
    """Online best-fit packing: each sample goes to the fullest open row it fits in (a new one otherwise);
    when more than ``open_rows`` rows are open, the fullest is emitted. Deterministic; keeps rows near full.
    """
    rows: list[tuple[int, list[Encoded]]] = []  # (tokens used, samples), in opening order
    for sample in samples:
        n = len(sample.input_ids)
        if n > budget:
            raise ValueError(f"a sample of {n} tokens cannot be packed into rows of {budget}")
        fits = [i for i, (used, _) in enumerate(rows) if used + n <= budget]
        if fits:
            best = max(fits, key=lambda i: rows[i][0])
            used, row = rows[best]
            rows[best] = (used + n, row + [sample])
        else:
            rows.append((n, [sample]))
        if len(rows) > open_rows:
            fullest = max(range(len(rows)), key=lambda i: rows[i][0])
            yield rows.pop(fullest)[1]
    for _, row in rows:
        yield row


def collate_packed(rows: list[list[Encoded]], pad_id: int) -> dict[str, Any]:
    """Rows of samples -> one packed batch: ids, labels, per-sample position ids and segment ids, pixels."""
    length = max(sum(len(s.input_ids) for s in row) for row in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    segment_ids = torch.zeros((batch, length), dtype=torch.long)  # 0: padding; samples count from 1
    pixels, grids, videos, video_grids = [], [], [], []
    for b, row in enumerate(rows):
        start = 0
        for segment, s in enumerate(row, start=1):
            n = len(s.input_ids)
            span = slice(start, start + n)
            input_ids[b, span], labels[b, span] = s.input_ids, s.labels
            labels[b, start] = IGNORE_INDEX  # never a target of its own sample; so nothing predicts across
            position_ids[b, span] = torch.arange(n)
            segment_ids[b, span] = segment
            start += n
            if s.pixels is not None:
                pixels.append(s.pixels)
            grids.extend(s.grids)
            if s.videos is not None:
                videos.append(s.videos)
            video_grids.extend(s.video_grids)
        position_ids[b, start:] = torch.arange(length - start)  # padding: a sequence of its own
    return {
        "input_ids": input_ids,  # (B, L)
        "labels": labels,  # (B, L)
        "position_ids": position_ids,  # (B, L)
        "segment_ids": segment_ids,  # (B, L)
        "pixels": torch.cat(pixels) if pixels else None,  # (T, 3, S, S), row-major sample order
        "grids": grids,
        "videos": torch.cat(videos) if videos else None,  # (T_video, 3, S, S), same order
        "video_grids": video_grids,
        "num_samples": sum(len(row) for row in rows),
    }


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive 4D mask (B, 1, L, L): 0 where query i may see key j (same segment, j <= i), dtype-min elsewhere.

    Padding (segment 0) forms one causal block of its own, so no query row is fully masked (no NaN).
    """
    length = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, L, L)
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()  # (L, L)
    allowed = (same & causal)[:, None]  # (B, 1, L, L)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def attention_backend(llm: torch.nn.Module) -> str:
    """The attention implementation a language model runs ('sdpa', 'eager', 'flash_attention_2', ...)."""
    config = getattr(getattr(llm, "model", None), "config", None)
    return str(getattr(config, "_attn_implementation", None) or "sdpa")


_announced: set[str] = set()


def model_inputs(batch: dict[str, Any], llm: torch.nn.Module | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A batch as the model's keyword arguments: describing entries removed, packed rows given their mask.

    Packed rows get a block-diagonal additive mask, or, on flash-attention, are flattened into one row whose
    restarting position ids select the variable-length kernel.
    """
    out = {k: v for k, v in batch.items() if k not in BATCH_EXTRAS}
    segment_ids = out.pop("segment_ids", None)
    if segment_ids is None:
        return out
    backend = attention_backend(llm) if llm is not None else "sdpa"
    if backend.startswith("flash_attention"):
        path = "flash-attention variable-length kernel (cu_seqlens from position ids)"
        out["input_ids"] = out["input_ids"].reshape(1, -1)  # (1, B*L)
        out["labels"] = out["labels"].reshape(1, -1)
        out["position_ids"] = out["position_ids"].reshape(1, -1)
        out["attention_mask"] = None
    else:
        path = f"block-diagonal additive mask through {backend} attention"
        out["attention_mask"] = block_causal_mask(segment_ids, dtype)  # (B, 1, L, L)
    if path not in _announced:
        _announced.add(path)
        log.info("packed sequences: %s", path)
    return out


def as_formed(batch: dict[str, Any]) -> dict[str, Any]:
    """``collate_fn`` for loaders of ready-made batches (``batch_size=None``): PyTorch's default would turn the
    grids' tuples into lists."""
    return batch


@dataclass(frozen=True)
class Batching:
    """How a worker turns its stream of samples (and skip records) into batches; picklable.

    Without ``pack_tokens``, a batch is ``batch_size`` samples padded to the longest; with it, a batch is
    ``batch_size`` rows of at most ``pack_tokens`` tokens, each packed with several samples.
    """

    batch_size: int
    pad_id: int
    pack_tokens: int | None = None
    open_rows: int = 16

    def _groups(self, samples: Iterator[Encoded]) -> Iterator[dict[str, Any]]:
        if self.pack_tokens is None:
            group: list[Encoded] = []
            for sample in samples:
                group.append(sample)
                if len(group) == self.batch_size:
                    yield {**collate(group, self.pad_id), "num_samples": len(group)}
                    group = []
            if group:
                yield {**collate(group, self.pad_id), "num_samples": len(group)}
            return
        rows: list[list[Encoded]] = []
        for row in pack_rows(samples, self.pack_tokens, max(self.open_rows, self.batch_size)):
            rows.append(row)
            if len(rows) == self.batch_size:
                yield collate_packed(rows, self.pad_id)
                rows = []
        if rows:
            yield collate_packed(rows, self.pad_id)

    def __call__(self, items: Iterable[Encoded | Skipped]) -> Iterator[dict[str, Any]]:
        """Batches with the skip records met while forming each; trailing skips ride on the last batch."""
        skipped: list[Skipped] = []

        def samples() -> Iterator[Encoded]:
            for item in items:
                if isinstance(item, Skipped):
                    skipped.append(item)
                elif self.pack_tokens is not None and len(item.input_ids) > self.pack_tokens:
                    skipped.append(Skipped("too_long", item.key, f"{len(item.input_ids)} tokens, more than "
                                           f"data.pack_tokens={self.pack_tokens}").log())
                else:
                    yield item

        held = None  # one batch of look-ahead, so that skips after the last sample are still counted
        for batch in self._groups(samples()):
            if held is not None:
                yield held
            batch["skipped"] = list(skipped)
            skipped.clear()
            held = batch
        if held is not None:
            held["skipped"] = held["skipped"] + skipped
            yield held
        elif skipped:  # no usable sample: the skip records still travel, so that the run can count them and stop
            log.warning("%d skipped sample(s) and no usable one in this worker's share of the shards", len(skipped))
            yield {"skipped": list(skipped), "num_samples": 0}


def skips_only(batch: Any) -> bool:
    """A batch that carries skip records and no sample (a worker whose whole share was skipped)."""
    return isinstance(batch, dict) and batch.get("num_samples") == 0 and "input_ids" not in batch
