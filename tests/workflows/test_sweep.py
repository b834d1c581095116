"""`nvila sweep`: grids become plain `nvila fit` command lines, bad grids are refused up front, results land in
one folder (a real sweep of two tiny runs)."""

import csv
import json
import shlex
import subprocess
import sys

import pytest
import yaml

from nvila.core.errors import NvilaError
from nvila.workflows.sweep import Run, execute, parse_axis, run_overrides, run_sweep

BASE = {"model": {"compressor": {"name": "stc", "ratio": 2}, "projector": {"name": "mlp"}}}


def overrides(*grid_values):
    return run_overrides(BASE, dict(grid_values))


def test_swapping_a_plugin_starts_from_its_defaults_and_keeping_it_keeps_the_recipes_keys():
    assert overrides(("model.compressor.name", "tokenlearner")) == ['--model.compressor={"name": "tokenlearner"}']
    assert overrides(("model.compressor.name", "stc")) == ['--model.compressor={"name": "stc", "ratio": 2}']
    assert overrides(("model.compressor.name", "perceiver"), ("model.compressor.num_latents", 4)) == [
        '--model.compressor={"name": "perceiver", "num_latents": 4}']
    assert overrides(("model.compressor.ratio", 3), ("trainer.max_steps", 5)) == [
        "--trainer.max_steps=5", '--model.compressor={"name": "stc", "ratio": 3}']
    # a slot the recipe leaves out starts from the model's default spec
    assert overrides(("model.temporal.group", 4)) == ['--model.temporal={"name": "temporal-average", "group": 4}']


def test_grid_values_are_yaml_and_whole_specs_go_in_a_list():
    assert parse_axis("model.compressor.ratio=1,2,3").values == [1, 2, 3]
    axis = parse_axis("model.compressor=[{name: stc, ratio: 3}, {name: perceiver, num_latents: 16}]")
    assert axis.values == [{"name": "stc", "ratio": 3}, {"name": "perceiver", "num_latents": 16}]
    assert overrides(("model.compressor", axis.values[1])) == [
        '--model.compressor={"name": "perceiver", "num_latents": 16}']
    with pytest.raises(NvilaError, match="not KEY=V1,V2"):
        parse_axis("model.compressor.name")


@pytest.fixture
def base_recipe(tmp_path, synth_data, tiny_spec):
    recipe = {
        "model": {**tiny_spec, "warmup_steps": 2, "max_length": 128},
        "data": {"train": str(synth_data / "train"), "val": str(synth_data / "val"), "batch_size": 8,
                 "num_workers": 0, "shuffle_buffer": 16},
        "trainer": {"accelerator": "cpu", "max_steps": 6, "val_check_interval": 6, "limit_val_batches": 1,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def nvila(*args):
    return subprocess.run([sys.executable, "-m", "nvila.workflows", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # over 5 s on an AVX2 core: the default run stays under 5 minutes; CI runs it
def test_dry_run_prints_one_plain_fit_command_per_combination_and_runs_nothing(base_recipe, tmp_path):
    out = nvila("sweep", "--config", str(base_recipe), "--grid", "model.compressor.name=identity,stc,perceiver",
                "--grid", "data.batch_size=4,8", "--dry-run", "--out", str(tmp_path / "sweep"),
                "--trainer.max_steps=3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith("nvila fit --config ") for line in lines)
    first = shlex.split(lines[0])  # each line is a shell command, copy-pasteable
    assert '--model.compressor={"name": "identity"}' in first and "--data.batch_size=4" in first
    assert all("--trainer.max_steps=3" in shlex.split(line) for line in lines)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("grid,message", [
    ("trainer.max_stepz=1,2", r"trainer.max_stepz"),
    ("model.compressor.ratoi=2", r"key 'ratoi' is not a field of compressor 'stc'. Did you mean 'ratio'"),
    ("model.compressor.ratio=2,5", r"run 1 .*key 'ratio' = 5 is larger than the 4x4 feature grid; valid range 1..4"),
    ("model.compressor.ratio=0", r"key 'ratio' = 0 is out of range.*valid range 1\.\."),
    ("model.temporal={name: temporal-average, group: 16, frames: 8}".replace("=", "=[", 1) + "]",
     r"key 'group' = 16 is larger than the 8 frames per video \(key 'frames'\); valid range 1..8"),
])
def test_bad_grids_are_refused_before_anything_runs_naming_the_key(grid, message, base_recipe, tmp_path):
    with pytest.raises(NvilaError, match=f"(?s)refused before anything ran.*{message}"):
        run_sweep(str(base_recipe), [grid], tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow  # over 5 s on an AVX2 core: the default run stays under 5 minutes; CI runs it
def test_a_failed_run_is_recorded_with_its_error(tmp_path):
    run = Run(0, {"model.compressor.name": "stc"}, ["fit", "--config", str(tmp_path / "missing.yaml")],
              tmp_path / "000-name=stc")
    execute(run)
    assert run.status == "failed" and "nvila: error: Recipe" in run.error and "missing.yaml" in run.error


@pytest.mark.slow  # over 5 s on an AVX2 core: the default run stays under 5 minutes; CI runs it
def test_a_sweep_of_two_tiny_runs_writes_one_results_folder(base_recipe, tmp_path):
    out = tmp_path / "sweep"
    runs = run_sweep(str(base_recipe), ["model.compressor.name=identity,stc"], out, eval_limit=8,
                     extra=["--trainer.max_steps=4"])
    assert [r.status for r in runs] == ["ok", "ok"], [r.error for r in runs]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["model.compressor.name"] for r in rows] == ["identity", "stc"]
    identity, stc = rows
    assert float(identity["visual_tokens_per_image"]) == 16 and float(stc["visual_tokens_per_image"]) == 4
    for row in rows:
        assert 0 <= float(row["val_accuracy"]) <= 1 and float(row["val_loss"]) > 0
        assert float(row["prefill_ms"]) > 0 and float(row["train_samples_per_s"]) > 0
        assert int(row["trainable_params"]) > 0 and "--trainer.max_steps=4" in row["command"]
    # STC's projector reads 4x wider tokens, so it has more parameters than identity's
    assert int(stc["trainable_params"]) > int(identity["trainable_params"])
    config = yaml.safe_load((runs[0].log_dir / "config.yaml").read_text())
    assert config["model"]["compressor"] == {"name": "identity"} and config["trainer"]["max_steps"] == 4
    assert json.loads((runs[1].log_dir / "throughput.json").read_text())["samples"] > 0
    table = (out / "results.md").read_text()
    assert table.startswith("| run | status | model.compressor.name | visual_tokens_per_image")
    assert (out / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "commands.sh").read_text().splitlines()) == 2

    again = run_sweep(str(base_recipe), ["model.compressor.name=identity,stc,perceiver"], out, eval_limit=8,
                      collect_only=True)  # what a scheduler ran is measured; the run it did not is failed
    assert [r.status for r in again] == ["ok", "ok", "failed"] and "no exported checkpoint" in again[2].error
