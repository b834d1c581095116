"""Shared fixtures: the real registry, tiny model specs, and small synthetic shard sets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from nvila.core.data.synthetic import write_dataset
from nvila.core.plugins import load_plugins
from nvila.core.testing import TINY_MODEL  # tiny but real architectures, shared with the public test kit


@pytest.fixture(scope="session")
def native_ops() -> None:
    """nvila's C++ kernels built and their ops registered, where this machine can run them. Quantized layers and the
    attention function load them on first use; tests that call ``torch.ops`` directly use this, so that each runs
    alone as well as after others."""
    from nvila.plugins import attention
    from nvila.quant import int4_cpu, int8_cpu

    for kernel in (int4_cpu.KERNEL, int8_cpu.KERNEL, attention.KERNEL, attention.PREFILL_KERNEL):
        if kernel.missing() is None:
            kernel.load()


@pytest.fixture(scope="session")
def registry():
    loaded = load_plugins(strict=True)
    return loaded.registry


@pytest.fixture(scope="session")
def tiny_spec() -> dict:
    return TINY_MODEL.to_dict()


@pytest.fixture(scope="session")
def tiny_overrides(tiny_spec) -> list[str]:
    """Command-line overrides that shrink a recipe's encoder and language model to the tiny test sizes."""
    return [f"--model.{part}.{key}={value}" for part in ("encoder", "llm")
            for key, value in tiny_spec[part].items() if key != "name"]


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small train/val shard set of the synthetic shapes task (32 px images)."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, train=512, val=64, seed=3, image_size=32)
    return root


@pytest.fixture(scope="session")
def tiny_fit_args(synth_data, tiny_overrides) -> Callable[..., list[str]]:
    """``nvila fit`` arguments: a few steps of the demo recipe with the tiny model, on ``synth_data``.

    ``configs`` are extra recipe files applied after the demo recipe (a user's own YAML).
    """

    def args(root: Path, steps: int = 3, configs: tuple[Path, ...] = ()) -> list[str]:
        return [
            "fit", "--config", "demo", *[a for c in configs for a in ("--config", str(c))],
            f"--data.train={synth_data / 'train'}", f"--data.val={synth_data / 'val'}", "--data.batch_size=4",
            "--data.num_workers=0", f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={steps}", "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--model.warmup_steps=1",
            *tiny_overrides,
        ]

    return args


@pytest.fixture(scope="session")
def varied_model(registry, tiny_spec):
    """The tiny model with its language model's matrices redrawn at std 0.2, in eval mode: at the default 0.02 it
    answers one token over and over, and generation tests need answers whose tokens differ. Do not modify it."""
    import torch

    from nvila.core.model import NvilaModel

    torch.manual_seed(0)
    model = NvilaModel(tiny_spec, registry).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2, generator=g)
    return model


def pytest_collection_modifyitems(config, items):
    """`bf16` tests compute in bf16 on the CPU: skipped where torch emulates bf16 (an AVX2-only CPU, or
    ATEN_CPU_CAPABILITY=avx2), where it is hundreds of times slower and some of its kernels refuse to run."""
    from nvila.workflows.bench.machine import cpu_computes_bf16

    if any("bf16" in item.keywords for item in items) and not cpu_computes_bf16():
        skip = pytest.mark.skip(reason="bf16 is emulated on this CPU (no bf16 units, or torch runs its AVX2 kernels)")
        for item in items:
            if "bf16" in item.keywords:
                item.add_marker(skip)
