"""nvila against NVlabs/VILA's own code, run from its source on a tiny released-layout checkpoint.

Set NVILA_VILA_SOURCE to a folder holding VILA's ``llava/`` (see official_source.py); without it these tests
skip. Input embeddings are compared whole: text embeddings, visual tokens, end tokens and their order.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from nvila.core.engine import ChatRequest
from nvila.workflows.pretrained import NVILA
from tests.workflows import official_source
from tests.workflows.released import write_released

SOURCE = os.environ.get("NVILA_VILA_SOURCE")
pytestmark = pytest.mark.skipif(not (SOURCE and (Path(SOURCE) / "llava" / "model" / "llava_arch.py").is_file()),
                                reason="NVILA_VILA_SOURCE does not name a copy of VILA's llava/")
pytest.importorskip("einops")


def picture(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


@pytest.fixture(scope="module")
def vila():
    return official_source.import_official(SOURCE)


@pytest.fixture(scope="module", params=["nvila-8b", "nvila-lite"])
def pair(request, tmp_path_factory, vila):
    directory = write_released(tmp_path_factory.mktemp(request.param) / "ckpt", request.param)
    return request.param, NVILA.from_pretrained(directory), official_source.official_model(vila, directory)


def ours(model: NVILA, parts: list) -> torch.Tensor:
    request = ChatRequest([{"role": "user", "content": parts}])
    inputs = model.engine.inputs([request])
    return model.engine.embed(inputs)[0]  # (L, D)


def compare(name: str, mine: torch.Tensor, theirs: torch.Tensor) -> float:
    assert mine.shape == theirs.shape, f"{name}: {tuple(mine.shape)} against VILA's {tuple(theirs.shape)}"
    diff = (mine - theirs).abs().max().item()
    print(f"{name}: {mine.shape[0]} positions, max |nvila - VILA| = {diff:.2e}")
    return diff


@pytest.mark.parametrize("size", [(100, 60), (60, 140), (33, 33)], ids=["wide", "tall", "small"])
def test_one_image_embeds_like_generate_content(pair, size):
    name, model, official = pair
    image = picture(*size, seed=1)
    theirs = official_source.official_image_embeds(official, [image, "What is it?"])
    mine = ours(model, [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}])
    assert compare(f"{name} one image {size}", mine, theirs) < 1e-4


def test_two_images_are_each_one_tile_with_their_end_tokens(pair):
    name, model, official = pair
    images = [picture(100, 60, seed=2), picture(50, 80, seed=3)]
    theirs = official_source.official_image_embeds(official, [images[0], images[1], "Compare them."])
    mine = ours(model, [{"type": "image", "image": images[0]}, {"type": "image", "image": images[1]},
                        {"type": "text", "text": "Compare them."}])
    assert compare(f"{name} two images", mine, theirs) < 1e-4


def test_video_frames_pool_and_end_like_the_video_encoder(pair, vila):
    name, model, official = pair
    frames = [picture(64, 48, seed=10 + i) for i in range(8)]
    theirs = official_source.official_video_embeds(vila, official, frames, "What happens?")
    mine = ours(model, [{"type": "video", "video": frames}, {"type": "text", "text": "What happens?"}])
    assert compare(f"{name} video of 8 frames", mine, theirs) < 1e-4


def test_tile_grids_match_vilas_preprocessing(vila):
    """mm_utils.dynamic_s2_preprocess / dynamic_preprocess against nvila's grids, over many aspect ratios."""
    from nvila.encoders.tiling import closest_grid

    mm = vila["mm_utils"]
    for width in range(20, 400, 37):
        for height in range(20, 400, 41):
            image = Image.new("RGB", (width, height))
            _, block = mm.dynamic_s2_preprocess(image, s2_scales=[32, 64, 96], max_num=12, image_size=32)
            assert closest_grid(width, height, 32, 9, 12) == tuple(block)
            tiles = mm.dynamic_preprocess(image, min_num=1, max_num=12, image_size=32, use_thumbnail=False)
            rows, cols = closest_grid(width, height, 32, 1, 12)
            assert rows * cols == len(tiles)
