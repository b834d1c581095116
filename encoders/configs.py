"""The configs of the built-in vision encoders, and the checks they share.

They live here, apart from the torch, transformers and timm code they configure, so that ``nvila plugins``
lists and describes every component without importing torch. Each config's docstring opens with the line
``nvila plugins`` shows; each component module re-exports its config (``from nvila.encoders.siglip import
SiglipConfig`` works).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from nvila.core.errors import NvilaError
from nvila.core.specs import as_dict

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
"""Pillow's own decompression-bomb threshold (about 89.5 megapixels): a sane default pixel limit."""

ALPHA_MODES = ("white", "drop")
"""How transparent pixels become RGB: composited onto white (nvila), or the alpha channel dropped (NVILA)."""


def check_decoding(alpha: str, max_pixels: int) -> None:
    """Validate an encoder config's decoding settings (ValueError naming the key)."""
    if alpha not in ALPHA_MODES:
        raise ValueError(f"key 'alpha' = {alpha!r} is not one of {', '.join(ALPHA_MODES)}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")


def check_scales(scales: list[int]) -> None:
    """Scales must be positive, strictly increasing, and multiples of the smallest."""
    if not scales:
        raise ValueError("scales is empty; give at least one image side in pixels, e.g. [448, 896, 1344]")
    if any(s <= 0 for s in scales) or any(a >= b for a, b in zip(scales, scales[1:])):
        raise ValueError(f"scales {list(scales)} must be positive and strictly increasing")
    odd = [s for s in scales if s % scales[0]]
    if odd:
        raise ValueError(f"scales {list(scales)}: {odd} not a multiple of the smallest scale {scales[0]}")


def check_base(base: dict[str, Any]) -> None:
    """The base spec names a registered encoder and validates against its config (ValueError otherwise)."""
    from nvila.core.plugins import default_registry
    from nvila.core.specs import resolve

    try:
        resolve("encoder", as_dict(base), default_registry())
    except NvilaError as exc:
        raise ValueError(f"base: {' '.join(str(exc).split())}") from None


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tiles (or null for all at once), got {chunk_size}")


@dataclass
class MultiScaleConfig:
    """What S2 and DynS2 share: the single-tile base encoder, how many tiles it runs at once, image decoding."""

    base: dict[str, Any] = field(default_factory=lambda: {"name": "siglip"})
    """Spec of the single-tile encoder that encodes every tile, e.g. {name: siglip, image_size: 448}."""
    chunk_size: int | None = None
    """Most tiles per base-encoder forward, to bound memory; null runs all tiles of a batch at once."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest image (width x height) the processor accepts; a guard against decompression bombs."""
    alpha: str = "white"
    """Transparent pixels: 'white' composites them onto white (nvila); 'drop' discards alpha (released NVILA)."""
    exif_rotate: bool = True
    """Turn photos upright by their EXIF orientation (nvila); released NVILA never does (false)."""

    def check_shared(self) -> None:
        check_decoding(self.alpha, self.max_pixels)
        check_chunk_size(self.chunk_size)
        check_base(self.base)


@dataclass
class S2Config(MultiScaleConfig):
    """Multi-scale features of a single-tile base encoder, merged into one map of tile-sized blocks.

    S2: the base encoder sees the image at each of the square ``scales``."""

    scales: list[int] = field(default_factory=lambda: [64, 128])
    """Square image sides in pixels, increasing; each a multiple of the base encoder's tile size."""
    output_scale: int = 0
    """Index into scales of the scale whose feature size the merged map takes (s2wrapper: 0, the smallest)."""

    def __post_init__(self) -> None:
        check_scales(self.scales)
        if not -len(self.scales) <= self.output_scale < len(self.scales):
            raise ValueError(f"output_scale {self.output_scale} is not an index into scales {list(self.scales)}")
        self.check_shared()


