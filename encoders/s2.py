"""S2 ("scaling on scales") multi-scale encoder around any single-tile encoder.

The image is resized to each scale as a square and cut into tiles of the base encoder's input size;
all tiles of a batch go through the base encoder in one batched forward (``chunk_size`` bounds it).
Each scale's tile features are stitched back into one map, every map is resized with area
interpolation to the feature size of the chosen output scale, and the maps are concatenated along
channels, smallest scale first (as s2wrapper's ``multiscale_forward`` does). The merged map is
returned as tile-sized blocks, row-major, so a compressor sees blocks of the base encoder's shape.

Video frames (``processor().frame``) are encoded at the base resolution only, one tile each; their
features are repeated once per scale along channels, so frames and images share one channel layout
(NVILA does the same for images without a block grid).
"""

from __future__ import annotations

import torch
from PIL import Image

from nvila.core.errors import NvilaError
from nvila.core.interfaces import ImageProcessor, PreparedImage, TilePlan, VisionEncoder
from nvila.core.specs import build
from nvila.encoders.configs import (  # noqa: F401  (the checks: still importable from here)
    S2Config,
    check_base,
    check_chunk_size,
    check_scales,
)
from nvila.encoders.preprocess import load_rgb
from nvila.encoders.tiling import area_resize, merge_blocks

Grid = tuple[int, int]


