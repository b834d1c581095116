"""``nvila prune``: score every sample with a pruner through Lightning's predict loop, keep a fraction of each
source data set, write the kept samples as new shards, and report what was kept.

Scoring runs batched in ``Trainer.predict``, so it spreads over as many devices as the Trainer is given;
each rank writes its scores to ``scores/rank-N.jsonl`` (a prediction writer), and rank 0 selects and writes.
Samples are copied byte for byte: pruning never re-encodes media.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import webdataset as wds
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, IterableDataset

from nvila.core.checkpoint import load_checkpoint
from nvila.core.data.packing import as_formed
from nvila.core.data.shards import SampleDecoder, find_shards
from nvila.core.data.shardset import ShardSetWriter, check_output
from nvila.core.data.skips import ShardErrors, Skipped
from nvila.core.errors import NvilaError
from nvila.core.processor import Encoded, NvilaProcessor, collate
from nvila.core.pruning import Pruner, ScoringBatch, select
from nvila.core.specs import build, parse_inline

log = logging.getLogger(__name__)
REPORT_FILE, HISTOGRAM_FILE, SCORES_FILE = "prune-report.json", "scores.png", "scores.jsonl"


def _source(sample: dict[str, Any]) -> str:
    try:
        return str(json.loads(sample["json"]).get("source") or "unknown")
    except Exception:
        return "unknown"


class ScoringStream(IterableDataset):
    """Batches of samples to score, formed in the DataLoader workers: each model role gets its own encoding."""

    def __init__(self, shards: list[str], processors: dict[str, NvilaProcessor], batch_size: int) -> None:
        self.shards, self.processors, self.batch_size = shards, processors, batch_size

    def _items(self) -> Iterator[tuple[str, str, dict[str, Encoded]] | Skipped]:
        errors = ShardErrors()
        decoders = {role: SampleDecoder(p) for role, p in self.processors.items()}
        dataset = wds.WebDataset(self.shards, handler=errors, shardshuffle=False, nodesplitter=wds.split_by_node,
                                 workersplitter=wds.split_by_worker, empty_check=False).compose(errors.check_ends)
        for sample in dataset:
            yield from errors.drain()
            where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
            if "json" not in sample:
                yield Skipped("missing_json", where, "no .json").log()
                continue
            encoded = {role: decode(sample) for role, decode in decoders.items()}
            failed = next((e for e in encoded.values() if isinstance(e, Skipped)), None)
            yield failed if failed is not None else (where, _source(sample), encoded)
        yield from errors.drain()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        group: list[tuple[str, str, dict[str, Encoded]]] = []
        skipped: list[Skipped] = []
        for item in self._items():
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            group.append(item)
            if len(group) == self.batch_size:
                yield self._batch(group, skipped)
                group, skipped = [], []
        if group or skipped:
            yield self._batch(group, skipped)

    def _batch(self, group: list, skipped: list[Skipped]) -> dict[str, Any]:
        inputs = {role: collate([enc[role] for _, _, enc in group], p.tokenizer.pad_token_id)
                  for role, p in self.processors.items()} if group else {}
        return {"ids": [g[0] for g in group], "sources": [g[1] for g in group], "inputs": inputs,
                "skipped": skipped}


class ScoringModule(L.LightningModule):
    """Holds the pruner's models (so the Trainer places them) and scores batches in ``predict_step``."""

    def __init__(self, pruner: Pruner, models: dict[str, torch.nn.Module]) -> None:
        super().__init__()
        self.pruner, self.models = pruner, torch.nn.ModuleDict(models)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        scores: list[float] = []
        if batch["ids"]:
            inputs = {role: {k: v for k, v in b.items()} for role, b in batch["inputs"].items()}
            scoring = ScoringBatch(batch["ids"], batch["sources"], inputs)
            scores = self.pruner.score(scoring, dict(self.models)).double().cpu().tolist()
        return {"ids": batch["ids"], "sources": batch["sources"], "scores": scores, "skipped": batch["skipped"]}


class ScoreWriter(BasePredictionWriter):
    """Appends each rank's scores (and skip records) to ``<dir>/rank-N.jsonl`` as batches are scored."""

    def __init__(self, directory: Path) -> None:
        super().__init__(write_interval="batch")
        self.directory = directory

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank-{trainer.global_rank}.jsonl").write_text("")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        with open(self.directory / f"rank-{trainer.global_rank}.jsonl", "a") as f:
            for i, source, score in zip(prediction["ids"], prediction["sources"], prediction["scores"]):
                f.write(json.dumps({"id": i, "source": source, "score": score}) + "\n")
            for s in prediction["skipped"]:
                f.write(json.dumps({"id": s.where, "skipped": s.reason, "detail": s.detail}) + "\n")


@dataclass
class PruneResult:
    """What ``nvila prune`` did."""

    pruner: dict[str, Any]
    keep: float
    total: int = 0
    kept: int = 0
    per_source: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        thresholds = [s["threshold"] for s in self.per_source.values() if not math.isnan(s["threshold"])]
        return {"pruner": self.pruner, "keep": self.keep, "scored": self.total, "kept": self.kept,
                "kept_fraction": self.kept / self.total if self.total else 0.0,
                "threshold": min(thresholds) if thresholds else None,
                "threshold_note": "keep ratios apply per source; each source's threshold is its lowest kept score",
                "per_source": self.per_source, "skipped": self.skipped, "shards": self.shards}

    def summary(self) -> str:
        lines = [f"kept {self.kept} of {self.total} scored samples ({self.kept / max(self.total, 1):.1%}) "
                 f"with {self.pruner['name']}, keep={self.keep}"]
        for source, s in self.per_source.items():
            lines.append(f"  {source}: kept {s['kept']}/{s['total']} ({s['kept_fraction']:.1%}), "
                         f"threshold {s['threshold']:.4g}")
        if self.skipped:
            lines.append(f"  skipped (not scored, not kept): {self.skipped}")
        return "\n".join(lines)


