"""``nvila sweep``: train every combination of a grid of spec values and read one table of results.

Each combination is a plain ``nvila fit`` command line (the base recipe plus overrides), run one after the
other in a subprocess, so that a cluster scheduler can run the same lines instead (``--dry-run`` prints
them; ``--collect`` then only reads their results). The results folder holds ``results.csv``,
``results.md`` (written by the benchmarks' report writer, with the machine), ``results.json`` and
``accuracy_vs_tokens.png``, and one training log directory per run under ``runs/``.

Grid values: ``--grid KEY=V1,V2`` (each value read as YAML, so ``2`` is a number), or a YAML list for values
that contain commas, such as whole specs: ``--grid 'model.compressor=[{name: stc, ratio: 3}, {name: perceiver}]'``.

Swapping a plugin: a component spec (``model.compressor``, ``model.encoder``, ...) is a plain dict, so a
grid over ``model.compressor.name`` must not carry the base recipe's other keys (``ratio``) into another
plugin. The rule: a run whose ``SLOT.name`` differs from the base recipe's starts that slot from the new
plugin's defaults (``{name: tokenlearner}``); a run that keeps the base's plugin keeps the base's keys. Other
grid keys of the same slot (``--grid model.compressor.num_tokens=4,8``) are then set on top, and each
touched slot is passed to ``nvila fit`` as one whole spec (``--model.compressor={"name": "tokenlearner"}``),
which replaces the recipe's dict instead of merging into it.

Every combination is checked before anything runs: its command line is parsed as ``nvila fit`` would parse
it (a key that does not exist is named), and its model is built on the meta device (no memory, no weights),
which runs every plugin's own checks: a ratio larger than the feature grid, a zero ratio, a temporal group
larger than the frames, a key that is not a field of the plugin.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from nvila.core.errors import NvilaError
from nvila.core.model import MODEL_PARTS, ModelSpec
from nvila.workflows.bench.machine import command_line, describe_machine
from nvila.workflows.bench.record import Metric, Record
from nvila.workflows.bench.report import Report, write_report

log = logging.getLogger(__name__)
SPEC_SLOTS = tuple(f"model.{slot}" for slot in ModelSpec.slots())
"""Recipe keys whose value is a component spec (a dict with ``name``)."""
RESULT_COLUMNS = ("visual_tokens_per_image", "trainable_params", "prefill_ms", "train_samples_per_s",
                  "val_loss", "val_accuracy")


@dataclass
class Axis:
    """One ``--grid KEY=V1,V2`` argument."""

    key: str
    values: list[Any]


def parse_axis(text: str) -> Axis:
    """``KEY=V1,V2`` or ``KEY=[yaml, list]`` -> Axis; each value read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key or not raw.strip():
        raise NvilaError(f"--grid '{text}' is not KEY=V1,V2 (for example model.compressor.name=identity,stc).")
    raw = raw.strip()
    if raw.startswith("["):
        try:
            values = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise NvilaError(f"--grid {key}: '{raw}' is not a YAML list: {exc}") from None
    else:
        values = [yaml.safe_load(v) if v.strip() else "" for v in raw.split(",")]
    if not isinstance(values, list) or not values:
        raise NvilaError(f"--grid {key}: give at least one value.")
    return Axis(key, values)


