"""Qwen2 language backbone (transformers' ``Qwen2ForCausalLM``).

Defaults build a tiny random-initialised model that uses the small BPE tokenizer shipped in
``plugins/assets/tiny-tokenizer`` (trained offline by ``scripts/train_tiny_tokenizer.py``).
``checkpoint`` loads real weights and their tokenizer from a local Hugging Face directory.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import torch
from transformers import AutoTokenizer, DynamicCache, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from nvila.core import kv_cache
from nvila.core.errors import NvilaError
from nvila.core.interfaces import LanguageModel
from nvila.plugins import attention
from nvila.plugins.configs import Qwen2LMConfig

TINY_TOKENIZER = str(files("nvila.plugins") / "assets" / "tiny-tokenizer")


class Qwen2LM(LanguageModel):
    """A Qwen2 causal LM that takes input embeddings, so visual tokens can be spliced in."""

    def __init__(self, config: Qwen2LMConfig) -> None:
        super().__init__()
        self.config = config
        implementation = attention.register() if config.attn_implementation == "sdpa" else config.attn_implementation
        if config.checkpoint:
            try:
                self.model = Qwen2ForCausalLM.from_pretrained(
                    config.checkpoint, attn_implementation=implementation, local_files_only=True)
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
            hf._attn_implementation = implementation
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
            cache = kv_cache.growing(DynamicCache(config=self.model.config))
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True, logits_to_keep=1 if last_only else 0)
        return out.logits, out.cache  # (B, 1 or L, V); the cache now holds past + L tokens

    def resize_vocab(self, size: int) -> None:
        if size > self.model.get_input_embeddings().num_embeddings:
            self.model.resize_token_embeddings(size, mean_resizing=False)

    def fsdp_wrap_modules(self) -> set[type[torch.nn.Module]]:
        return {Qwen2DecoderLayer}
