"""A run killed with SIGKILL mid-epoch resumes from its last checkpoint and ends with the same weights."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from nvila.core.data.synthetic import write_split


def fit_command(root, synth_data, tiny_overrides, *extra):
    return [
        sys.executable, "-m", "nvila.workflows", "fit", "--config", "demo",
        f"--data.train={synth_data / 'train'}", f"--data.val={synth_data / 'val'}",
        f"--trainer.default_root_dir={root}", "--trainer.max_steps=48", "--trainer.val_check_interval=1.0",
        "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--data.batch_size=16",
        "--data.num_workers=1", "--data.shuffle_buffer=64", "--model.warmup_steps=5",
        "--checkpoint.every_n_train_steps=8",
        *tiny_overrides,
        *extra,
    ]


def final_weights(root):
    (path,) = root.rglob("checkpoint/model.safetensors")
    return load_file(path)


@pytest.mark.slow  # over 5 s on an AVX2 core: the default run stays under 5 minutes; CI runs it
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, synth_data, tiny_overrides):
    # 512 samples / 16 = 32 batches an epoch: 48 steps cross an epoch boundary after the restart
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    straight = tmp_path / "straight"
    subprocess.run(fit_command(straight, synth_data, tiny_overrides), check=True, env=env, capture_output=True,
                   timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(fit_command(killed, synth_data, tiny_overrides), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((killed / "checkpoints").glob("*step=16*.ckpt")):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-epoch: step 16 (or 8) of a 32-batch epoch
    proc.wait()
    assert not list(killed.rglob("checkpoint/model.safetensors")), "killed before the end"
    state = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    (loader_state,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["epoch"] == 0 and loader_state["batches"] in (8, 16), loader_state

    resumed = subprocess.run(fit_command(killed, synth_data, tiny_overrides, "--ckpt_path", "last"), env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout

    expected, actual = final_weights(straight), final_weights(killed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert (expected[key] == actual[key]).all(), f"{key} differs after resuming"


@pytest.mark.slow  # two gloo processes, killed and resumed: ~1-2 min; CI runs the slow tests after the default ones
def test_ddp_run_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, tiny_overrides):
    """Two gloo ranks with uneven shares (3 shards and 2), killed together as a crash would take them."""
    data = tmp_path / "data"
    write_split(data / "train", 80, seed=4, image_size=32, shard_size=16)  # 5 shards: 48 samples and 32
    write_split(data / "val", 8, seed=5, image_size=32, shard_size=8)
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=20",
           "--data.batch_size=4", "--checkpoint.every_n_train_steps=3"]  # (after fit_command's: these win)
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    def command(root, *extra):
        return [*fit_command(root, data, tiny_overrides, *ddp), *extra]

    straight = tmp_path / "straight"
    subprocess.run(command(straight), check=True, env=env, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: rank 0 and the rank it launched
    deadline = time.time() + 300
    while not list((killed / "checkpoints").glob("*step=12*.ckpt")):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the second epoch (steps 8-15) is under way
    proc.wait()
    assert not list(killed.rglob("checkpoint/model.safetensors")), "killed before the end"
    state = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    (loader_state,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["epoch"] == 1 and loader_state["batches"] > 0, loader_state  # step 9 or 12: mid-epoch

    resumed = subprocess.run(command(killed, "--ckpt_path", "last"), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, actual = final_weights(straight), final_weights(killed)
    for key in expected:
        assert (expected[key] == actual[key]).all(), f"{key} differs after resuming"
