"""Registers the built-in language backbones and data pruners."""

from nvila.core import hookimpl
from nvila.core.registry import Registrar
from nvila.plugins.deltaloss import DeltaLossConfig, DeltaLossPruner
from nvila.plugins.qwen2 import Qwen2LM, Qwen2LMConfig
from nvila.plugins.random_pruning import RandomPruner, RandomPrunerConfig


@hookimpl
def nvila_register(registry: Registrar) -> None:
    registry.add("llm", "qwen2", Qwen2LM, Qwen2LMConfig)
    registry.add("pruner", "deltaloss", DeltaLossPruner, DeltaLossConfig)
    registry.add("pruner", "random", RandomPruner, RandomPrunerConfig)
