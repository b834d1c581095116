"""How the suites build what they measure: the three places where the benchmarks meet the model and recipe APIs.

Every suite builds its Lightning modules, its bare models and the demo recipe's model parts through these
functions and nothing else, so a change to those APIs (for example ``NvilaModule`` taking a ``ModelSpec``
and typed training settings) is adapted here once.
"""

from __future__ import annotations

from typing import Any


def build_module(section: dict[str, Any]) -> Any:
    """An ``NvilaModule`` from a flat ``model:`` recipe section: the parts' specs (``encoder``, ``llm``, ...)
    and the module's settings (``precision``, ``peft``, ``loss``, ``gradient_checkpointing``, ``max_length``...)."""
    from nvila.workflows.module import build_module as build

    return build(**section)


def build_model(parts: dict[str, Any], max_length: int) -> Any:
    """An ``NvilaModel`` (no training wrapper) from the parts' specs."""
    from nvila.core.model import NvilaModel

    return NvilaModel({**parts, "max_length": max_length})


def demo_parts() -> dict[str, Any]:
    """The demo recipe's model parts (``encoder``, ``compressor``, ``projector``, ``llm``...)."""
    from nvila.core.model import MODEL_PARTS

    spec = _demo_spec()
    return {part: getattr(spec, part) for part in MODEL_PARTS}


def demo_model_spec() -> dict[str, Any]:
    """The demo recipe's model spec as an ``NvilaModel`` takes it: its parts and its ``max_length``."""
    return {**demo_parts(), "max_length": _demo_spec().max_length}


def _demo_spec() -> Any:
    from nvila.workflows.cli import model_spec, read_recipe

    return model_spec(read_recipe(["--config", "demo"]))
