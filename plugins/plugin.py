"""Registers the built-in language backbones and data pruners.

Each factory is registered lazily, by module and name, and imported when it is first built: listing and
describing components (``nvila plugins``) then reads only the torch-free configs.
"""

from nvila.core import hookimpl
from nvila.core.registry import Registrar, lazy
from nvila.plugins.configs import DeltaLossConfig, Qwen2LMConfig, RandomPrunerConfig


@hookimpl
def nvila_register(registry: Registrar) -> None:
    registry.add("llm", "qwen2", lazy("nvila.plugins.qwen2", "Qwen2LM"), Qwen2LMConfig)
    registry.add("pruner", "deltaloss", lazy("nvila.plugins.deltaloss", "DeltaLossPruner"), DeltaLossConfig)
    registry.add("pruner", "random", lazy("nvila.plugins.random_pruning", "RandomPruner"), RandomPrunerConfig)