@dataclass
class DynS2Config(MultiScaleConfig):
    """S2 whose largest scale follows the image's aspect ratio; blocks in the largest scale's grid.

    DynS2, as in NVILA-8B: siglip so400m 448 base, scales [448, 896, 1344], max_tiles 12."""

    scales: list[int] = field(default_factory=lambda: [64, 128, 192])
    """Image sides in pixels, increasing; the smallest is the base encoder's tile, the rest its multiples."""
    max_tiles: int = 12
    """Most tiles at the largest scale; the fewest is (largest / smallest scale)**2 (NVILA: 12 and 9)."""

    def __post_init__(self) -> None:
        check_scales(self.scales)
        if self.max_tiles < self.min_tiles:
            raise ValueError(f"max_tiles {self.max_tiles} is below the ({self.scales[-1]} / {self.scales[0]})**2 "
                             f"= {self.min_tiles} tiles the largest scale needs at least")
        self.check_shared()

    @property
    def min_tiles(self) -> int:
        return (self.scales[-1] // self.scales[0]) ** 2


@dataclass
class DynamicTilesConfig:
    """Each tile through a single-tile base encoder; one block per tile.

    Dynamic tiling, as in NVILA-Lite: siglip so400m 448 base, 1 to 12 tiles, thumbnail."""

    base: dict[str, Any] = field(default_factory=lambda: {"name": "siglip"})
    """Spec of the single-tile encoder that encodes every tile, e.g. {name: siglip, image_size: 448}."""
    min_tiles: int = 1
    """Fewest tiles in the grid (NVILA-Lite: 1)."""
    max_tiles: int = 12
    """Most tiles in the grid, thumbnail not counted (NVILA-Lite: 12)."""
    thumbnail: bool = True
    """Append the whole image as one extra tile when the grid has more than one tile (NVILA-Lite: yes)."""
    chunk_size: int | None = None
    """Most tiles per base-encoder forward, to bound memory; null runs all tiles of a batch at once."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest image (width x height) the processor accepts; a guard against decompression bombs."""
    alpha: str = "white"
    """Transparent pixels: 'white' composites them onto white (nvila); 'drop' discards alpha (released NVILA)."""
    exif_rotate: bool = True
    """Turn photos upright by their EXIF orientation (nvila); released NVILA never does (false)."""

    def __post_init__(self) -> None:
        check_decoding(self.alpha, self.max_pixels)
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min_tiles {self.min_tiles} and "
                             f"max_tiles {self.max_tiles}")
        check_chunk_size(self.chunk_size)
        check_base(self.base)


@dataclass
class SiglipConfig:
    """SigLIP vision tower: each tile becomes one (S/p, S/p) block of features.

    Architecture fields are ignored when ``checkpoint`` is set."""

    checkpoint: str | None = None
    """Local Hugging Face directory with SigLIP weights; None builds a random-initialised model."""
    feature_layer: int = -2
    """Hidden layer whose output is used as features (negative counts from the end; NVILA: -2)."""
    image_size: int = 64
    """Input resolution of one tile, in pixels (NVILA: 448)."""
    patch_size: int = 8
    """Patch side in pixels (so400m: 14)."""
    hidden_size: int = 64
    """Feature width C (so400m: 1152)."""
    intermediate_size: int = 128
    """MLP width (so400m: 4304)."""
    num_layers: int = 2
    """Transformer layers (so400m: 27)."""
    num_heads: int = 4
    """Attention heads (so400m: 16)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: 'sdpa' (default, any device; bf16 inference on CPUs with AVX512-BF16 runs nvila's prefill
    kernel, :mod:`nvila.plugins.attention`), 'eager', or 'flash_attention_2' (GPU, flash-attn)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest image (width x height) the processor accepts; a guard against decompression bombs."""
    alpha: str = "white"
    """Transparent pixels: 'white' composites them onto white (nvila); 'drop' discards alpha (released NVILA)."""
    exif_rotate: bool = True
    """Turn photos upright by their EXIF orientation (nvila); released NVILA never does (false)."""

    def __post_init__(self) -> None:
        if self.checkpoint is None and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        check_decoding(self.alpha, self.max_pixels)


@dataclass
class TimmViTConfig:
    """A timm Vision Transformer: each tile becomes one (S/p, S/p) block of patch features.

    An architecture field left at None keeps the timm model's own value."""

    model: str = "vit_tiny_patch16_224"
    """timm model name of a Vision Transformer (e.g. 'vit_so400m_patch14_siglip_384')."""
    checkpoint: str | None = None
    """Local .safetensors file with the model's weights; None keeps the random initialisation."""
    feature_layer: int = -2
    """Block whose output is used as features: -1 is the last, -2 the second-to-last, 1 the first."""
    image_size: int | None = 64
    """Input resolution of one tile, in pixels (None: the model's default)."""
    patch_size: int | None = 8
    """Patch side in pixels (None: the model's default)."""
    depth: int | None = 2
    """Transformer blocks (None: the model's default)."""
    embed_dim: int | None = 64
    """Feature width C (None: the model's default)."""
    num_heads: int | None = 4
    """Attention heads (None: the model's default)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest image (width x height) the processor accepts; a guard against decompression bombs."""

    def __post_init__(self) -> None:
        if self.image_size is not None and self.patch_size is not None and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.feature_layer == 0:
            raise ValueError("feature_layer 0 would be the patch embeddings; timm ViT features come from a block "
                             "(-1 is the last, 1 the first)")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")

    def overrides(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model``: the architecture fields that are set."""
        names = {"image_size": "img_size", "patch_size": "patch_size", "depth": "depth", "embed_dim": "embed_dim",
                 "num_heads": "num_heads"}
        return {timm_name: getattr(self, field) for field, timm_name in names.items()
                if getattr(self, field) is not None}


@dataclass
class PatchesConfig:
    """Pixels regrouped into (S/p, S/p) patches of 3 p^2 values (channel, row, column within the patch)."""

    image_size: int = 64
    """Input resolution of one tile, in pixels."""
    patch_size: int = 8
    """Patch side p in pixels; each feature holds one patch's 3 * p * p normalised pixel values."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Largest image (width x height) the processor accepts; a guard against decompression bombs."""

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.image_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a positive multiple of patch_size "
                             f"{self.patch_size}")