class S2Processor(ImageProcessor):
    """Tiles of every scale, smallest scale first, each normalised by the base encoder's processor."""

    def __init__(self, base: ImageProcessor, tile: int, scales: list[int], output_scale: int,
                 max_pixels: int, alpha: str = "white", exif_rotate: bool = True) -> None:
        self.base, self.tile, self.scales = base, tile, list(scales)
        self.output_scale, self.max_pixels = output_scale, max_pixels
        self.alpha, self.exif_rotate = alpha, exif_rotate

    def rgb(self, image: Image.Image) -> Image.Image:
        return load_rgb(image, self.max_pixels, self.alpha, self.exif_rotate)

    def scale_grids(self, width: int, height: int) -> list[Grid]:
        """(rows, cols) of tiles at each scale for a ``width`` x ``height`` image."""
        return [(s // self.tile, s // self.tile) for s in self.scales]

    def block_grid(self, width: int, height: int) -> Grid:
        """(rows, cols) of tile-sized feature blocks of the merged map."""
        return self.scale_grids(width, height)[self.output_scale]

    def tile_grid(self, width: int, height: int) -> Grid:
        """(rows, cols) of tiles at the largest scale."""
        return self.scale_grids(width, height)[-1]

    def __call__(self, image: Image.Image) -> PreparedImage:
        rgb = self.rgb(image)
        tiles = []
        for rows, cols in self.scale_grids(*rgb.size):
            resized = rgb.resize((cols * self.tile, rows * self.tile), Image.Resampling.BICUBIC)
            for r in range(rows):
                for c in range(cols):
                    box = (c * self.tile, r * self.tile, (c + 1) * self.tile, (r + 1) * self.tile)
                    tiles.append(self.base(resized.crop(box)).pixels)  # (1, 3, S, S)
        return PreparedImage(torch.cat(tiles), grid=self.block_grid(*rgb.size))  # (T, 3, S, S)

    def frame(self, image: Image.Image) -> PreparedImage:
        """One video frame: a single tile at the base resolution."""
        return PreparedImage(self.base(self.rgb(image)).pixels, grid=(1, 1))  # (1, 3, S, S)

    def plan(self, width: int, height: int) -> TilePlan:
        tiles = sum(rows * cols for rows, cols in self.scale_grids(width, height))
        return TilePlan(tiles=tiles, grid=self.block_grid(width, height))


class S2Encoder(VisionEncoder):
    """Multi-scale features of a single-tile base encoder, merged into one map of tile-sized blocks."""

    blocks_form_one_map = True  # the model reads the visual tokens row by row across the whole map

    def __init__(self, config: S2Config) -> None:
        super().__init__()
        self.config = config
        self.scales = list(config.scales)
        self.base = build("encoder", config.base)
        self.tile = _single_tile_size(self.base, self.name())
        misfits = [s for s in self.scales if s % self.tile]
        if misfits:
            raise NvilaError(f"{self.name()}: scales {self.scales}: {misfits} not a multiple of the "
                             f"'{config.base['name']}' base encoder's tile size {self.tile}. Choose scales that "
                             f"are multiples of {self.tile}.")
        self.block_size = self.base.block_size
        self.out_channels = len(self.scales) * self.base.out_channels

    @classmethod
    def name(cls) -> str:
        return "s2"

    def processor(self) -> S2Processor:
        return S2Processor(self.base.processor(), self.tile, self.scales, self.config.output_scale,
                           self.config.max_pixels, self.config.alpha, self.config.exif_rotate)

    def scale_grids(self, grid: Grid) -> list[Grid]:
        """(rows, cols) of tiles at each scale for an image whose block grid is ``grid``."""
        return [(s // self.tile, s // self.tile) for s in self.scales]

    def tile_counts(self, total: int, grids: list[Grid]) -> list[int]:
        """Tiles of each image in a batch of ``total`` tiles; a (1, 1) grid may be a one-tile video frame."""
        as_images = [sum(r * c for r, c in self.scale_grids(g)) for g in grids]
        if sum(as_images) == total:
            return as_images
        with_frames = [1 if tuple(g) == (1, 1) else n for g, n in zip(grids, as_images)]
        if sum(with_frames) == total:
            return with_frames
        raise ValueError(f"{self.name()}: {total} tiles do not match block grids {grids} (images need "
                         f"{as_images} tiles, video frames one each); encode frames and (1, 1)-grid images "
                         "in separate calls")

    def encode_tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """All tiles through the base encoder, ``chunk_size`` at a time: (T, 3, S, S) -> (T, h, w, C)."""
        chunk = self.config.chunk_size or max(pixels.shape[0], 1)
        parts = [self.base(p, [(1, 1)] * p.shape[0]) for p in pixels.split(chunk)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # (T, h, w, C)

    def merge_scales(self, features: torch.Tensor, grid: Grid) -> torch.Tensor:
        """One image's tile features, smallest scale first -> its merged map as blocks (R*C, h, w, L*C).

        Each scale is stitched into one map, area-resized to the output map's size and written into its
        channel slice of the output, whose blocks are views of that map. A scale already at the output grid
        needs neither: area interpolation to the same size is the identity and its tiles are the blocks.
        """
        rows, cols = grid
        h, w = self.block_size
        channels = features.shape[-1]
        scale_grids = self.scale_grids(grid)
        out = features.new_empty(rows * cols, h, w, len(scale_grids) * channels)  # (R*C, h, w, L*C)
        out_map = out.view(rows, cols, h, w, -1).permute(0, 2, 1, 3, 4)  # (R, h, C, w, L*C): the merged map
        start = 0
        for k, (r, c) in enumerate(scale_grids):
            tiles = features[start:start + r * c]  # (r*c, h, w, C)
            start += r * c
            part = slice(k * channels, (k + 1) * channels)
            if (r, c) == (rows, cols):
                out[..., part] = tiles
                continue
            stitched = merge_blocks(tiles, r, c).float()  # (r*h, c*w, C), in float32 as NVILA resizes
            resized = area_resize(stitched, rows * h, cols * w).to(out.dtype)  # (R*h, C*w, C)
            out_map[..., part] = resized.unflatten(0, (rows, h)).unflatten(2, (cols, w))  # (R, h, C, w, C)
        return out

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        if pixels.shape[-2:] != (self.tile, self.tile):
            raise ValueError(f"{self.name()} takes tiles of {self.tile}x{self.tile}, got {tuple(pixels.shape[-2:])}")
        counts = self.tile_counts(pixels.shape[0], grids)
        features = self.encode_tiles(pixels)  # (T, h, w, C)
        return self.assemble(features, counts, grids)

    def assemble(self, features: torch.Tensor, counts: list[int], grids: list[Grid]) -> torch.Tensor:
        """Tile features ``(T, h, w, C)`` of a batch, ``counts`` tiles per image -> blocks (sum R*C, h, w, L*C)."""
        blocks = []
        for image_features, grid in zip(features.split(counts), grids):
            if image_features.shape[0] == 1:  # a video frame (or a one-tile image): same feature at every scale
                blocks.append(image_features.repeat(1, 1, 1, len(self.scales)))  # (1, h, w, L*C)
            else:
                blocks.append(self.merge_scales(image_features, grid))  # (R*C, h, w, L*C)
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)  # (sum R*C, h, w, L*C)

    def enable_gradient_checkpointing(self) -> None:
        self.base.enable_gradient_checkpointing()

    def fsdp_wrap_modules(self) -> set[type[torch.nn.Module]]:
        return self.base.fsdp_wrap_modules()


def _single_tile_size(base: VisionEncoder, wrapper: str) -> int:
    """The side of the base encoder's square input tile; refuse bases that tile images themselves."""
    probe = base.processor()(Image.new("RGB", (5, 3)))
    plan = base.processor().plan(5, 3)
    side = probe.pixels.shape[-1]
    if probe.pixels.shape[0] != 1 or probe.grid != (1, 1) or plan.tiles != 1 or probe.pixels.shape[-2] != side:
        raise NvilaError(f"{wrapper} needs a single-tile base encoder (one square tile per image), but its base "
                         f"gives {probe.pixels.shape[0]} tile(s) of {tuple(probe.pixels.shape[-2:])} with block "
                         f"grid {probe.grid}. Use an encoder such as siglip or timm-vit as the base.")
    return side
