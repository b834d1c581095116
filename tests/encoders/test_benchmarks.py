"""Encoder and preprocessing throughput (pytest-benchmark). Default runs execute each once, untimed.

Timed run, as recorded in docs/benchmarks.md (the so400m-shaped cases are marked slow):

    python -m pytest -q -p no:cacheprovider tests/encoders/test_benchmarks.py -m "slow or not slow" \
        --benchmark-enable --benchmark-columns=min,mean,rounds -s

Each multi-scale case also prints the share of its forward spent outside the base encoder (stitching, area
interpolation, concatenation, splitting), both parts timed directly, best of several runs (the benchmarks'
shared ``time_call``). One thread (``torch.set_num_threads(1)``) keeps the figures steady on a shared machine.
"""

import io

import pytest
import torch
from PIL import Image

from nvila.core.specs import build
from nvila.workflows.bench.measure import time_call
from tests.encoders.images import noise_image

TINY_BASE = {"name": "siglip", "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
             "num_layers": 3, "num_heads": 2, "feature_layer": -2}
SO400M_BASE = {"name": "siglip", "image_size": 448, "patch_size": 14, "hidden_size": 1152,
               "intermediate_size": 4304, "num_layers": 2, "num_heads": 16, "feature_layer": -1}  # depth cut to 2


def encoders(base):
    tile = base["image_size"]
    scales = [tile, 2 * tile, 3 * tile]
    return {"plain": dict(base),
            "s2": {"name": "s2", "base": dict(base), "scales": scales, "output_scale": -1},
            "dyns2": {"name": "dyns2", "base": dict(base), "scales": scales, "max_tiles": 12}}


CASES = [pytest.param(preset, mode, marks=[pytest.mark.slow] if preset == "so400m-depth2" else [])
         for preset in ("tiny", "so400m-depth2") for mode in ("plain", "s2", "dyns2")]


def outside_share(encoder, pixels, grids, repeats=3):
    """Share of a multi-scale forward spent outside the base encoder: stitching, interpolation, concatenation,
    splitting, timed directly (best of ``repeats``) against the base encoder on all tiles."""
    counts = encoder.tile_counts(pixels.shape[0], grids)
    features = encoder.encode_tiles(pixels)
    inner = time_call(lambda: encoder.encode_tiles(pixels), repeats, warmup=0).best
    outer = time_call(lambda: encoder.assemble(features, counts, grids), repeats, warmup=0).best
    return outer / (inner + outer)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("preset,mode", CASES)
def test_encoder_images_per_second(benchmark, one_thread, preset, mode):
    torch.manual_seed(0)
    base = TINY_BASE if preset == "tiny" else SO400M_BASE
    encoder = build("encoder", encoders(base)[mode]).eval()
    image = noise_image(base["image_size"] * 4, base["image_size"] * 9 // 4)  # 16:9 -> 3 x 4 tiles at 3x
    prepared = encoder.processor()(image)
    with torch.no_grad():
        rounds = 5 if preset == "tiny" else 2
        blocks = benchmark.pedantic(encoder, args=(prepared.pixels, [prepared.grid]), rounds=rounds, iterations=1)
    assert blocks.shape[0] == prepared.grid[0] * prepared.grid[1]
    if benchmark.enabled:
        with torch.no_grad():
            share = outside_share(encoder, prepared.pixels, [prepared.grid], rounds) if mode != "plain" else 0.0
        benchmark.extra_info.update(tiles=prepared.pixels.shape[0], outside_forward=share)
        print(f"\n{preset} {mode}: {prepared.pixels.shape[0]} tiles, {1 / benchmark.stats['min']:.2f} images/s, "
              f"{share:.1%} of the forward outside the base encoder")


@pytest.mark.parametrize("mode", ["plain", "dyns2"])
def test_preprocessing_images_per_second(benchmark, one_thread, mode):
    """Decode a 1920x1080 JPEG, resize, tile and normalise it for 448 px tiles, in one worker."""
    with torch.device("meta"):  # preprocessing needs the encoder's settings, not its weights
        processor = build("encoder", encoders(SO400M_BASE)[mode]).processor()
    buf = io.BytesIO()
    noise_image(1920, 1080).save(buf, "JPEG", quality=90)
    data = buf.getvalue()

    def preprocess():
        image = Image.open(io.BytesIO(data))
        image.load()
        return processor(image)
    prepared = benchmark.pedantic(preprocess, rounds=5, iterations=1)
    assert prepared.pixels.shape[-1] == 448
    if benchmark.enabled:
        print(f"\npreprocess {mode}: {prepared.pixels.shape[0]} tiles, {1 / benchmark.stats['min']:.1f} images/s")