def combinations(axes: Sequence[Axis]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the last axis varying fastest."""
    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        raise NvilaError(f"--grid names a key more than once: {', '.join(k for k in keys if keys.count(k) > 1)}")
    return [dict(zip(keys, values)) for values in itertools.product(*(a.values for a in axes))]


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _slot_of(key: str) -> tuple[str, str | None] | None:
    """(slot, field) when ``key`` is a component spec slot or one of its fields, else None."""
    for slot in SPEC_SLOTS:
        if key == slot:
            return slot, None
        if key.startswith(slot + "."):
            return slot, key[len(slot) + 1:]
    return None


def _base_spec(base: dict[str, Any], slot: str) -> dict[str, Any]:
    """The spec in ``slot`` of the base recipe, or the model's default spec for a slot the recipe leaves out."""
    spec = _get(base, slot)
    return dict(spec) if isinstance(spec, dict) else getattr(ModelSpec(), slot.split(".", 1)[1])


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def run_overrides(base: dict[str, Any], combo: dict[str, Any]) -> list[str]:
    """The ``nvila fit`` overrides for one combination (whole specs for every component slot it touches)."""
    specs: dict[str, dict[str, Any]] = {}
    plain: list[str] = []
    fields: list[tuple[str, str, Any]] = []
    for key, value in combo.items():
        slot = _slot_of(key)
        if slot is None:
            plain.append(f"--{key}={_value(value)}")
        elif slot[1] is None:  # a whole spec
            if not isinstance(value, dict) or "name" not in value:
                raise NvilaError(f"--grid {key}: each value must be a whole spec like {{name: stc, ratio: 2}}, "
                                 f"got {value!r}")
            specs[slot[0]] = dict(value)
        elif slot[1] == "name":
            base_spec = _base_spec(base, slot[0])
            specs[slot[0]] = base_spec if base_spec.get("name") == value else {"name": value}
        else:
            fields.append((slot[0], slot[1], value))
    for slot, name, value in fields:
        specs.setdefault(slot, _base_spec(base, slot))[name] = value
    return plain + [f"--{slot}={json.dumps(spec)}" for slot, spec in specs.items()]


def check_pass_through(extra: Sequence[str], axes: Sequence[Axis]) -> None:
    """Refuse pass-through overrides inside a component slot that the grid rebuilds (they would be lost)."""
    slots = {s[0] for a in axes if (s := _slot_of(a.key))}
    clashes = [arg for arg in extra for slot in slots if arg.removeprefix("--").startswith(slot)]
    if clashes:
        raise NvilaError(f"{', '.join(clashes)}: the grid rebuilds {', '.join(sorted(slots))} for each run; "
                         "put these keys in the grid instead (--grid KEY=VALUE).")


def run_name(index: int, combo: dict[str, Any]) -> str:
    """A folder name that says what the run varies: ``001-name=stc_batch_size=8``."""
    label = "_".join(f"{k.rsplit('.', 1)[-1]}={_value(v)}" for k, v in combo.items())
    return f"{index:03d}-" + re.sub(r"[^A-Za-z0-9=.,_-]+", "-", label)[:80]


@dataclass
class Run:
    """One combination: its overrides, command line, log root and results."""

    index: int
    combo: dict[str, Any]
    args: list[str]
    """``nvila fit`` arguments (without the leading ``nvila``)."""
    root: Path
    """Its ``trainer.default_root_dir``: Lightning's ``version_N`` log directory goes under it."""
    status: str = "pending"
    error: str = ""
    results: dict[str, float] = field(default_factory=dict)
    log_dir: Path | None = None

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def command(self) -> str:
        return shlex.join(["nvila", *self.args])


def plan_runs(config: str, axes: Sequence[Axis], out: Path, extra: Sequence[str]) -> list[Run]:
    """One Run per combination, each with its own log directory under ``out/runs``."""
    from nvila.workflows.cli import read_recipe, recipe_path

    config_path = str(Path(recipe_path(config)).resolve())
    base = read_recipe(["--config", config_path, *extra])
    check_pass_through(extra, axes)
    runs = []
    for i, combo in enumerate(combinations(axes)):
        root = out / "runs" / run_name(i, combo)
        args = ["fit", "--config", config_path, *run_overrides(base, combo), *extra,
                f"--trainer.default_root_dir={root}"]
        runs.append(Run(i, combo, args, root))
    return runs


def preflight(runs: Sequence[Run]) -> None:
    """Parse every run's command line and build its model on the meta device; report every problem at once."""
    problems = []
    for run in runs:
        try:
            _check_run(run.args[1:])
        except NvilaError as exc:
            label = ", ".join(f"{k}={_value(v)}" for k, v in run.combo.items())
            problems.append(f"run {run.index} ({label}): {exc}")
    if problems:
        raise NvilaError("The sweep was refused before anything ran:\n" + "\n".join(problems))


def _check_run(args: list[str]) -> None:
    from nvila.core.data.shards import find_shards
    from nvila.workflows.cli import read_recipe
    from nvila.workflows.module import build_module

    config = read_recipe(args)
    try:
        with torch.device("meta"):
            build_module(**config["model"])
    except NvilaError:
        raise
    except Exception as exc:  # a component that cannot be built on the meta device: check it when it runs
        log.warning("could not pre-build the model on the meta device (%s: %s); it is checked when it runs",
                    type(exc).__name__, exc)
    find_shards(config["data"]["train"])
    if config["data"]["val"]:
        find_shards(config["data"]["val"])


def execute(run: Run) -> None:
    """Run one combination's ``nvila fit`` in a subprocess; its output goes to ``<root>/fit.log``."""
    run.root.mkdir(parents=True, exist_ok=True)
    with open(run.root / "fit.log", "w") as output:
        done = subprocess.run([sys.executable, "-m", "nvila.workflows", *run.args], stdout=output,
                              stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        lines = [line for line in (run.root / "fit.log").read_text().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("nvila: error:")]
        run.status = "failed"
        run.error = (errors[-1] if errors else (lines[-1] if lines else f"exit status {done.returncode}"))[:500]


def collect(run: Run, eval_limit: int, batch_size: int = 16) -> None:
    """Measure a finished run from its exported checkpoint and logs; a missing checkpoint fails the run."""
    from nvila.core.checkpoint import load_checkpoint
    from nvila.core.data.shards import find_shards
    from nvila.workflows.evaluate import evaluate

    checkpoints = sorted(run.root.glob("*/checkpoint"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        raise NvilaError(f"no exported checkpoint under {run.root} (did `nvila fit` finish?)")
    run.log_dir = checkpoints[-1].parent
    config = yaml.safe_load((run.log_dir / "config.yaml").read_text())
    if not config["data"].get("val"):
        raise NvilaError("the recipe has no data.val: a sweep evaluates on held-out shards")
    shards = find_shards(config["data"]["val"])
    model = load_checkpoint(run.log_dir / "checkpoint")
    frozen = set(config["model"].get("freeze") or [])
    run.results["trainable_params"] = sum(p.numel() for part in MODEL_PARTS if part not in frozen
                                          for p in getattr(model, part).parameters())
    run.results["visual_tokens_per_image"], run.results["prefill_ms"] = _tokens_and_prefill(model, shards)
    run.results["val_loss"] = validation_loss(model, shards, batch_size, eval_limit)
    run.results["val_accuracy"] = evaluate(model, shards, batch_size, eval_limit).accuracy
    throughput = run.log_dir / "throughput.json"
    run.results["train_samples_per_s"] = (json.loads(throughput.read_text())["samples_per_s"]
                                          if throughput.exists() else math.nan)
    run.status = "ok"


@torch.no_grad()
def _tokens_and_prefill(model: Any, shards: list[str], repeats: int = 5) -> tuple[float, float]:
    """Visual tokens per image of the first held-out sample, and the median time (ms) to the first token's
    logits for its prompt (the benchmarks' one prefill: encoder, compressor, projector, language model), batch 1."""
    from nvila.core.data.shards import Decoded, SampleDecoder, decoded_stream
    from nvila.workflows.bench.prefill import prompt_batch, time_prefill

    first = next((d for d in decoded_stream(shards, SampleDecoder(model.processor).decode, split_by_rank=False)
                  if isinstance(d, Decoded)), None)
    if first is None:
        raise NvilaError(f"no usable held-out sample in {shards[0]}...: the log names each skipped one")
    images = first.images
    batch = prompt_batch(model, first.conversations[:-1], images)
    tokens = int((batch["input_ids"] == model.image_token_id).sum()) / max(len(images), 1)
    return tokens, time_prefill(model, batch, repeats=repeats, warmup=1).median * 1000


@torch.no_grad()
def validation_loss(model: Any, shards: list[str], batch_size: int = 16, limit: int | None = None) -> float:
    """Mean answer-token loss over held-out samples (each sample weighted by its supervised tokens)."""
    from nvila.core.data.shards import SampleDecoder, decoded_stream
    from nvila.core.processor import IGNORE_INDEX, Encoded, collate

    model.eval()  # held-out samples pass the training pipeline's decoder: the same skips, logged and left out
    stream = decoded_stream(shards, SampleDecoder(model.processor), split_by_rank=False)
    records = itertools.islice((e for e in stream if isinstance(e, Encoded)), limit)
    total, count = 0.0, 0
    while chunk := list(itertools.islice(records, batch_size)):
        batch = collate(chunk, model.tokenizer.pad_token_id)
        supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(model(**batch)["loss"]) * supervised
        count += supervised
    return total / max(count, 1)


RESULT_METRICS = {  # how each result column is compared and written: (unit, better, format)
    "visual_tokens_per_image": ("tokens", "lower", "{:g}"),
    "trainable_params": ("", None, "{:,}"),
    "prefill_ms": ("ms", "lower", "{:.1f}"),
    "train_samples_per_s": ("samples/s", "higher", "{:.0f}"),
    "val_loss": ("", "lower", "{:.3f}"),
    "val_accuracy": ("", "higher", "{:.1%}"),
}


def run_record(run: Run, keys: Sequence[str]) -> Record:
    """One run as a benchmark record: its grid values as settings, its results as metrics."""
    metrics = {}
    for column in RESULT_COLUMNS:
        if column in run.results:
            unit, better, pattern = RESULT_METRICS[column]
            metrics[column] = Metric(run.results[column], unit, better, pattern)
    return Record("sweep", run.name, metrics, settings={k: _value(run.combo[k]) for k in keys},
                  status="failed" if run.status == "failed" else "ok", notes=[run.error] if run.error else [])


def write_results(out: Path, runs: Sequence[Run], keys: Sequence[str]) -> dict[str, Path]:
    """``results.csv``, ``results.md`` (the table, then the machine), ``results.json`` (the benchmarks' report
    format) and ``accuracy_vs_tokens.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    header = ["run", "status", *keys, *RESULT_COLUMNS, "error", "log_dir", "command"]
    rows = [{"run": r.name, "status": r.status, **{k: _value(r.combo[k]) for k in keys},
             **{c: r.results.get(c, "") for c in RESULT_COLUMNS}, "error": r.error,
             "log_dir": str(r.log_dir or ""), "command": r.command} for r in runs]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    report = Report("sweep", [run_record(r, keys) for r in runs], describe_machine(), command_line(),
                    title="nvila sweep: " + ", ".join(keys), columns=RESULT_COLUMNS, summary=SWEEP_SUMMARY)
    written = write_report(report, out, stem="results", title=False, first_column="run", units=False,
                           notes_column="error", status=True, notes=True)
    paths = {"csv": out / "results.csv", **written}
    paths["plot"] = plot_accuracy(out / "accuracy_vs_tokens.png", runs, keys)
    return paths


def plot_accuracy(path: Path, runs: Sequence[Run], keys: Sequence[str]) -> Path:
    """Held-out accuracy against visual tokens per image, one labelled point per finished run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in runs if r.status == "ok"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r in done:
        x, y = r.results["visual_tokens_per_image"], r.results["val_accuracy"] * 100
        ax.scatter(x, y, s=36)
        ax.annotate(", ".join(_value(r.combo[k]) for k in keys), (x, y), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    if not done:
        ax.text(0.5, 0.5, "no run finished", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("visual tokens per image")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("nvila sweep: " + ", ".join(keys), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


SWEEP_SUMMARY = ("Each run is a plain `nvila fit` (its command in results.csv); prefill_ms is the median of 5 "
                 "prefills of the first held-out prompt after a warm-up, in this process; train_samples_per_s counts "
                 "training steps only; val_loss and val_accuracy are on the held-out shards.")


def run_sweep(config: str, grid: Sequence[str], out: str | Path | None = None, dry_run: bool = False,
              collect_only: bool = False, extra: Sequence[str] = (), eval_limit: int = 200) -> list[Run]:
    """Check, run and measure every combination; print commands only when ``dry_run``."""
    if not grid:
        raise NvilaError("Give at least one --grid KEY=V1,V2.")
    axes = [parse_axis(g) for g in grid]
    out = Path(out or f"sweeps/{time.strftime('%Y%m%d-%H%M%S')}")
    runs = plan_runs(config, axes, out, list(extra))
    preflight(runs)
    if dry_run:
        for run in runs:
            print(run.command)
        return runs
    (out / "commands.sh").parent.mkdir(parents=True, exist_ok=True)
    (out / "commands.sh").write_text("\n".join(run.command for run in runs) + "\n")
    for run in runs:
        print(f"[{run.index + 1}/{len(runs)}] {run.name}", flush=True)
        if not collect_only:
            execute(run)
        if run.status != "failed":
            try:
                collect(run, eval_limit)
            except Exception as exc:  # one run's broken output must not stop the sweep
                run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"[:500]
        print(f"    {run.status}{': ' + run.error if run.error else ''}", flush=True)
    paths = write_results(out, runs, [a.key for a in axes])
    print(f"\n{paths['markdown'].read_text()}\nResults: {paths['csv']}, {paths['markdown']}, {paths['json']}, "
          f"{paths['plot']}")
    return runs
