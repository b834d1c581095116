"""Qwen2 language backbone (transformers' ``Qwen2ForCausalLM``).

Defaults build a tiny random-initialised model that uses the small BPE tokenizer shipped in
``plugins/assets/tiny-tokenizer`` (trained offline by ``scripts/train_tiny_tokenizer.py``).
``checkpoint`` loads real weights and their tokenizer from a local Hugging Face directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import torch
from transformers import AutoTokenizer, DynamicCache, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from nvila.core.errors import NvilaError
from nvila.core.interfaces import LanguageModel

TINY_TOKENIZER = str(files("nvila.plugins") / "assets" / "tiny-tokenizer")


@dataclass
class Qwen2LMConfig:
    """Qwen2 backbone settings; architecture fields are ignored when ``checkpoint`` is set."""

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
    """Attention kernel: 'sdpa' (default, any device), 'eager', or 'flash_attention_2' (GPU, flash-attn)."""
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


class Qwen2LM(LanguageModel):
    """A Qwen2 causal LM that takes input embeddings, so visual tokens can be spliced in."""

    def __init__(self, config: Qwen2LMConfig) -> None:
        super().__init__()
        self.config = config
        if config.checkpoint:
            try:
                self.model = Qwen2ForCausalLM.from_pretrained(
                    config.checkpoint, attn_implementation=config.attn_implementation, local_files_only=True)
            except OSError as exc:
                raise NvilaError(f"Cannot load Qwen2 weights from '{config.checkpoint}': {exc}. Point "
                                 "`checkpoint` at a local directory with config.json and *.safetensors.") from None
        else:
            hf = Qwen2Config(
                vocab_size=max(len(self.load_tokenizer()), config.vocab_size or 0), hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                max_position_embeddings=config.max_position_embeddings,
                tie_word_embeddings=config.tie_word_embeddings, rope_theta=config.rope_theta,
                rms_norm_eps=config.rms_norm_eps)
            hf._attn_implementation = config.attn_implementation
            self.model = Qwen2ForCausalLM(hf)
        self.hidden_size = self.model.config.hidden_size

    def load_tokenizer(self) -> Any:
        source = self.config.tokenizer or self.config.checkpoint or TINY_TOKENIZER
        try:
            return AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise NvilaError(f"Cannot load a tokenizer from '{source}': {exc}") from None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=False)
        return out.logits

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        out = self.model.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                       position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def output_layer(self) -> torch.nn.Linear:
        return self.model.get_output_embeddings()

    def enable_gradient_checkpointing(self) -> None:
        self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def lora_target_modules(self) -> list[str]:
        return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def forward_with_cache(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                           position_ids: torch.Tensor, cache: Any = None,
                           last_only: bool = True) -> tuple[torch.Tensor, Any]:
        if cache is None:
            cache = DynamicCache(config=self.model.config)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True, logits_to_keep=1 if last_only else 0)
        return out.logits, out.cache  # (B, 1 or L, V); the cache now holds past + L tokens

    def resize_vocab(self, size: int) -> None:
        if size > self.model.get_input_embeddings().num_embeddings:
            self.model.resize_token_embeddings(size, mean_resizing=False)

    def fsdp_wrap_modules(self) -> set[type[torch.nn.Module]]:
        return {Qwen2DecoderLayer}
