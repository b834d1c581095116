"""The NVILA model: encoder -> compressor -> projector -> language model, assembled from specs.

Visual tokens replace the image placeholder ids in the language model's input embeddings; the loss
is taken on assistant tokens only (labels are -100 elsewhere). Video frames take the same path, batched,
with the temporal compressor pooling them at the stage its ``where`` names; their tokens replace the
video placeholder ids.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from nvila.core.errors import NvilaError
from nvila.core.interfaces import Calibration, Quantizer, TemporalCompressor
from nvila.core.losses import standard_loss
from nvila.core.processor import IMAGE_TOKEN, VIDEO_TOKEN, NvilaProcessor
from nvila.core.registry import Registry, did_you_mean
from nvila.core.specs import as_dict, build, resolve, to_spec, validate_all


def _slot(kind: str, default: str, doc: str, module: bool = True) -> Any:
    """A ModelSpec field holding a plugin spec of ``kind``; ``module``: the part is a submodule of the model."""
    return field(default_factory=lambda: {"name": default}, metadata={"kind": kind, "module": module, "doc": doc})


@dataclass
class ModelSpec:
    """Everything that rebuilding a model needs: which plugin fills each slot, and its sequence length.

    This is the one list of a model's parts: the Lightning module's arguments, checkpoints, sweeps, the
    planner and the test kit all derive from it. Each slot holds a plugin spec ``{name: ..., ...}``.
    """

    encoder: dict[str, Any] = _slot("encoder", "siglip", "vision encoder spec, e.g. {name: siglip, feature_layer: -2}")
    compressor: dict[str, Any] = _slot("compressor", "stc", "token compressor spec, e.g. {name: stc, ratio: 2}")
    temporal: dict[str, Any] = _slot(
        "temporal", "temporal-average", "temporal compressor spec for video (images never pass through it), "
        "e.g. {name: temporal-average, group: 8}; the default is released NVILA's pooling")
    projector: dict[str, Any] = _slot("projector", "mlp", "projector spec, e.g. {name: mlp}")
    llm: dict[str, Any] = _slot("llm", "qwen2",
                                "language model spec, e.g. {name: qwen2, checkpoint: /path/to/Qwen2-7B}")
    precision: dict[str, Any] = _slot(
        "precision", "fp32", "precision backend spec, e.g. {name: bf16, frozen_in_bf16: true}; how training stores "
        "and computes weights (it sets the Trainer's precision); recorded so that a checkpoint says how it was made",
        module=False)
    quant: dict[str, Any] = field(default_factory=dict, metadata={
        "doc": "inference-time quantization per model part, e.g. {encoder: w8a8, llm: {name: w4a16, method: awq}}; "
               "empty: none. Written by `nvila quantize` for serving; training takes only a W4A16 llm under LoRA "
               "(stages/qlora)"})
    max_length: int = field(default=2048, metadata={"doc": "longest tokenized sample, visual tokens included"})
    image_end: str | None = field(default="\n", metadata={
        "doc": "text whose tokens follow each image's visual tokens, or each tile's when the encoder's tiles are "
               "separate images (dynamic tiles): NVILA's image end tokens, a newline; null for none"})
    tile_end: str | None = field(default=None, metadata={
        "doc": "text whose tokens follow each tile's image_end when an image is cut into separate tiles "
               "(NVILA-Lite: a newline, its prompt writes '<image>\\n' once per tile); null for none"})
    strip_media_newline: bool = field(default=True, metadata={
        "doc": "drop a newline written right after an <image> or <video> placeholder when that medium brings its "
               "own end tokens (image_end, the temporal frame_end), as NVILA's data path does, so that "
               "'<image>\\nWhat?' has exactly one newline after the image"})
    single_image_tiling: bool = field(default=False, metadata={
        "doc": "tile an image only when it is the sample's only image; with several, each becomes one tile at the "
               "base resolution, as NVILA's inference (generate_content) does. false tiles every image"})

    @classmethod
    def slots(cls) -> dict[str, str]:
        """Every plugin slot and its plugin kind: ``{"encoder": "encoder", ..., "precision": "precision"}``."""
        return {f.name: f.metadata["kind"] for f in fields(cls) if "kind" in f.metadata}

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> ModelSpec:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(spec) - set(names))
        if unknown:
            raise NvilaError(f"Unknown model field(s) {unknown}.{did_you_mean(unknown[0], names)} A model spec has: "
                             f"{', '.join(names)}.")
        slots = cls.slots()
        values = {k: as_dict(v) if k in slots else v for k, v in spec.items()}
        if values.get("quant") is not None:
            values["quant"] = {str(part): as_dict(q) for part, q in as_dict(values["quant"]).items()}
        else:
            values.pop("quant", None)
        return cls(**values)

    @classmethod
    def pick(cls, section: Mapping[str, Any]) -> ModelSpec:
        """The spec within a larger mapping, such as a recipe's ``model:`` section (which adds training settings)."""
        names = {f.name for f in fields(cls)}
        return cls.from_dict({k: v for k, v in section.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    def validate(self, registry: Registry | None = None, prefix: str = "") -> None:
        """Check every slot's spec, and each part's quantizer, against its plugin's config; all problems at once."""
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise NvilaError(f"{prefix}max_length must be a whole number of tokens, at least 1; got "
                             f"{self.max_length!r}.")
        _validate({f"{prefix}{slot}": (kind, getattr(self, slot)) for slot, kind in self.slots().items()},
                  self.quant, registry, prefix)


MODEL_PARTS = tuple(f.name for f in fields(ModelSpec) if f.metadata.get("module"))
"""The slots that are submodules of :class:`NvilaModel`, in data-flow order (derived from :class:`ModelSpec`)."""


def _validate(specs: dict[str, tuple[str, Any]], quant: Mapping[str, Any], registry: Registry | None,
              prefix: str) -> None:
    """Slot specs ``{label: (kind, spec)}`` and a ``quant`` mapping ``{part: quantizer spec}``; all problems at once."""
    specs = {**specs, **{f"{prefix}quant.{part}": ("quantizer", q) for part, q in quant.items() if part in MODEL_PARTS}}
    problems = [f"{prefix}quant.{part}: the model has no part '{part}'.{did_you_mean(part, list(MODEL_PARTS))} "
                f"Its parts: {', '.join(MODEL_PARTS)} (the vision tower is 'encoder')."
                for part in quant if part not in MODEL_PARTS]
    try:
        validate_all(specs, registry)
    except NvilaError as exc:
        problems.insert(0, str(exc))
    if problems:
        raise NvilaError("\n".join(problems))


class NvilaModel(nn.Module):
    """A visual language model composed of registered components."""

    def __init__(self, spec: ModelSpec | Mapping[str, Any], registry: Registry | None = None,
                 tokenizer: Any = None) -> None:
        super().__init__()
        self.spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)
        self.spec.validate(registry)
        self.encoder = _build("encoder", self.spec.encoder, registry)
        self.compressor = _build("compressor", self.spec.compressor, registry, in_channels=self.encoder.out_channels)
        self.temporal = _build("temporal", self.spec.temporal, registry)
        if not isinstance(self.temporal, TemporalCompressor):
            raise NvilaError(f"model.temporal: '{self.spec.temporal.get('name')}' is not a TemporalCompressor")
        self.llm = _build("llm", self.spec.llm, registry)
        try:
            self.tokens_per_block, width = self.compressor.output_shape(self.encoder.block_size,
                                                                        self.encoder.out_channels)
        except ValueError as exc:  # a setting that the encoder's feature grid cannot take
            raise NvilaError(f"model.compressor: compressor '{self.spec.compressor.get('name')}': {exc}") from None
        self._token_shape = (self.tokens_per_block, width)
        self._compressor_origin = _origin("compressor", self.spec.compressor, registry)
        self.projector = _build("projector", self.spec.projector, registry, in_dim=width,
                                out_dim=self.llm.hidden_size)
        self.tokenizer = tokenizer if tokenizer is not None else self.llm.load_tokenizer()
        missing = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN) if t not in self.tokenizer.get_vocab()]
        if missing:
            self.tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                              replace_extra_special_tokens=False)
        self.llm.resize_vocab(len(self.tokenizer))
        self.processor = NvilaProcessor(
            self.tokenizer, self.encoder.processor(), self.tokens_per_block, self.spec.max_length,
            frames_out=self.temporal.output_frames, frame_end_ids=self._text_ids(self.temporal.frame_end),
            image_end_ids=self._text_ids(self.spec.image_end), tile_end_ids=self._text_ids(self.spec.tile_end),
            end_per_block=not self.encoder.blocks_form_one_map, strip_media_newline=self.spec.strip_media_newline,
            single_image_tiling=self.spec.single_image_tiling)
        self.image_token_id = self.processor.image_token_id
        self.video_token_id = self.processor.video_token_id
        if self.spec.quant:  # a quantized model: its parts take their quantized form (a checkpoint then fills it)
            quant, self.spec = self.spec.quant, replace(self.spec, quant={})
            self.quantize(quant, registry=registry)

    def quantize(self, quant: Mapping[str, Any], calibrate: Calibration | None = None,
                 registry: Registry | None = None) -> dict[str, list[str]]:
        """Quantize parts in place, ``{part: quantizer spec}`` (e.g. ``{"encoder": "w8a8", "llm": "w4a16"}``), in
        data-flow order; returns the layers quantized per part. Each part's full spec goes into ``spec.quant``,
        so that a checkpoint saved afterwards rebuilds the same quantized model.

        ``calibrate`` runs the model on calibration samples (see :class:`~nvila.core.interfaces.Quantizer`);
        parts quantized earlier in the order already run quantized while later ones calibrate.
        """
        if registry is None:
            from nvila.core.plugins import default_registry

            registry = default_registry()
        quant = {str(part): as_dict(q) for part, q in quant.items()}
        _validate({}, quant, registry, prefix="model.")  # unknown parts and bad specs, all at once
        again = sorted(set(quant) & set(self.spec.quant))
        if again:
            raise NvilaError(f"model.quant: {', '.join(again)} already quantized ({self.spec.quant}); quantize the "
                             "full-precision checkpoint instead.")
        self.spec = replace(self.spec, quant=dict(self.spec.quant))  # the caller's spec object stays as it was
        done = {}
        for part in (p for p in MODEL_PARTS if p in quant):
            component, config = resolve("quantizer", quant[part], registry)
            quantizer = component.factory(config)
            if not isinstance(quantizer, Quantizer):
                raise NvilaError(f"model.quant.{part}: {component.origin} is not a Quantizer")
            try:
                layers = quantizer.quantize(getattr(self, part), calibrate)
            except NvilaError as exc:
                raise NvilaError(f"model.quant.{part}: {exc}") from None
            if not layers:
                raise NvilaError(f"model.quant.{part}: {component.origin} found nothing to quantize in the "
                                 f"{part} ({type(getattr(self, part)).__name__}).")
            self.spec.quant[part] = to_spec(component, config)
            done[part] = layers
        return done

    def _text_ids(self, text: str | None) -> list[int]:
        """Token ids of end text (image_end, tile_end, frame_end), embedded by the language model itself."""
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def visual_tokens(self, pixels: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """Tiles of a batch of images -> their visual tokens in LLM width, image after image: (N, D)."""
        blocks = self.encoder(pixels, grids)  # (M, h, w, C)
        tokens = self._project(self._compress(blocks))  # (M, n, D)
        return self._stitch(tokens, grids)  # (M*n, D)

    def _stitch(self, tokens: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """Visual tokens in LLM order: (M, n, D) -> (M*n, D).

        When an image's blocks are tiles of one map (DynS2) and each block's tokens are a spatial grid, the
        tokens are stitched back into that map and read row by row across it, as NVILA does after its
        projector; otherwise block after block.
        """
        layout = self.compressor.token_grid(self.encoder.block_size)
        if not self.encoder.blocks_form_one_map or layout is None or all(g == (1, 1) for g in grids):
            return tokens.flatten(0, 1)
        th, tw = layout
        out, start = [], 0
        for rows, cols in grids:
            image = tokens[start:start + rows * cols]  # (r*c, th*tw, D)
            image = image.reshape(rows, cols, th, tw, -1).permute(0, 2, 1, 3, 4)  # (r, th, c, tw, D)
            out.append(image.reshape(rows * th * cols * tw, -1))  # (r*th*c*tw, D), row-major over the map
            start += rows * cols
        return torch.cat(out)

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        """The projector, given tokens in the dtype it computes in (a quantized vision tower may compute in another)."""
        return self.projector(tokens.to(_compute_dtype(self.projector, tokens.dtype)))  # (M, n, D)

    def _compress(self, blocks: torch.Tensor) -> torch.Tensor:
        """The spatial compressor, held to the token count its output_shape announced: (M, n, C')."""
        blocks = blocks.to(_compute_dtype(self.compressor, blocks.dtype))
        tokens = self.compressor(blocks)  # (M, n, C')
        if tuple(tokens.shape[1:]) != self._token_shape:  # the placeholders were counted from output_shape
            raise NvilaError(
                f"{self._compressor_origin} broke its shape contract: blocks {tuple(blocks.shape)} became tokens "
                f"{tuple(tokens.shape)}, but its output_shape promised (M, {self._token_shape[0]}, "
                f"{self._token_shape[1]}). Its author can find this with nvila.core.testing.check_distribution.")
        return tokens

    def video_tokens(self, frames: torch.Tensor, video_grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Tiles of every frame of a batch of videos -> their visual tokens in LLM width, video after
        video, kept frame after kept frame: (N, D). All frames run through the encoder in one batch."""
        blocks = self.encoder(frames, [(r, c) for f, r, c in video_grids for _ in range(f)])  # (sum F*r*c, h, w, C)
        where = self.temporal.where
        if where == "after-encoder":
            blocks = self.pool_frames(blocks, video_grids)  # (sum F'*r*c, h, w, C)
        tokens = self._compress(blocks)  # (M, n, C')
        if where == "after-compressor":
            tokens = self.pool_frames(tokens, video_grids)  # (sum F'*r*c, n, C')
        tokens = self._project(tokens)  # (M, n, D)
        if where == "after-projector":
            tokens = self.pool_frames(tokens, video_grids)  # (sum F'*r*c, n, D)
        return tokens.flatten(0, 1)  # (sum F'*r*c*n, D)

    def pool_frames(self, x: torch.Tensor, video_grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """(sum F*r*c, ...) per-frame blocks of several videos -> (sum F'*r*c, ...), each video pooled alone."""
        pooled = []
        for video, (f, r, c) in zip(x.split([f * r * c for f, r, c in video_grids]), video_grids):
            frames = video.unflatten(0, (f, r * c))  # (F, r*c, ...)
            pooled.append(self.temporal(frames).flatten(0, 1))  # (F'*r*c, ...)
        return torch.cat(pooled)

    def embed(self, input_ids: torch.Tensor, pixels: torch.Tensor | None,
              grids: list[tuple[int, int]], videos: torch.Tensor | None = None,
              video_grids: list[tuple[int, int, int]] | None = None) -> torch.Tensor:
        """Token embeddings with visual tokens spliced in at the placeholders: (B, L, D)."""
        embeds = self.llm.embed(input_ids)  # (B, L, D)
        media = (("image", self.image_token_id, pixels, lambda: self.visual_tokens(pixels, grids)),
                 ("video", self.video_token_id, videos, lambda: self.video_tokens(videos, video_grids or [])))
        for kind, token_id, inputs, encode in media:
            slots = input_ids == token_id  # (B, L)
            n_slots = int(slots.sum())
            if inputs is None:
                if n_slots:
                    raise ValueError(f"{n_slots} {kind} placeholder tokens but no {kind} pixels")
                continue
            visual = encode().to(embeds.dtype)  # (N, D)
            if visual.shape[0] != n_slots:
                raise ValueError(f"{visual.shape[0]} {kind} tokens for {n_slots} placeholder slots")
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), visual)
        return embeds

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      pixels: torch.Tensor | None = None, grids: list[tuple[int, int]] | None = None,
                      position_ids: torch.Tensor | None = None, videos: torch.Tensor | None = None,
                      video_grids: list[tuple[int, int, int]] | None = None) -> torch.Tensor:
        """The language model's last hidden states, before the output layer: (B, L, D).

        Memory-lean training objectives (``nvila.workflows.objectives``) take these instead of full logits.
        """
        embeds, attention_mask = self._inputs(input_ids, attention_mask, pixels, grids, videos, video_grids)
        return self.llm.hidden_states(embeds, attention_mask=attention_mask, position_ids=position_ids)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                pixels: torch.Tensor | None = None, grids: list[tuple[int, int]] | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                videos: torch.Tensor | None = None,
                video_grids: list[tuple[int, int, int]] | None = None) -> dict[str, torch.Tensor]:
        """Logits and, with labels, the mean next-token cross-entropy over supervised tokens.

        ``attention_mask`` is (B, L) for padded batches, or (B, 1, L, L) additive for packed ones, which also
        pass ``position_ids`` (B, L) restarting at each packed sample (see ``nvila.core.data.packing``).
        """
        embeds, attention_mask = self._inputs(input_ids, attention_mask, pixels, grids, videos, video_grids)
        logits = self.llm(embeds, attention_mask=attention_mask, position_ids=position_ids)  # (B, L, V)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = standard_loss(logits, labels)
        return out

    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pixels: torch.Tensor | None,
                grids: list[tuple[int, int]] | None, videos: torch.Tensor | None,
                video_grids: list[tuple[int, int, int]] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds = self.embed(input_ids, pixels, grids or [], videos, video_grids)
        if attention_mask is not None and attention_mask.ndim == 4 and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(embeds.dtype)  # SDPA wants the query's dtype
        return embeds, attention_mask

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixels: torch.Tensor | None,
                 grids: list[tuple[int, int]], max_new_tokens: int = 16, videos: torch.Tensor | None = None,
                 video_grids: list[tuple[int, int, int]] | None = None, **kwargs: Any) -> torch.Tensor:
        """New token ids (B, <=max_new_tokens) for left-padded prompts, padded after EOS; greedy unless
        ``kwargs`` (``DecodingConfig`` fields: temperature, top_p, seed, stop) say otherwise.

        A thin wrapper over :class:`nvila.core.engine.Engine`, which also streams, batches chat requests and
        reports finish reasons and timings: use the engine in new code.
        """
        from nvila.core.engine import DecodingConfig, Engine

        engine = Engine(self)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixels": pixels, "grids": grids,
                  "videos": videos, "video_grids": video_grids}
        done = engine.generate_inputs(inputs, DecodingConfig(max_new_tokens=max_new_tokens, **kwargs))
        out = input_ids.new_full((len(done), max(len(c.token_ids) for c in done)), engine.pad_token_id)
        for row, completion in zip(out, done):
            row[:len(completion.token_ids)] = torch.tensor(completion.token_ids)
        return out

    def fsdp_wrap_modules(self) -> set[type[nn.Module]]:
        return self.encoder.fsdp_wrap_modules() | self.llm.fsdp_wrap_modules()


def _build(slot: str, spec: dict[str, Any], registry: Registry | None, **kwargs: Any) -> Any:
    """``build`` for a model slot, with a component's own failure to construct (a negative size, a width
    too large to allocate) reported as one line naming the slot and the spec, not as a traceback."""
    try:
        return build(slot, spec, registry, **kwargs)
    except NvilaError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError, ZeroDivisionError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise NvilaError(f"model.{slot}: {slot} '{spec.get('name')}' cannot be built from {spec}: "
                         f"{type(exc).__name__}: {detail}. Check its sizes (`nvila plugins --describe "
                         f"{spec.get('name')}` lists its fields).") from None


def _compute_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of a part's first floating-point parameter (``default`` for a part without one)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), default)


def _origin(kind: str, spec: dict[str, Any], registry: Registry | None) -> str:
    """``compressor 'stc' from nvila 0.1.0``: which distribution built a part, for error messages."""
    if registry is None:
        from nvila.core.plugins import default_registry

        registry = default_registry()
    return registry.get(kind, spec["name"]).origin
