"""DynS2: NVILA's tiling, stitching, area interpolation and channel layout, and its failure modes."""

import pytest
import torch
from PIL import Image

from nvila.compressors.stc import SpatialToChannel, STCConfig
from nvila.core.errors import NvilaError, SpecError
from nvila.core.specs import build
from nvila.encoders.dyns2 import DynS2Config, DynS2Encoder
from nvila.encoders.siglip import SiglipConfig, SiglipEncoder
from nvila.encoders.tiling import merge_blocks
from tests.encoders.images import TINY_SIGLIP, area_resize, noise_image, resized_pixels

PIXELS = {"name": "patches", "image_size": 8, "patch_size": 1}  # features = the tile's normalised pixels


def probe(scales=(8, 16, 24), max_tiles=12):
    return DynS2Encoder(DynS2Config(base=dict(PIXELS), scales=list(scales), max_tiles=max_tiles))


@pytest.mark.parametrize("size", [(50, 20), (20, 70), (30, 30), (3, 3), (300, 8)])
def test_stitched_scales_equal_the_directly_resized_image(size):
    """Tiling and stitching lose nothing and misplace nothing: each scale's channels are that scale's
    directly resized image, area-resized to the largest scale's size (unchanged at the largest)."""
    encoder = probe()
    image = noise_image(*size)
    prepared = encoder.processor()(image)
    blocks = encoder(prepared.pixels, [prepared.grid])  # (R*C, 8, 8, 9)
    rows, cols = prepared.grid
    merged = merge_blocks(blocks, rows, cols)  # (8R, 8C, 9)
    grids = encoder.processor().scale_grids(*size)
    assert grids[:2] == [(1, 1), (2, 2)] and grids[2] == (rows, cols)
    for k, (r, c) in enumerate(grids):
        expected = area_resize(resized_pixels(image, r, c, 8), (8 * rows, 8 * cols))
        got = merged[..., 3 * k: 3 * k + 3]
        if k == 2:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def nvila_reference(features, grid, scales, h):
    """NVILA's merge_features_for_dynamic_s2 + split_chessboard, written out with loops (channels first)."""
    maps, start = [], 0
    grids = [(s // scales[0], s // scales[0]) for s in scales[:-1]] + [grid]
    for rows, cols in grids:
        tiles = features[start:start + rows * cols].permute(0, 3, 1, 2)  # (n, C, h, w)
        start += rows * cols
        maps.append(torch.cat([torch.cat([tiles[i * cols + j] for j in range(cols)], dim=-1)
                               for i in range(rows)], dim=-2))  # (C, rows*h, cols*w)
    size = maps[-1].shape[-2:]
    merged = torch.cat([torch.nn.functional.interpolate(m[None], size=size, mode="area")[0] for m in maps])
    rows, cols = grid
    blocks = [merged[:, i * h:(i + 1) * h, j * h:(j + 1) * h] for i in range(rows) for j in range(cols)]
    return torch.stack(blocks).permute(0, 2, 3, 1)  # (R*C, h, w, L*C)


def test_merge_matches_nvilas_merge_and_split_on_random_features():
    encoder = probe()
    features = torch.randn(1 + 4 + 12, 8, 8, 5)
    for grid in [(3, 4), (4, 3), (1, 12), (12, 1), (3, 3)]:
        n = 5 + grid[0] * grid[1]
        got = encoder.merge_scales(features[:n], grid)
        torch.testing.assert_close(got, nvila_reference(features[:n], grid, [8, 16, 24], 8), rtol=0, atol=1e-6)


def test_single_scale_dyns2_is_plain_siglip():
    torch.manual_seed(0)
    spec = dict(TINY_SIGLIP)
    plain = SiglipEncoder(SiglipConfig(**{k: v for k, v in spec.items() if k != "name"})).eval()
    image = noise_image(45, 23)
    one_tile = DynS2Encoder(DynS2Config(base=spec, scales=[32], max_tiles=1)).eval()
    one_tile.base.load_state_dict(plain.state_dict())
    got = one_tile.processor()(image)
    expected = plain.processor()(image)
    assert torch.equal(got.pixels, expected.pixels) and got.grid == (1, 1)
    with torch.no_grad():
        torch.testing.assert_close(one_tile(got.pixels, [got.grid]), plain(expected.pixels, [(1, 1)]),
                                   rtol=0, atol=0)
        # with more tiles allowed, every block is SigLIP on its own tile of the resized image
        tiled = DynS2Encoder(DynS2Config(base=spec, scales=[32], max_tiles=6)).eval()
        tiled.base.load_state_dict(plain.state_dict())
        prepared = tiled.processor()(image)
        assert prepared.grid == (1, 2)
        torch.testing.assert_close(tiled(prepared.pixels, [prepared.grid]), plain(prepared.pixels, [(1, 1)] * 2),
                                   rtol=0, atol=0)


def test_nvila_configuration_at_tiny_width():
    """NVILA-8B's geometry (448 px tiles, patch 14, scales 448/896/1344, 12 tiles) with a 16-wide SigLIP."""
    spec = {"name": "siglip", "image_size": 448, "patch_size": 14, "hidden_size": 16, "intermediate_size": 32,
            "num_layers": 1, "num_heads": 2, "feature_layer": -1}
    encoder = build("encoder", {"name": "dyns2", "base": spec, "scales": [448, 896, 1344], "max_tiles": 12})
    image = Image.new("RGB", (1920, 1080), (30, 60, 90))
    prepared = encoder.processor()(image)
    assert prepared.pixels.shape == (1 + 4 + 12, 3, 448, 448) and prepared.grid == (3, 4)
    with torch.no_grad():
        blocks = encoder(prepared.pixels, [prepared.grid])
    assert blocks.shape == (12, 32, 32, 3 * 16) and encoder.out_channels == 48 and encoder.block_size == (32, 32)
    tokens = SpatialToChannel(STCConfig(ratio=2))(blocks)
    assert tokens.shape == (12, 256, 4 * 48)  # 3,072 visual tokens for a 16:9 image, as NVILA-8B


def test_video_frames_use_the_base_resolution_and_share_the_channel_layout():
    torch.manual_seed(0)
    encoder = DynS2Encoder(DynS2Config(base=dict(TINY_SIGLIP), scales=[32, 64, 96], max_tiles=12)).eval()
    processor = encoder.processor()
    frames = [processor.frame(noise_image(60, 40, seed)) for seed in range(3)]
    image = processor(noise_image(70, 30))
    assert all(f.pixels.shape == (1, 3, 32, 32) and f.grid == (1, 1) for f in frames)
    pixels = torch.cat([frames[0].pixels, image.pixels, frames[1].pixels, frames[2].pixels])
    grids = [(1, 1), image.grid, (1, 1), (1, 1)]
    with torch.no_grad():
        blocks = encoder(pixels, grids)
        alone = encoder.base(frames[1].pixels, [(1, 1)])  # (1, 4, 4, 32)
    n = image.grid[0] * image.grid[1]
    assert blocks.shape == (3 + n, 4, 4, 96)
    frame = blocks[1 + n]  # frames keep their place among the images
    torch.testing.assert_close(frame, alone[0].repeat(1, 1, 3), rtol=0, atol=1e-6)


def test_chunked_encoding_gives_the_same_blocks():
    torch.manual_seed(0)
    whole = DynS2Encoder(DynS2Config(base=dict(TINY_SIGLIP), scales=[32, 64], max_tiles=6)).eval()
    chunked = DynS2Encoder(DynS2Config(base=dict(TINY_SIGLIP), scales=[32, 64], max_tiles=6, chunk_size=3)).eval()
    chunked.load_state_dict(whole.state_dict())
    prepared = [whole.processor()(noise_image(w, h)) for w, h in [(90, 30), (40, 40)]]
    pixels, grids = torch.cat([p.pixels for p in prepared]), [p.grid for p in prepared]
    with torch.no_grad():
        torch.testing.assert_close(chunked(pixels, grids), whole(pixels, grids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(16, 16), (8000, 300), (300, 8000), (1920, 1080), (1081, 1920), (7, 4000)])
def test_plan_equals_preprocessing(size):
    processor = probe().processor()
    prepared = processor(Image.new("RGB", size))
    plan = processor.plan(*size)
    assert (plan.tiles, plan.grid) == (prepared.pixels.shape[0], prepared.grid)


def test_the_grid_follows_the_upright_image():
    import io

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait
    buf = io.BytesIO()
    Image.new("RGB", (200, 100)).save(buf, "PNG", exif=exif)
    prepared = probe().processor()(Image.open(io.BytesIO(buf.getvalue())))
    assert prepared.grid == probe().processor().plan(100, 200).grid == (5, 2)


@pytest.mark.parametrize("overrides,message", [
    ({"scales": [448, 900]}, r"\[900\] not a multiple of the smallest scale 448"),
    ({"scales": [896, 448]}, "strictly increasing"),
    ({"scales": []}, "scales is empty"),
    ({"scales": [448, 896, 1344], "max_tiles": 4}, r"max_tiles 4 is below .* = 9 tiles"),
    ({"chunk_size": 0}, "chunk_size must be a positive"),
    ({"base": {"name": "siglip", "hiden_size": 8}}, "base: .*'hiden_size'.*Did you mean 'hidden_size'"),
    ({"base": {"name": "sigclip"}}, "base: Unknown encoder 'sigclip'. Did you mean 'siglip'"),
    ({"base": {"name": "siglip", "image_size": 30}}, "base: .*image_size 30 is not a multiple of patch_size 8"),
])
def test_bad_settings_are_refused_before_anything_is_built(overrides, message):
    with pytest.raises(SpecError, match=message):
        build("encoder", {"name": "dyns2", **overrides})


def test_scales_the_tile_cannot_take_name_the_setting():
    with pytest.raises(NvilaError, match=r"s2: scales \[48, 96\]: \[48\] not a multiple of the 'siglip' base "
                       r"encoder's tile size 32"):
        build("encoder", {"name": "s2", "base": dict(TINY_SIGLIP), "scales": [48, 96]})
    with pytest.raises(NvilaError, match="smallest scale 64 must be the 'siglip' base encoder's tile size 32"):
        build("encoder", {"name": "dyns2", "base": dict(TINY_SIGLIP), "scales": [64, 128], "max_tiles": 4})
    with pytest.raises(NvilaError, match="needs a single-tile base encoder"):
        build("encoder", {"name": "dyns2", "base": {"name": "dyns2"}})


def test_a_tile_count_that_fits_no_grid_is_refused():
    encoder = probe()
    with pytest.raises(ValueError, match="tiles do not match block grids"):
        encoder(torch.zeros(7, 3, 8, 8), [(3, 4)])
    with pytest.raises(ValueError, match="takes tiles of 8x8"):
        encoder(torch.zeros(17, 3, 16, 16), [(3, 4)])


def test_gradients_reach_every_base_parameter_through_stitching_and_interpolation():
    encoder = DynS2Encoder(DynS2Config(base=dict(TINY_SIGLIP), scales=[32, 64, 96], max_tiles=12))
    prepared = encoder.processor()(noise_image(80, 50))
    encoder(prepared.pixels, [prepared.grid]).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.base.parameters())
