"""The configs of the built-in language backbones and data pruners.

They live here, apart from the torch and transformers code they configure, so that ``nvila plugins`` lists and
describes every component without importing torch. Each config's docstring opens with the line ``nvila plugins``
shows; each component module re-exports its config (``from nvila.plugins.qwen2 import Qwen2LMConfig`` works).
"""

from __future__ import annotations

from dataclasses import dataclass

REDUCTIONS = ("mean", "sum")
"""How DeltaLoss combines the answer tokens' losses."""


@dataclass
class Qwen2LMConfig:
    """A Qwen2 causal LM that takes input embeddings, so visual tokens can be spliced in.

    Architecture fields are ignored when ``checkpoint`` is set."""

    checkpoint: str | None = None
    """Local Hugging Face directory with Qwen2 weights and tokenizer; None builds a random-initialised model."""
    tokenizer: str | None = None
    """Local tokenizer directory; None uses the checkpoint's, or the shipped tiny tokenizer."""
    hidden_size: int = 128
    """Model width D (Qwen2-7B: 3584)."""
    intermediate_size: int = 256
    """MLP width (Qwen2-7B: 18944)."""
    num_layers: int = 2
    """Decoder layers (Qwen2-7B: 28)."""
    num_heads: int = 4
    """Attention heads (Qwen2-7B: 28)."""
    num_kv_heads: int = 2
    """Key/value heads for grouped-query attention (Qwen2-7B: 4)."""
    max_position_embeddings: int = 2048
    """Longest sequence the rotary embedding is configured for."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the output layer (small Qwen2 models do)."""
    vocab_size: int | None = None
    """Embedding rows of a random-initialised model, at least the tokenizer's size (None: exactly that). Presets
    of released models set the real size (Qwen2-7B: 152,064; Qwen2-1.5B: 151,936), so cost plans are real."""
    attn_implementation: str = "sdpa"
    """Attention kernel: 'sdpa' (default, any device; decoding steps on CPUs run nvila's kernel, or two matmuls
    without AVX-512, far faster than torch's SDPA kernel there: ``nvila.plugins.attention``), 'eager', or
    'flash_attention_2' (GPU, flash-attn)."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding (Qwen2 and Qwen2.5 releases: 1,000,000)."""
    rms_norm_eps: float = 1e-6
    """Epsilon of the RMS norms."""

    def __post_init__(self) -> None:
        if self.checkpoint is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.checkpoint is None and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")


@dataclass
class DeltaLossConfig:
    """Score = small model's answer loss - large model's (the log-probability ratio large / small)."""

    reduction: str = "mean"
    """How answer tokens combine: 'mean' (per-token log-ratio; long answers do not dominate) or 'sum' (the
    log-ratio of the whole answer's probabilities, log p_large(answer) - log p_small(answer))."""

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {self.reduction!r}")


@dataclass
class RandomPrunerConfig:
    """Uniform random scores from a hash of (seed, sample id): reproducible, independent of batching."""

    seed: int = 0
    """Seed of the per-sample draws: a sample's score depends only on the seed and its id."""
