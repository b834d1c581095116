"""The NVILA model: encoder -> compressor -> projector -> language model, assembled from specs.

Visual tokens replace the image placeholder ids in the language model's input embeddings; the loss
is taken on assistant tokens only (labels are -100 elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nvila_core.errors import NvilaError
from nvila_core.losses import LOSSES, chunked_loss, fused_loss, standard_loss
from nvila_core.processor import IMAGE_TOKEN, NvilaProcessor
from nvila_core.registry import Registry
from nvila_core.specs import as_dict, build, validate_all

MODEL_PARTS = ("encoder", "compressor", "projector", "llm")


@dataclass
class ModelSpec:
    """Which component fills each slot of the model; each value is a plugin spec ``{name: ..., ...}``."""

    encoder: dict[str, Any] = field(default_factory=lambda: {"name": "siglip"})
    compressor: dict[str, Any] = field(default_factory=lambda: {"name": "stc"})
    projector: dict[str, Any] = field(default_factory=lambda: {"name": "mlp"})
    llm: dict[str, Any] = field(default_factory=lambda: {"name": "qwen2"})

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> ModelSpec:
        unknown = sorted(set(spec) - set(MODEL_PARTS))
        if unknown:
            raise NvilaError(f"Unknown model part(s) {unknown}; a model spec has: {', '.join(MODEL_PARTS)}.")
        return cls(**{k: as_dict(v) for k, v in spec.items()})

    def to_dict(self) -> dict[str, Any]:
        return {k: dict(getattr(self, k)) for k in MODEL_PARTS}


class NvilaModel(nn.Module):
    """A visual language model composed of registered components."""

    def __init__(self, spec: ModelSpec | dict[str, Any], registry: Registry | None = None,
                 tokenizer: Any = None, max_length: int = 2048) -> None:
        super().__init__()
        self.spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)
        validate_all({part: (part, getattr(self.spec, part)) for part in MODEL_PARTS}, registry)
        self.encoder = build("encoder", self.spec.encoder, registry)
        self.compressor = build("compressor", self.spec.compressor, registry, in_channels=self.encoder.out_channels)
        self.llm = build("llm", self.spec.llm, registry)
        self.tokens_per_block, width = self.compressor.output_shape(self.encoder.block_size,
                                                                    self.encoder.out_channels)
        self._token_shape = (self.tokens_per_block, width)
        self._compressor_origin = _origin("compressor", self.spec.compressor, registry)
        self.projector = build("projector", self.spec.projector, registry, in_dim=width,
                               out_dim=self.llm.hidden_size)
        self.tokenizer = tokenizer if tokenizer is not None else self.llm.load_tokenizer()
        if IMAGE_TOKEN not in self.tokenizer.get_vocab():
            self.tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        self.llm.resize_vocab(len(self.tokenizer))
        self.processor = NvilaProcessor(self.tokenizer, self.encoder.processor(), self.tokens_per_block,
                                        max_length)
        self.image_token_id = self.processor.image_token_id

    def visual_tokens(self, pixels: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """Tiles of a batch of images -> their visual tokens in LLM width, image after image: (N, D)."""
        blocks = self.encoder(pixels, grids)  # (M, h, w, C)
        tokens = self.compressor(blocks)  # (M, n, C')
        if tuple(tokens.shape[1:]) != self._token_shape:  # the placeholders were counted from output_shape
            raise NvilaError(
                f"{self._compressor_origin} broke its shape contract: blocks {tuple(blocks.shape)} became tokens "
                f"{tuple(tokens.shape)}, but its output_shape promised (M, {self._token_shape[0]}, "
                f"{self._token_shape[1]}). Its author can find this with nvila_core.testing.check_distribution.")
        return self.projector(tokens).flatten(0, 1)  # (M*n, D)

    def embed(self, input_ids: torch.Tensor, pixels: torch.Tensor | None,
              grids: list[tuple[int, int]]) -> torch.Tensor:
        """Token embeddings with visual tokens spliced in at the placeholders: (B, L, D)."""
        embeds = self.llm.embed(input_ids)  # (B, L, D)
        slots = input_ids == self.image_token_id  # (B, L)
        n_slots = int(slots.sum())
        if pixels is None:
            if n_slots:
                raise ValueError(f"{n_slots} image placeholder tokens but no pixels")
            return embeds
        visual = self.visual_tokens(pixels, grids).to(embeds.dtype)  # (N, D)
        if visual.shape[0] != n_slots:
            raise ValueError(f"{visual.shape[0]} visual tokens for {n_slots} placeholder slots")
        return embeds.masked_scatter(slots.unsqueeze(-1), visual)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixels: torch.Tensor | None = None, grids: list[tuple[int, int]] | None = None,
                labels: torch.Tensor | None = None, loss: str = "standard",
                loss_chunk_size: int = 1024, position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Logits and (with labels) the loss; ``loss`` 'chunked' or 'fused' skip the full logits tensor.

        ``attention_mask`` is (B, L) for padded batches, or (B, 1, L, L) additive for packed ones, which also
        pass ``position_ids`` (B, L) restarting at each packed sample (see ``nvila_core.data.packing``).
        """
        embeds = self.embed(input_ids, pixels, grids or [])
        if attention_mask is not None and attention_mask.ndim == 4 and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(embeds.dtype)  # SDPA wants the query's dtype
        if labels is not None and loss != "standard":
            hidden = self.llm.hidden_states(embeds, attention_mask=attention_mask,
                                            position_ids=position_ids)  # (B, L, D)
            if loss == "chunked":
                return {"loss": chunked_loss(hidden, self.llm.output_layer(), labels, loss_chunk_size)}
            if loss == "fused":
                return {"loss": fused_loss(hidden, self.llm.output_layer(), labels)}
            raise NvilaError(f"Unknown loss '{loss}'; choose one of {', '.join(LOSSES)}.")
        logits = self.llm(embeds, attention_mask=attention_mask, position_ids=position_ids)  # (B, L, V)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = standard_loss(logits, labels)
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixels: torch.Tensor | None,
                 grids: list[tuple[int, int]], max_new_tokens: int = 16, **kwargs: Any) -> torch.Tensor:
        """New token ids for left-padded prompts (greedy unless sampling kwargs are given)."""
        embeds = self.embed(input_ids, pixels, grids)
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        return self.llm.generate(embeds, attention_mask, max_new_tokens=max_new_tokens, **kwargs)

    def fsdp_wrap_modules(self) -> set[type[nn.Module]]:
        return self.encoder.fsdp_wrap_modules() | self.llm.fsdp_wrap_modules()


def _origin(kind: str, spec: dict[str, Any], registry: Registry | None) -> str:
    """``compressor 'stc' from nvila 0.1.0``: which distribution built a part, for error messages."""
    if registry is None:
        from nvila_core.plugins import default_registry

        registry = default_registry()
    return registry.get(kind, spec["name"]).origin
