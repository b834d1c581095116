"""Every torchao import in one place: its APIs moved between 0.12 and 0.18 (we pin 0.18.*)."""

from __future__ import annotations

from torchao.float8 import Float8LinearConfig, convert_to_float8_training

__all__ = ["Float8LinearConfig", "convert_to_float8_training"]
