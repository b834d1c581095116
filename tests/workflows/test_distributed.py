"""Data split across DDP ranks and workers, and real two-process DDP training on the CPU (gloo)."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from nvila.core.data.shards import EpochStream, find_shards
from nvila.core.data.synthetic import write_split
from nvila.core.model import NvilaModel


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_split(root / "train", 96, seed=9, image_size=32, shard_size=12)  # 8 shards
    write_split(root / "val", 16, seed=10, image_size=32, shard_size=8)
    return root


def keys_seen(shards, processor, _pad_id, rank, world, workers, monkeypatch):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    stream = EpochStream(shards, processor, shuffle=16, seed=1)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return [sample.key.rsplit(":", 1)[-1] for sample in loader]


def test_each_sample_is_seen_once_per_epoch_across_ranks_and_workers(many_shards, registry, tiny_spec,
                                                                     monkeypatch):
    model = NvilaModel(tiny_spec, registry)
    shards = find_shards(many_shards / "train")
    seen = [keys_seen(shards, model.processor, model.tokenizer.pad_token_id, rank, 2, 2, monkeypatch)
            for rank in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == len(set(seen[0]) | set(seen[1])) == 96


def fit_with_two_processes(data, root, tiny_overrides, *extra, timeout=300):
    """`nvila fit` on two gloo ranks; a run that hangs fails with every process's Python stack (faulthandler)."""
    process = subprocess.Popen([
        sys.executable, "-m", "nvila.workflows", "fit", "--config", "demo",
        f"--data.train={data / 'train'}", f"--data.val={data / 'val'}",
        f"--trainer.default_root_dir={root}", "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.strategy=ddp", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--data.batch_size=4", "--data.num_workers=1", "--model.warmup_steps=1", *tiny_overrides, *extra,
    ], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        log, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGABRT)  # faulthandler prints each process's stack as it dies
        log, _ = process.communicate(timeout=60)
        pytest.fail(f"two-process fit still running after {timeout} s (a hang); its log and stacks:\n{log[-12000:]}")
    assert process.returncode == 0, log[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert list(root.rglob("checkpoint/model.safetensors"))
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu"), log


@pytest.mark.slow  # over 5 s on an AVX2 core: the default run stays under 5 minutes; CI runs it
def test_ddp_trains_with_two_processes_on_the_cpu(many_shards, tiny_overrides, tmp_path):
    fit_with_two_processes(many_shards, tmp_path, tiny_overrides, "--trainer.max_steps=4",
                           "--trainer.val_check_interval=4")


@pytest.mark.slow  # a second two-process run; the default suite keeps test_ddp_trains_with_two_processes_on_the_cpu
def test_ddp_ranks_with_uneven_shares_end_each_epoch_together(tmp_path, tiny_overrides):
    data = tmp_path / "data"
    write_split(data / "train", 36, seed=9, image_size=32, shard_size=12)  # 3 shards: 24 samples and 12
    write_split(data / "val", 8, seed=10, image_size=32, shard_size=8)  # 1 shard: every rank reads it
    state, log = fit_with_two_processes(data, tmp_path / "run", tiny_overrides, "--trainer.max_epochs=2")
    assert "data.train has 3 shards for 2 ranks: ranks get unequal shares" in log
    # (ranks that ended apart used to crash in mismatched gloo collectives)
    assert state["epoch"] == 2 and state["global_step"] == 2 * 3  # each epoch: the short rank's 3 batches
