"""The configs of the built-in compressors, temporal compressors and projectors.

They live here, apart from the torch modules they configure, so that ``nvila plugins`` lists and describes
every component without importing torch. Each config's docstring opens with the line ``nvila plugins``
shows; each component module re-exports its config (``from nvila.compressors.stc import STCConfig`` works).
"""

from __future__ import annotations

from dataclasses import dataclass

from nvila.compressors.grid import check_ratio
from nvila.core.registry import TEMPORAL_STAGES


@dataclass
class AvgPoolConfig:
    """k x k mean pooling of each feature block; no parameters."""

    ratio: int = 2
    """Side k of the square neighbourhood averaged into one token; 1..(smaller side of the feature grid)."""

    def __post_init__(self) -> None:
        check_ratio(self.ratio)


@dataclass
class IdentityConfig:
    """Flattens each block's grid into tokens, unchanged; no parameters."""


@dataclass
class PerceiverConfig:
    """K learned latents, refined by a few cross-attention layers over each block's features."""

    num_latents: int = 8
    """K, the learned latents (output tokens) per feature block; 1..4096."""
    depth: int = 2
    """Cross-attention layers; 1..64."""
    heads: int = 4
    """Attention heads; 1..128."""
    head_dim: int = 32
    """Width of each head (the attention's inner width is heads x head_dim); 1..1024."""
    ff_mult: int = 2
    """Feed-forward width as a multiple of the feature width C; 1..16."""

    def __post_init__(self) -> None:
        for key, high in (("num_latents", 4096), ("depth", 64), ("heads", 128), ("head_dim", 1024),
                          ("ff_mult", 16)):
            value = getattr(self, key)
            if not 1 <= value <= high:
                raise ValueError(f"key '{key}' = {value} is out of range; valid range 1..{high}")


@dataclass
class MLPProjectorConfig:
    """NVILA's 2x2 projector: LayerNorm(C') -> Linear(C', D) -> GELU -> Linear(D, D)."""

    layer_norm: bool = True
    """Normalise the incoming tokens first (NVILA: yes, the STC output is un-normalised)."""


@dataclass
class LinearProjectorConfig:
    """A single linear map (LLaVA-1's projector)."""

    bias: bool = True
    """Add a bias term."""


@dataclass
class MLP3x3ProjectorConfig:
    """NVILA's 3x3 projector (``mlp_downsample_3x3_fix``), for STC with ratio 3.

    LayerNorm(9C) -> Linear(9C, 3C) -> GELU -> LayerNorm(3C) -> Linear(3C, D) -> GELU -> Linear(D, D)."""

    reduction: int = 3
    """The first Linear narrows the incoming width by this factor (NVILA: 3, from 9C to 3C); 1..in_dim."""

    def __post_init__(self) -> None:
        if self.reduction < 1:
            raise ValueError(f"key 'reduction' = {self.reduction} is out of range; valid range 1..(incoming width)")


@dataclass
class STCConfig:
    """k x k spatial-to-channel reshape (NVILA's compressor); no parameters."""

    ratio: int = 2
    """Side k of the square block merged into one token (NVILA: 2, or 3 with the ``mlp-3x3`` projector);
    1..(smaller side of the feature grid)."""

    def __post_init__(self) -> None:
        check_ratio(self.ratio)


@dataclass
class TemporalAverageConfig:
    """Mean over consecutive groups of g frames, position by position; no parameters.

    The defaults are released NVILA's."""

    group: int = 8
    """g, consecutive frames averaged into one (NVILA: 8); 1 (no pooling)..frames."""
    where: str = "after-projector"
    """Stage it pools: after-encoder, after-compressor or after-projector (NVILA)."""
    frame_end: str | None = "\n"
    """Text whose token embeddings end each pooled frame (NVILA: a newline); None for nothing."""
    frames: int | None = None
    """Frames sampled per video (NVILA: 256), when fixed: ``group`` is then checked against it as soon as
    the spec is read. None checks nothing up front; each video is pooled as it comes."""

    def __post_init__(self) -> None:
        if self.where not in TEMPORAL_STAGES:
            raise ValueError(f"key 'where' = {self.where!r} is not a stage; choose one of {', '.join(TEMPORAL_STAGES)}")
        if self.frames is not None and self.frames < 1:
            raise ValueError(f"key 'frames' = {self.frames} is out of range; valid range 1.. (or null)")
        top = self.frames if self.frames is not None else "frames per video"
        if self.group < 1:
            raise ValueError(f"key 'group' = {self.group} is out of range; valid range 1..{top}")
        if self.frames is not None and self.group > self.frames:
            raise ValueError(f"key 'group' = {self.group} is larger than the {self.frames} frames per video "
                             f"(key 'frames'); valid range 1..{self.frames}")


@dataclass
class TokenLearnerConfig:
    """K spatial attention maps -> K tokens of width C per block."""

    num_tokens: int = 8
    """K, the tokens (attention maps) per feature block; 1..4096."""
    hidden: int = 64
    """Width of the MLP that scores positions; 1..65536."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_tokens <= 4096:
            raise ValueError(f"key 'num_tokens' = {self.num_tokens} is out of range; valid range 1..4096")
        if not 1 <= self.hidden <= 65536:
            raise ValueError(f"key 'hidden' = {self.hidden} is out of range; valid range 1..65536")