def load_models(pruner: Pruner, checkpoints: dict[str, str | None]) -> dict[str, torch.nn.Module]:
    """The checkpoints a pruner needs, by role; a clear error names the missing flags."""
    missing = [role for role in pruner.models if not checkpoints.get(role)]
    if missing:
        flags = ", ".join(f"--{role}-ckpt" for role in missing)
        raise NvilaError(f"this pruner scores with {' and '.join(pruner.models)} models: pass {flags} "
                         "(nvila checkpoint directories, written by `nvila fit`).")
    return {role: load_checkpoint(checkpoints[role]) for role in pruner.models}


def write_kept(shards: list[str], kept: set[str], out: Path, shard_size: int) -> list[str]:
    """Copy the kept samples, byte for byte and in input order, into new shards under ``out`` (replacing the
    shard set a previous prune left there; an interrupted one leaves no partial shard)."""
    written: set[str] = set()
    with ShardSetWriter(out, shard_size, writer="nvila prune", overwrite=True) as sink:
        for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False, handler=wds.warn_and_continue):
            if f"{sample['__url__']}:{sample['__key__']}" not in kept:
                continue
            key = sample["__key__"]
            while key in written:  # the same key in two input shards
                key += "_"
            written.add(key)
            sink.write({"__key__": key, **{k: v for k, v in sample.items() if not k.startswith("__")}})
    return [p.name for p in sink.paths]


def plot_scores(scores: list[tuple[str, float, bool]], path: Path, title: str) -> None:
    """Histogram of the scores, kept and dropped stacked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = [s for _, s, k in scores if k and math.isfinite(s)]
    dropped = [s for _, s, k in scores if not k and math.isfinite(s)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist([kept, dropped], bins=50, stacked=True, label=[f"kept ({len(kept)})", f"dropped ({len(dropped)})"],
            color=["tab:green", "tab:gray"])
    ax.set_xlabel("score")
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_prune(pruner_spec: str, keep: float, inp: str, out: str, small_ckpt: str | None = None,
              large_ckpt: str | None = None, batch_size: int = 32, num_workers: int = 1,
              accelerator: str = "auto", devices: str | int = "auto", shard_size: int = 1000) -> PruneResult | None:
    """Score, select, write and report; returns the result on rank 0 (None on the other ranks)."""
    if not 0 < keep <= 1:
        raise NvilaError(f"--keep must be in (0, 1], got {keep}.")
    spec = parse_inline(pruner_spec)
    pruner = build("pruner", dict(spec))
    models = load_models(pruner, {"small": small_ckpt, "large": large_ckpt})
    shards = find_shards(inp)
    out_dir = Path(out)
    if out_dir.resolve() == Path(inp).resolve():
        raise NvilaError("--out must differ from --in: pruning writes new shards and keeps the originals.")
    out_dir.mkdir(parents=True, exist_ok=True)
    check_output(out_dir)  # before scoring; rank 0 replaces a previous prune's shards when it writes

    stream = ScoringStream(shards, {role: m.processor for role, m in models.items()}, batch_size)
    loader = DataLoader(stream, batch_size=None, collate_fn=as_formed, num_workers=min(num_workers, len(shards)))
    score_dir = out_dir / "scores"
    trainer = L.Trainer(accelerator=accelerator, devices=devices, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out_dir),
                        callbacks=[ScoreWriter(score_dir)])
    trainer.predict(ScoringModule(pruner, models), dataloaders=loader, return_predictions=False)
    if trainer.world_size > 1:
        trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None

    scored: dict[str, tuple[str, float]] = {}
    skipped: Counter = Counter()
    for rank_file in sorted(score_dir.glob("rank-*.jsonl")):
        for line in rank_file.read_text().splitlines():
            row = json.loads(line)
            if "skipped" in row:
                skipped[row["skipped"]] += 1
            else:
                scored[row["id"]] = (row["source"], float(row["score"]))
    if not scored:
        raise NvilaError(f"No sample of '{inp}' could be scored (skipped: {dict(skipped) or 'none'}).")
    selection = select(scored, keep)
    result = PruneResult(spec, keep, total=len(scored), kept=len(selection.kept), per_source=selection.per_source,
                         skipped=dict(skipped))
    result.shards = write_kept(shards, selection.kept, out_dir, shard_size)
    with open(out_dir / SCORES_FILE, "w") as f:
        for sample_id, (source, score) in scored.items():
            f.write(json.dumps({"id": sample_id, "source": source, "score": score,
                                "kept": sample_id in selection.kept}) + "\n")
    plot_scores([(i, s, i in selection.kept) for i, (_, s) in scored.items()], out_dir / HISTOGRAM_FILE,
                f"{spec['name']} scores, keep={keep}")
    (out_dir / REPORT_FILE).write_text(json.dumps(result.to_dict(), indent=2))
    return result
