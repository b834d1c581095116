"""The module the ``nvila`` entry point names: it registers this package's components."""

from nvila.core import hookimpl
from nvila.core.registry import Registrar

from nvila_myplugin.pool import AveragePool, AveragePoolConfig


@hookimpl
def nvila_register(registry: Registrar) -> None:
    # kind, registry name (kebab-case, unique across every installed package), factory, config dataclass
    registry.add("compressor", "my-pool", AveragePool, AveragePoolConfig)
