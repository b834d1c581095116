"""NVILA's tile-grid rule, on a table of aspect ratios and sizes, and the row-major tile layout."""

import random

import pytest
import torch

from nvila.encoders.tiling import area_resize, candidate_grids, closest_grid, merge_blocks, split_image, split_map

# NVILA-8B: 448 px tiles, scales 448/896/1344 -> at least (1344/448)^2 = 9 and at most 12 tiles.
NVILA = dict(tile=448, min_tiles=9, max_tiles=12)


@pytest.mark.parametrize("width,height,expected", [
    (1000, 1000, (3, 3)),     # square: the only 1:1 grid with 9..12 tiles
    (16, 16, (3, 3)),         # tiny images still get the minimum number of tiles
    (1920, 1080, (3, 4)),     # 16:9 -> 4 cols x 3 rows (1.33 is closest to 1.78)
    (1080, 1920, (5, 2)),     # 9:16 -> 2 cols x 5 rows (0.4 beats 0.75 and 0.33)
    (2000, 1000, (2, 5)),     # 2:1 -> 5 x 2 (2.5)
    (900, 300, (2, 6)),       # 3:1 is exactly 6 x 2
    (8000, 300, (1, 12)),     # extreme wide: one row of 12
    (300, 8000, (12, 1)),     # extreme tall: one column of 12
    # exact tie between 5x2 (2.5) and 6x2 (3.0) at aspect 2.75: the larger grid wins only when the image's
    # area exceeds half of its pixel area, 0.5 * 448^2 * 12 = 1,204,224
    (1100, 400, (2, 5)),      # 440,000 px: keeps 5 x 2
    (2200, 800, (2, 6)),      # 1,760,000 px: takes 6 x 2
])
def test_nvila_8b_grid_rule(width, height, expected):
    assert closest_grid(width, height, **NVILA) == expected


@pytest.mark.parametrize("width,height,max_tiles,expected", [
    # single-scale tiling (min 1): 1x1 and 2x2 tie at aspect 1.25; 2x2 needs > 0.5 * 448^2 * 4 = 401,408 px
    (500, 400, 4, (1, 1)),
    (1000, 800, 4, (2, 2)),
    # squares with 1x1, 2x2, 3x3 all exact: each larger grid must pass its own area test in turn
    (448, 448, 12, (1, 1)),
    (900, 900, 12, (2, 2)),     # 810,000 > 401,408 but < 903,168
    (1344, 1344, 12, (3, 3)),
])
def test_ties_prefer_the_larger_grid_only_for_large_images(width, height, max_tiles, expected):
    assert closest_grid(width, height, 448, 1, max_tiles) == expected


def test_the_chosen_grid_is_always_a_closest_candidate():
    rng = random.Random(0)
    grids = candidate_grids(9, 12)
    for _ in range(500):
        w, h = rng.randint(1, 9000), rng.randint(1, 9000)
        rows, cols = closest_grid(w, h, **NVILA)
        assert 9 <= rows * cols <= 12
        best = min(abs(w / h - c / r) for c, r in grids)
        assert abs(w / h - cols / rows) == best


def test_candidates_are_ordered_by_tile_count():
    counts = [c * r for c, r in candidate_grids(1, 12)]
    assert counts == sorted(counts) and min(counts) == 1 and max(counts) == 12


def test_bad_tile_bounds_are_refused():
    with pytest.raises(ValueError, match="min_tiles <= max_tiles"):
        closest_grid(100, 100, 448, 9, 4)


def test_tiles_are_row_major_and_stitching_inverts_splitting():
    image = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)  # (3, 2 rows x 2, 3 cols x 2)
    tiles = split_image(image, rows=2, cols=3)  # (6, 3, 2, 2)
    assert torch.equal(tiles[1], image[:, 0:2, 2:4])  # first row, second column
    assert torch.equal(tiles[3], image[:, 2:4, 0:2])  # second row, first column
    blocks = tiles.permute(0, 2, 3, 1)  # (6, 2, 2, 3) channels last, like encoder blocks
    stitched = merge_blocks(blocks, 2, 3)  # (4, 6, 3)
    assert torch.equal(stitched, image.permute(1, 2, 0))
    assert torch.equal(split_map(stitched, 2, 3), blocks)


@pytest.mark.parametrize(("size_in", "size_out"), [((32, 32), (96, 128)), ((64, 64), (96, 128)), ((48, 40), (32, 24)),
                                                   ((7, 5), (7, 11)), ((16, 16), (16, 16))],
                         ids=["whole factors up", "a factor of 1.5", "down", "mixed, odd sizes", "same size"])
def test_area_resize_is_torch_area_interpolation(size_in, size_out):
    features = torch.randn(*size_in, 24, generator=torch.Generator().manual_seed(0))  # (H, W, C), channel-last
    expected = torch.nn.functional.interpolate(features.permute(2, 0, 1)[None], size=size_out, mode="area")
    torch.testing.assert_close(area_resize(features, *size_out), expected[0].permute(1, 2, 0), rtol=1e-5, atol=1e-6)
