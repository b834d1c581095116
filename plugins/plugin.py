"""Registers the built-in language backbones and data pruners."""

from nvila_core import hookimpl
from nvila_core.registry import Registrar
from plugins.deltaloss import DeltaLossConfig, DeltaLossPruner
from plugins.qwen2 import Qwen2LM, Qwen2LMConfig
from plugins.random_pruning import RandomPruner, RandomPrunerConfig


@hookimpl
def nvila_register(registry: Registrar) -> None:
    registry.add("llm", "qwen2", Qwen2LM, Qwen2LMConfig)
    registry.add("pruner", "deltaloss", DeltaLossPruner, DeltaLossConfig)
    registry.add("pruner", "random", RandomPruner, RandomPrunerConfig)
