"""Registers the built-in compressors (spatial and temporal) and projectors.

Each factory is registered lazily, by module and name, and imported when a model first builds it: listing and
describing components (``nvila plugins``) then reads only the torch-free configs.
"""

from nvila.compressors.configs import (
    AvgPoolConfig,
    IdentityConfig,
    LinearProjectorConfig,
    MLP3x3ProjectorConfig,
    MLPProjectorConfig,
    PerceiverConfig,
    STCConfig,
    TemporalAverageConfig,
    TokenLearnerConfig,
)
from nvila.core import hookimpl
from nvila.core.registry import Registrar, lazy


@hookimpl
def nvila_register(registry: Registrar) -> None:
    registry.add("compressor", "stc", lazy("nvila.compressors.stc", "SpatialToChannel"), STCConfig)
    registry.add("compressor", "identity", lazy("nvila.compressors.identity", "IdentityCompressor"), IdentityConfig)
    registry.add("compressor", "avg-pool", lazy("nvila.compressors.avg_pool", "AveragePool"), AvgPoolConfig)
    registry.add("compressor", "tokenlearner", lazy("nvila.compressors.tokenlearner", "TokenLearner"),
                 TokenLearnerConfig)
    registry.add("compressor", "perceiver", lazy("nvila.compressors.perceiver", "PerceiverResampler"),
                 PerceiverConfig)
    registry.add("temporal", "temporal-average", lazy("nvila.compressors.temporal", "TemporalAverage"),
                 TemporalAverageConfig)
    registry.add("projector", "mlp", lazy("nvila.compressors.projector", "mlp_projector"), MLPProjectorConfig)
    registry.add("projector", "mlp-3x3", lazy("nvila.compressors.projector", "mlp_3x3_projector"),
                 MLP3x3ProjectorConfig)
    registry.add("projector", "linear", lazy("nvila.compressors.projector", "linear_projector"),
                 LinearProjectorConfig)
