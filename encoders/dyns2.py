"""DynS2: NVILA's dynamic-resolution S2, where the largest scale keeps the image's aspect ratio.

The smaller scales stay square, as in S2. The largest scale's tile grid follows NVILA's rule
(:func:`encoders.tiling.closest_grid`): among the grids with at least ``(largest / smallest)**2`` and
at most ``max_tiles`` tiles, the one whose aspect ratio is closest to the image's. Every scale's map is
resized with area interpolation to the largest scale's feature size and concatenated along channels
(NVILA-8B: 3 x 1152 = 3456), then cut back into tile-sized blocks in the largest scale's grid, so an
image costs (tiles of the largest scale) x (tokens per block after compression).

NVILA resizes to the largest scale only (``s2_resize_output_to_scale_idx: -1``); other output scales
are not offered here, because a square output grid could not tell the encoder the image's own grid.
"""

from __future__ import annotations

from nvila.core.errors import NvilaError
from nvila.core.interfaces import ImageProcessor
from nvila.encoders.configs import (
    DynS2Config,
)
from nvila.encoders.s2 import Grid, S2Encoder, S2Processor
from nvila.encoders.tiling import closest_grid


class DynS2Processor(S2Processor):
    """S2 tiles, except that the largest scale is cut in NVILA's aspect-ratio grid."""

    def __init__(self, base: ImageProcessor, tile: int, scales: list[int], min_tiles: int, max_tiles: int,
                 max_pixels: int, alpha: str = "white", exif_rotate: bool = True) -> None:
        super().__init__(base, tile, scales, output_scale=-1, max_pixels=max_pixels, alpha=alpha,
                         exif_rotate=exif_rotate)
        self.min_tiles, self.max_tiles = min_tiles, max_tiles

    def scale_grids(self, width: int, height: int) -> list[Grid]:
        square = [(s // self.tile, s // self.tile) for s in self.scales[:-1]]
        return square + [closest_grid(width, height, self.tile, self.min_tiles, self.max_tiles)]


class DynS2Encoder(S2Encoder):
    """S2 whose largest scale follows the image's aspect ratio; blocks in the largest scale's grid."""

    def __init__(self, config: DynS2Config) -> None:
        super().__init__(config)  # type: ignore[arg-type]  (same fields, less output_scale)
        if self.scales[0] != self.tile:
            raise NvilaError(f"dyns2: the smallest scale {self.scales[0]} must be the '{config.base['name']}' base "
                             f"encoder's tile size {self.tile} (NVILA: 448 for a 448 px SigLIP); the other scales "
                             "are multiples of it.")

    @classmethod
    def name(cls) -> str:
        return "dyns2"

    def processor(self) -> DynS2Processor:
        return DynS2Processor(self.base.processor(), self.tile, self.scales, self.config.min_tiles,
                              self.config.max_tiles, self.config.max_pixels, self.config.alpha,
                              self.config.exif_rotate)

    def scale_grids(self, grid: Grid) -> list[Grid]:
        return [(s // self.tile, s // self.tile) for s in self.scales[:-1]] + [tuple(grid)]
