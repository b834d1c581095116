"""Registers the built-in language backbones (and, later, pruners)."""

from nvila_core import hookimpl
from nvila_core.registry import Registrar
from plugins.qwen2 import Qwen2LM, Qwen2LMConfig


@hookimpl
def nvila_register(registry: Registrar) -> None:
    registry.add("llm", "qwen2", Qwen2LM, Qwen2LMConfig)
