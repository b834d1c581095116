"""Tiny released-layout checkpoints for tests, written by scripts/write_tiny_released.py (the repository's script)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "write_tiny_released.py"


def writer():
    """The script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("write_tiny_released", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_released(out: Path, variant: str, seed: int = 0) -> Path:
    return writer().write_released(out, variant, seed)
