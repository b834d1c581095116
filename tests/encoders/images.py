"""Images and expected pixels shared by the encoder tests."""

import torch
import torch.nn.functional as F
from PIL import Image

from nvila.encoders.preprocess import to_rgb, to_tensor

# A tiny SigLIP: 32 px tiles, 4x4 features of width 32.
TINY_SIGLIP = {"name": "siglip", "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
               "num_layers": 2, "num_heads": 2, "feature_layer": -1}


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB noise image, so resizing and tiling mistakes show up in every pixel."""
    generator = torch.Generator().manual_seed(seed)
    array = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
    return Image.fromarray(array, mode="RGB")


def resized_pixels(image: Image.Image, rows: int, cols: int, tile: int) -> torch.Tensor:
    """The image resized directly to rows x cols tiles, normalised like SigLIP: (rows*tile, cols*tile, 3)."""
    return to_tensor(to_rgb(image), (rows * tile, cols * tile), (0.5,) * 3, (0.5,) * 3).permute(1, 2, 0)


def area_resize(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, C) -> (h, w, C) with area interpolation."""
    return F.interpolate(features.permute(2, 0, 1)[None], size=size, mode="area")[0].permute(1, 2, 0)

