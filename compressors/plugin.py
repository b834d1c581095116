"""Registers the built-in compressors and projectors."""

from compressors.identity import IdentityCompressor, IdentityConfig
from compressors.projector import LinearProjectorConfig, MLPProjectorConfig, linear_projector, mlp_projector
from compressors.stc import SpatialToChannel, STCConfig
from nvila_core import hookimpl
from nvila_core.registry import Registrar


@hookimpl
def nvila_register(registry: Registrar) -> None:
    registry.add("compressor", "stc", SpatialToChannel, STCConfig)
    registry.add("compressor", "identity", IdentityCompressor, IdentityConfig)
    registry.add("projector", "mlp", mlp_projector, MLPProjectorConfig)
    registry.add("projector", "linear", linear_projector, LinearProjectorConfig)
