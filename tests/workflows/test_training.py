"""Training for real, briefly: a few steps reduce the loss, and the exported checkpoint evaluates."""

import csv

from nvila.core.checkpoint import load_checkpoint
from nvila.core.data.shards import find_shards
from nvila.workflows.cli import recipe_path, run_cli
from nvila.workflows.evaluate import evaluate


def test_a_few_steps_reduce_the_loss_and_export_a_checkpoint(synth_data, tmp_path, tiny_overrides):
    cli = run_cli([
        "fit", "--config", recipe_path("demo"), f"--data.train={synth_data / 'train'}",
        f"--data.val={synth_data / 'val'}", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=100", "--trainer.val_check_interval=100", "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=5",
        "--trainer.enable_progress_bar=false", "--data.batch_size=16", "--data.num_workers=0",
        "--model.warmup_steps=5", "--model.lr=2e-3",  # the tiny model, not the demo recipe's lr: 100 steps must tell
        *tiny_overrides,
    ])
    assert cli.trainer.global_step == 100
    (csv,) = tmp_path.rglob("metrics.csv")
    assert list(tmp_path.rglob("events.out.tfevents.*")), "TensorBoard logs are written beside the CSV"
    rows = [r for r in csv_rows(csv) if r.get("train/loss")]
    first, last = float(rows[0]["train/loss"]), float(rows[-1]["train/loss"])
    print(f"train loss {first:.3f} -> {last:.3f}")
    assert last < 0.6 * first

    model = load_checkpoint(cli.export.path)
    result = evaluate(model, find_shards(synth_data / "val"), limit=8)
    assert len(result.answers) == 8 and all(a.predicted is not None for a in result.answers)


def csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))
