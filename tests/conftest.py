"""Shared fixtures: the real registry, tiny model specs, and small synthetic shard sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from nvila_core.data.synthetic import write_dataset
from nvila_core.plugins import load_plugins

# Tiny but real architectures: the demo's shapes, scaled down further for unit tests.
TINY_MODEL = {
    "encoder": {"name": "siglip", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "feature_layer": -1},
    "compressor": {"name": "stc", "ratio": 2},
    "projector": {"name": "mlp"},
    "llm": {"name": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
            "num_kv_heads": 1},
}


@pytest.fixture(scope="session")
def registry():
    loaded = load_plugins(strict=True)
    return loaded.registry


@pytest.fixture(scope="session")
def tiny_spec() -> dict:
    return {k: dict(v) for k, v in TINY_MODEL.items()}


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
