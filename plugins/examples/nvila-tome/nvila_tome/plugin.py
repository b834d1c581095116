"""The module the ``nvila`` entry point names: registers the ``tome`` compressor."""

from nvila_core import hookimpl
from nvila_core.registry import Registrar

from nvila_tome.merge import TokenMerging, TokenMergingConfig


@hookimpl
def nvila_register(registry: Registrar) -> None:
    registry.add("compressor", "tome", TokenMerging, TokenMergingConfig)
