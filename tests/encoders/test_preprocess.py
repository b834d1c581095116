"""Image modes, EXIF orientation and bad images, through the helpers every encoder's processor uses."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from nvila.encoders.preprocess import ImageError, TileProcessor, load_rgb, open_image, to_rgb


def pixel(image, xy=(0, 0)):
    return to_rgb(image).getpixel(xy)


def test_grayscale_and_one_bit_become_grey_rgb():
    assert pixel(Image.new("L", (3, 2), 77)) == (77, 77, 77)
    assert pixel(Image.new("1", (3, 2), 1)) == (255, 255, 255)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent blue
    assert pixel(rgba, (0, 0)) == (255, 0, 0)
    assert pixel(rgba, (1, 0)) == (255, 255, 255)
    half = Image.new("LA", (1, 1), (0, 128))  # black at half opacity over white
    assert pixel(half) in {(127, 127, 127), (128, 128, 128)}


def test_palette_images_use_their_palette_and_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    assert pixel(palette, (1, 0)) == (10, 200, 30)
    palette.info["transparency"] = 1
    assert pixel(palette, (1, 0)) == (255, 255, 255)


def test_cmyk_converts_to_rgb():
    assert pixel(Image.new("CMYK", (1, 1), (0, 0, 0, 0))) == (255, 255, 255)
    assert pixel(Image.new("CMYK", (1, 1), (0, 255, 255, 0))) == (255, 0, 0)


def test_sixteen_bit_images_are_scaled_from_their_full_range():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    rgb = to_rgb(image)
    assert [rgb.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    assert rgb.getpixel((1, 0)) == (128, 128, 128)


def test_thirty_two_bit_integer_images_with_a_sixteen_bit_range():
    image = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
    assert [to_rgb(image).getpixel((x, 0))[0] for x in range(2)] == [0, 255]


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (4, 2), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 2, 2))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    stored.save(buf, "PNG", exif=exif)
    upright = to_rgb(Image.open(io.BytesIO(buf.getvalue())))
    assert upright.size == (2, 4)
    assert upright.getpixel((0, 0)) == (255, 0, 0) and upright.getpixel((0, 3)) == (0, 0, 255)


def test_tiles_are_normalised_with_the_given_constants():
    processor = TileProcessor(8, mean=(0.5, 0.0, 0.25), std=(0.5, 1.0, 0.25))
    pixels = processor(Image.new("RGB", (3, 5), (255, 0, 255))).pixels  # (1, 3, 8, 8)
    assert pixels.shape == (1, 3, 8, 8)
    assert pixels[0, :, 4, 4].tolist() == [1.0, 0.0, 3.0]


def test_empty_images_are_refused():
    with pytest.raises(ImageError, match="empty"):
        load_rgb(Image.new("RGB", (0, 7)))


def test_images_beyond_the_pixel_limit_name_the_setting(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (120, 100)).save(path)
    with pytest.raises(ImageError, match=r"big.png.*120x100 = 12,000 pixels.*max_pixels"):
        load_rgb(Image.open(path), max_pixels=10_000)
    with pytest.raises(ImageError, match="max_pixels"):
        open_image(path.read_bytes(), max_pixels=10_000)
    assert open_image(path, max_pixels=12_000).size == (120, 100)


def test_truncated_and_undecodable_images_name_the_image(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=r"Cannot decode.*cut.png"):
        TileProcessor(8, (0.5,) * 3, (0.5,) * 3)(Image.open(path))
    with pytest.raises(ImageError, match="Cannot decode image.*cut.png"):
        open_image(path)
    with pytest.raises(ImageError, match="Cannot open image '<bytes>'"):
        open_image(b"not an image at all")


def test_official_decoding_drops_alpha_and_ignores_exif_as_convert_rgb_does():
    """Released NVILA decodes with image.convert("RGB"): alpha dropped, EXIF orientation never applied."""
    rgba = Image.new("RGBA", (3, 2), (10, 200, 30, 0))  # fully transparent green
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # nvila: onto white
    assert to_rgb(rgba, alpha="drop").tobytes() == rgba.convert("RGB").tobytes()
    stored = Image.new("RGB", (4, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "PNG", exif=exif)
    assert to_rgb(Image.open(io.BytesIO(buf.getvalue())), exif_rotate=False).size == (4, 2)


@pytest.mark.parametrize("spec", [
    {"name": "siglip", "alpha": "drop", "exif_rotate": False},
    {"name": "dyns2", "scales": [32, 64], "max_tiles": 4, "alpha": "drop", "exif_rotate": False,
     "base": {"name": "siglip", "image_size": 32}},
    {"name": "dynamic-tiles", "alpha": "drop", "exif_rotate": False, "base": {"name": "siglip", "image_size": 32}},
])
def test_encoders_decode_as_their_spec_says(spec):
    from nvila.core.specs import build

    processor = build("encoder", spec).processor()
    image = Image.new("RGBA", (40, 30), (10, 200, 30, 0))
    expected = processor(image.convert("RGB")).pixels
    torch.testing.assert_close(processor(image).pixels, expected)  # alpha dropped, not composited
    torch.testing.assert_close(processor.frame(image).pixels, processor.frame(image.convert("RGB")).pixels)


def test_unknown_alpha_mode_is_refused_naming_the_key():
    from nvila.core.errors import NvilaError
    from nvila.core.specs import build

    with pytest.raises(NvilaError, match="alpha"):
        build("encoder", {"name": "siglip", "alpha": "black"})
