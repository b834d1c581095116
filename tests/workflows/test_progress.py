"""Progress by steps: a terminal bar that counts steps (never `Epoch 1/-2`), plain lines when the output is a
file or a pipe."""

import io
import re
import subprocess
import sys

import lightning as L
import pytest

from nvila.workflows.callbacks import PlainProgress, StepProgressBar, progress_line
from nvila.workflows.datamodule import NvilaDataModule
from nvila.workflows.module import build_module


def fit_tiny(tiny_spec, synth_data, tmp_path, callbacks, **trainer):
    module = build_module(**tiny_spec, warmup_steps=1)
    data = NvilaDataModule(train=str(synth_data / "train"), val=None, batch_size=8, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks, **trainer)
    trainer.fit(module, datamodule=data)
    return trainer


def test_plain_lines_report_step_loss_speed_and_time_left(tiny_spec, synth_data, tmp_path):
    out = io.StringIO()
    fit_tiny(tiny_spec, synth_data, tmp_path, [PlainProgress(every_s=0, stream=out)], enable_progress_bar=False)
    lines = out.getvalue().splitlines()
    assert len(lines) == 6, lines  # every step, at every_s=0
    assert re.fullmatch(r"step 6/6 \(100%\)  loss \d+\.\d{4}  \d+ samples/s  elapsed 0:00:\d\d  left ~0:00:00",
                        lines[-1]), lines[-1]


def test_the_terminal_bar_counts_steps_not_epochs(tiny_spec, synth_data, tmp_path, capsys):
    fit_tiny(tiny_spec, synth_data, tmp_path, [StepProgressBar()])
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert "train: 100%" in text and "6/6" in text and "Epoch" not in text


def test_progress_line_without_a_step_budget():
    assert progress_line(7, -1, {"loss": 2.0}, 70, 10.0, 7) == "step 7  loss 2.0000  7 samples/s  elapsed 0:00:10"


@pytest.mark.slow  # over 5 s on an AVX2 core: the default run stays under 5 minutes; CI runs it
def test_nvila_fit_into_a_pipe_prints_plain_lines(synth_data, tmp_path, tiny_overrides):
    done = subprocess.run([sys.executable, "-m", "nvila.workflows", "fit", "--config", "demo",
                           f"--data.train={synth_data / 'train'}", f"--data.val={synth_data / 'val'}",
                           f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
                           "--trainer.limit_val_batches=1", "--data.num_workers=0", *tiny_overrides],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Epoch" not in done.stdout + done.stderr  # no bar written into a pipe
