"""Dynamic tiling (NVILA-Lite, InternVL): the image cut into an aspect-ratio grid of tiles, each its own block.

The grid follows the same rule as DynS2's largest scale (:func:`encoders.tiling.closest_grid`) between
``min_tiles`` and ``max_tiles``; with ``thumbnail``, the whole image resized to one tile follows the grid
whenever the grid has more than one tile. Tiles are not stitched: each tile's features are one block,
in tile order, so the block grid is reported as a single row ``(1, tiles)``; an image costs
(tiles) x (tokens per block after compression), e.g. 13 x 121 for a 12-tile NVILA-Lite image.
"""

from __future__ import annotations

import torch
from PIL import Image

from nvila.core.interfaces import ImageProcessor, PreparedImage, TilePlan, VisionEncoder
from nvila.core.specs import build
from nvila.encoders.configs import DynamicTilesConfig
from nvila.encoders.preprocess import load_rgb
from nvila.encoders.s2 import Grid, _single_tile_size
from nvila.encoders.tiling import closest_grid


class DynamicTilesProcessor(ImageProcessor):
    """Grid tiles row-major, then the thumbnail; each normalised by the base encoder's processor."""

    def __init__(self, base: ImageProcessor, tile: int, config: DynamicTilesConfig) -> None:
        self.base, self.tile = base, tile
        self.min_tiles, self.max_tiles, self.thumbnail = config.min_tiles, config.max_tiles, config.thumbnail
        self.max_pixels, self.alpha, self.exif_rotate = config.max_pixels, config.alpha, config.exif_rotate

    def rgb(self, image: Image.Image) -> Image.Image:
        return load_rgb(image, self.max_pixels, self.alpha, self.exif_rotate)

    def tile_grid(self, width: int, height: int) -> Grid:
        """(rows, cols) of the tile grid for a ``width`` x ``height`` image (thumbnail not included)."""
        return closest_grid(width, height, self.tile, self.min_tiles, self.max_tiles)

    def plan(self, width: int, height: int) -> TilePlan:
        rows, cols = self.tile_grid(width, height)
        tiles = rows * cols + (1 if self.thumbnail and rows * cols > 1 else 0)
        return TilePlan(tiles=tiles, grid=(1, tiles))

    def __call__(self, image: Image.Image) -> PreparedImage:
        rgb = self.rgb(image)
        rows, cols = self.tile_grid(*rgb.size)
        resized = rgb.resize((cols * self.tile, rows * self.tile), Image.Resampling.BICUBIC)
        tiles = [self.base(resized.crop((c * self.tile, r * self.tile, (c + 1) * self.tile, (r + 1) * self.tile)))
                 .pixels for r in range(rows) for c in range(cols)]  # each (1, 3, S, S)
        if self.thumbnail and rows * cols > 1:
            tiles.append(self.base(rgb).pixels)  # the whole image as one tile
        return PreparedImage(torch.cat(tiles), grid=(1, len(tiles)))  # (T, 3, S, S)

    def frame(self, image: Image.Image) -> PreparedImage:
        """One video frame: a single tile at the base resolution."""
        return PreparedImage(self.base(self.rgb(image)).pixels, grid=(1, 1))


class DynamicTilesEncoder(VisionEncoder):
    """Each tile through a single-tile base encoder; one block per tile."""

    def __init__(self, config: DynamicTilesConfig) -> None:
        super().__init__()
        self.config = config
        self.base = build("encoder", config.base)
        self.tile = _single_tile_size(self.base, "dynamic-tiles")
        self.block_size = self.base.block_size
        self.out_channels = self.base.out_channels

    def processor(self) -> DynamicTilesProcessor:
        return DynamicTilesProcessor(self.base.processor(), self.tile, self.config)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        blocks = sum(r * c for r, c in grids)
        if blocks != pixels.shape[0]:
            raise ValueError(f"dynamic-tiles: {pixels.shape[0]} tiles for block grids {grids} ({blocks} blocks)")
        chunk = self.config.chunk_size or max(pixels.shape[0], 1)
        parts = [self.base(p, [(1, 1)] * p.shape[0]) for p in pixels.split(chunk)]
        return torch.cat(parts)  # (T, h, w, C): one block per tile

    def enable_gradient_checkpointing(self) -> None:
        self.base.enable_gradient_checkpointing()

    def fsdp_wrap_modules(self) -> set[type[torch.nn.Module]]:
        return self.base.fsdp_wrap_modules()
