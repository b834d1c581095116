"""Token accounting: every compressor says exactly how many tokens it makes, with every encoder and medium."""

import pytest
import torch
from PIL import Image

from nvila.core.errors import NvilaError
from nvila.core.model import NvilaModel
from nvila.core.plugins import load_plugins
from nvila.core.processor import collate

REGISTRY = load_plugins(strict=True).registry
COMPRESSORS = REGISTRY.names("compressor")
ENCODERS = REGISTRY.names("encoder")
GRIDS = [(2, 2), (3, 5), (7, 7), (8, 8), (13, 4), (27, 27)]


@pytest.mark.parametrize("name", COMPRESSORS)
def test_output_shape_is_exact_for_every_grid(name, registry):
    from nvila.core.specs import build

    compressor = build("compressor", {"name": name}, registry, in_channels=6).eval()
    for h, w in GRIDS:
        with torch.no_grad():
            tokens = compressor(torch.randn(2, h, w, 6))
        assert tuple(tokens.shape) == (2, *compressor.output_shape((h, w), 6)), (name, h, w)


def encoder_spec(name, tiny_spec, image_size):
    """The tiny test encoder at a chosen resolution (odd feature grids), or another encoder's defaults."""
    if name == tiny_spec["encoder"]["name"]:
        return {**tiny_spec["encoder"], "image_size": image_size}
    return {"name": name}


def image(size, seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_every_compressor_works_with_every_encoder_on_images_several_images_and_video(
        compressor, encoder, tiny_spec, registry):
    for image_size in (24, 40):  # 3x3 and 5x5 feature grids for the tiny SigLIP
        spec = {**tiny_spec, "encoder": encoder_spec(encoder, tiny_spec, image_size),
                "compressor": {"name": compressor}, "temporal": {"name": "temporal-average", "group": 2}}
        torch.manual_seed(0)
        model = NvilaModel(spec, registry).eval()
        n, _ = model.compressor.output_shape(model.encoder.block_size, model.encoder.out_channels)
        images = [image((37, 23), 1), image((20, 64), 2), image((50, 50), 3)]
        video = [image((40, 30), 10 + i) for i in range(3)]
        samples = [
            model.processor.encode([{"from": "human", "value": "<image>\nOne?"}], images[:1]),
            model.processor.encode([{"from": "human", "value": "<image><image>\nTwo?"}], images[1:]),
            model.processor.encode([{"from": "human", "value": "<video>\nMoving?"}], videos=[video]),
        ]
        plans = [model.encoder.processor().plan(*im.size) for im in images]
        blocks = [p.grid[0] * p.grid[1] for p in plans]
        assert int((samples[0].input_ids == model.image_token_id).sum()) == blocks[0] * n
        assert int((samples[1].input_ids == model.image_token_id).sum()) == (blocks[1] + blocks[2]) * n
        assert int((samples[2].input_ids == model.video_token_id).sum()) == 2 * n  # ceil(3 / 2) frames
        batch = collate(samples, model.tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(**batch)["logits"]  # embed() checks that tokens and placeholders match
        assert torch.isfinite(logits).all()


def test_stc_3x3_with_nvilas_3x3_projector_builds_and_runs(tiny_spec, registry):
    spec = {**tiny_spec, "encoder": {**tiny_spec["encoder"], "image_size": 56},  # 7x7 features -> 3x3 tokens
            "compressor": {"name": "stc", "ratio": 3}, "projector": {"name": "mlp-3x3"}}
    model = NvilaModel(spec, registry).eval()
    assert model.tokens_per_block == 9
    assert model.projector[1].in_features == 9 * 32 and model.projector[1].out_features == 3 * 32
    enc = model.processor.encode([{"from": "human", "value": "<image>\nWhat?"}], [image((56, 56), 0)])
    with torch.no_grad():
        model(**collate([enc], model.tokenizer.pad_token_id))


def test_a_ratio_larger_than_the_feature_grid_is_refused_when_the_model_is_built(tiny_spec, registry):
    spec = {**tiny_spec, "compressor": {"name": "stc", "ratio": 5}}  # the tiny encoder's grid is 4x4
    with pytest.raises(NvilaError, match=r"model.compressor: compressor 'stc': key 'ratio' = 5 is larger than "
                                         r"the 4x4 feature grid; valid range 1..4"):
        NvilaModel(spec, registry)
