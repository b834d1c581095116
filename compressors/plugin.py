"""Registers the built-in compressors (spatial and temporal) and projectors."""

from nvila.compressors.avg_pool import AveragePool, AvgPoolConfig
from nvila.compressors.identity import IdentityCompressor, IdentityConfig
from nvila.compressors.perceiver import PerceiverConfig, PerceiverResampler
from nvila.compressors.projector import (
    LinearProjectorConfig,
    MLP3x3ProjectorConfig,
    MLPProjectorConfig,
    linear_projector,
    mlp_3x3_projector,
    mlp_projector,
)
from nvila.compressors.stc import SpatialToChannel, STCConfig
from nvila.compressors.temporal import TemporalAverage, TemporalAverageConfig
from nvila.compressors.tokenlearner import TokenLearner, TokenLearnerConfig
from nvila.core import hookimpl
from nvila.core.registry import Registrar


@hookimpl
def nvila_register(registry: Registrar) -> None:
    registry.add("compressor", "stc", SpatialToChannel, STCConfig)
    registry.add("compressor", "identity", IdentityCompressor, IdentityConfig)
    registry.add("compressor", "avg-pool", AveragePool, AvgPoolConfig)
    registry.add("compressor", "tokenlearner", TokenLearner, TokenLearnerConfig)
    registry.add("compressor", "perceiver", PerceiverResampler, PerceiverConfig)
    registry.add("temporal", "temporal-average", TemporalAverage, TemporalAverageConfig)
    registry.add("projector", "mlp", mlp_projector, MLPProjectorConfig)
    registry.add("projector", "mlp-3x3", mlp_3x3_projector, MLP3x3ProjectorConfig)
    registry.add("projector", "linear", linear_projector, LinearProjectorConfig)
