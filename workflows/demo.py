"""``nvila demo``: generate the synthetic shapes data, train a tiny NVILA on the CPU, evaluate it."""

from __future__ import annotations

import time
from pathlib import Path

from nvila.core.checkpoint import load_checkpoint
from nvila.core.data.shards import find_shards
from nvila.core.data.synthetic import chance_accuracy, write_dataset
from nvila.workflows.cli import run_cli
from nvila.workflows.evaluate import evaluate


def run_demo(out: str = "nvila-demo", train_samples: int = 20000, val_samples: int = 500,
             extra_args: list[str] | None = None, show: int = 8) -> dict[str, float]:
    """Run the whole demo and print what it learned; returns the figures it printed."""
    root = Path(out)
    print(f"[1/3] Writing synthetic shards to {root / 'data'} ...", flush=True)
    write_dataset(root / "data", train=train_samples, val=val_samples, overwrite=True)  # the demo's own data

    print("[2/3] Training a tiny NVILA (SigLIP -> STC 2x2 -> MLP -> Qwen2) on the CPU ...", flush=True)
    start = time.perf_counter()
    cli = run_cli(["fit", "--config", "demo", f"--data.train={root / 'data' / 'train'}",
                   f"--data.val={root / 'data' / 'val'}", f"--trainer.default_root_dir={root / 'runs'}",
                   *(extra_args or [])])
    train_seconds = time.perf_counter() - start
    steps = cli.trainer.global_step
    if 0 < cli.trainer.max_steps and steps < cli.trainer.max_steps:
        print(f"\nTraining stopped early, at step {steps} of {cli.trainer.max_steps}: the recipe's time budget "
              f"(trainer.max_time = {cli.config.fit.trainer.max_time}) ran out on this machine, so the "
              "accuracy below is lower than a full run's. Rerun with --trainer.max_time=null to train every step.",
              flush=True)
    samples_per_s = steps * cli.datamodule.hparams.batch_size / train_seconds

    print(f"[3/3] Evaluating {cli.export.path} on the held-out shards by generation ...", flush=True)
    model = load_checkpoint(cli.export.path)
    result = evaluate(model, find_shards(root / "data" / "val"))
    chance = chance_accuracy([a.qtype for a in result.answers])

    print(f"\nSample answers (checkpoint: {cli.export.path}):")
    for a in result.answers[:show]:
        mark = "ok " if a.correct else "bad"
        print(f"  [{mark}] Q: {a.question:<42} model: {a.predicted!r:<16} truth: {a.reference!r}")
    print(f"\nTrained {steps} steps in {train_seconds:.0f} s ({samples_per_s:.0f} samples/s).")
    print(f"Held-out accuracy: {result.accuracy:.1%} on {len(result.answers)} questions "
          f"(chance: {chance:.1%}, {result.accuracy / chance:.1f}x chance).")
    return {"accuracy": result.accuracy, "chance": chance, "train_seconds": train_seconds,
            "samples_per_s": samples_per_s, "steps": steps}
