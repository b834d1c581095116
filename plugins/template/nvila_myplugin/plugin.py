"""The module the ``nvila`` entry point names: it registers this package's components.

It imports no torch: the factory is named by module and attribute with ``lazy`` and imported only when a model
first builds it, so `nvila plugins` stays quick. ``registry.add(kind, name, AveragePool, AveragePoolConfig)``,
with the class itself, works too, at the cost of importing `pool.py` (and torch) whenever nvila lists plugins.
"""

from nvila.core import hookimpl
from nvila.core.registry import Registrar, lazy

from nvila_myplugin.configs import AveragePoolConfig


@hookimpl
def nvila_register(registry: Registrar) -> None:
    # kind, registry name (kebab-case, unique across every installed package), factory, config dataclass
    registry.add("compressor", "my-pool", lazy("nvila_myplugin.pool", "AveragePool"), AveragePoolConfig)
