"""Dynamic tiling (NVILA-Lite): an aspect-ratio grid of independent tiles, plus a thumbnail."""

import pytest
import torch
from PIL import Image

from nvila.encoders.dynamic_tiles import DynamicTilesConfig, DynamicTilesEncoder
from tests.encoders.images import TINY_SIGLIP, noise_image


@pytest.mark.parametrize("size,grid,tiles", [
    ((20, 20), (1, 1), 1),      # small square: one tile, no thumbnail (2x2 would need > 2,048 px)
    ((60, 30), (1, 2), 3),      # 2:1 -> two tiles and the thumbnail (4x2 ties but needs > 4,096 px)
    ((100, 50), (2, 4), 9),     # 2:1 and large enough for the tie to go to 4x2
    ((200, 20), (1, 10), 11),   # 10:1 exactly
])
def test_tiles_then_thumbnail_each_one_block(size, grid, tiles):
    torch.manual_seed(0)
    encoder = DynamicTilesEncoder(DynamicTilesConfig(base=dict(TINY_SIGLIP), max_tiles=12)).eval()
    processor = encoder.processor()
    image = noise_image(*size)
    prepared = processor(image)
    assert processor.tile_grid(*size) == grid
    assert prepared.pixels.shape[0] == tiles and prepared.grid == (1, tiles)
    assert (processor.plan(*size).tiles, processor.plan(*size).grid) == (tiles, (1, tiles))
    if tiles > 1:  # the last tile is the whole image resized to one tile
        assert torch.equal(prepared.pixels[-1:], encoder.base.processor()(image).pixels)
    with torch.no_grad():
        blocks = encoder(prepared.pixels, [prepared.grid])
        alone = encoder.base(prepared.pixels, [(1, 1)] * tiles)
    assert torch.equal(blocks, alone)


def test_thumbnail_can_be_turned_off_and_frames_are_one_tile():
    encoder = DynamicTilesEncoder(DynamicTilesConfig(base=dict(TINY_SIGLIP), thumbnail=False))
    assert encoder.processor()(Image.new("RGB", (60, 30))).grid == (1, 2)
    assert encoder.processor().frame(Image.new("RGB", (60, 30))).pixels.shape == (1, 3, 32, 32)
