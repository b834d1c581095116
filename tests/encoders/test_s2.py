"""S2: square scales stitched, area-resized to the chosen output scale, concatenated along channels."""

import pytest
import torch

from nvila.core.errors import SpecError
from nvila.core.specs import build
from nvila.encoders.s2 import S2Config, S2Encoder
from nvila.encoders.siglip import SiglipConfig, SiglipEncoder
from nvila.encoders.tiling import merge_blocks
from tests.encoders.images import TINY_SIGLIP, area_resize, noise_image, resized_pixels

PIXELS = {"name": "patches", "image_size": 8, "patch_size": 1}  # features = the tile's normalised pixels


@pytest.mark.parametrize("output_scale,grid", [(0, (1, 1)), (1, (2, 2)), (-1, (4, 4))])
@pytest.mark.parametrize("size", [(50, 20), (20, 70), (3, 3)])
def test_stitched_scales_equal_the_directly_resized_square_image(size, output_scale, grid):
    encoder = S2Encoder(S2Config(base=dict(PIXELS), scales=[8, 16, 32], output_scale=output_scale))
    image = noise_image(*size)
    prepared = encoder.processor()(image)
    assert prepared.pixels.shape == (1 + 4 + 16, 3, 8, 8) and prepared.grid == grid
    merged = merge_blocks(encoder(prepared.pixels, [prepared.grid]), *grid)  # (8g, 8g, 9)
    for k, side in enumerate([1, 2, 4]):
        expected = area_resize(resized_pixels(image, side, side, 8), (8 * grid[0], 8 * grid[1]))
        torch.testing.assert_close(merged[..., 3 * k: 3 * k + 3], expected, rtol=0, atol=1e-6)


def test_single_scale_s2_is_plain_siglip():
    torch.manual_seed(0)
    plain = SiglipEncoder(SiglipConfig(**{k: v for k, v in TINY_SIGLIP.items() if k != "name"})).eval()
    s2 = S2Encoder(S2Config(base=dict(TINY_SIGLIP), scales=[32])).eval()
    s2.base.load_state_dict(plain.state_dict())
    image = noise_image(37, 61)
    got, expected = s2.processor()(image), plain.processor()(image)
    assert torch.equal(got.pixels, expected.pixels)
    with torch.no_grad():
        assert torch.equal(s2(got.pixels, [got.grid]), plain(expected.pixels, [(1, 1)]))


def test_frames_and_one_block_images_in_one_batch_are_ambiguous_and_refused():
    encoder = S2Encoder(S2Config(base=dict(PIXELS), scales=[8, 16]))
    processor = encoder.processor()
    image, frame = processor(noise_image(20, 20)), processor.frame(noise_image(20, 20))
    assert image.grid == frame.grid == (1, 1) and frame.pixels.shape[0] == 1
    assert encoder(image.pixels, [(1, 1)]).shape == (1, 8, 8, 6)
    assert encoder(torch.cat([frame.pixels] * 2), [(1, 1)] * 2).shape == (2, 8, 8, 6)
    with pytest.raises(ValueError, match="encode frames and \\(1, 1\\)-grid images in separate calls"):
        encoder(torch.cat([image.pixels, frame.pixels]), [(1, 1), (1, 1)])


def test_output_scale_must_index_the_scales():
    with pytest.raises(SpecError, match="output_scale 3 is not an index into scales"):
        build("encoder", {"name": "s2", "scales": [64, 128], "output_scale": 3})
