"""The module the ``nvila`` entry point names: registers the ``tome`` compressor."""

from nvila.core import hookimpl
from nvila.core.registry import Registrar

from nvila_tome.merge import TokenMerging, TokenMergingConfig


@hookimpl
def nvila_register(registry: Registrar) -> None:
    registry.add("compressor", "tome", TokenMerging, TokenMergingConfig)
