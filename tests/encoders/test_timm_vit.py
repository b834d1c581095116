"""timm ViT encoder: the chosen block's patch features, local safetensors weights, timm's normalisation."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from nvila.core.errors import NvilaError
from nvila.core.specs import build
from nvila.encoders.timm_vit import TimmViTConfig, TimmViTEncoder

TINY = dict(image_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)


def full_model(name="vit_tiny_patch16_224"):
    torch.manual_seed(1)
    return timm.create_model(name, pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=3,
                             embed_dim=32, num_heads=2).eval()


@pytest.mark.parametrize("feature_layer,block", [(-2, 1), (-1, 2), (1, 0)])
def test_features_are_the_chosen_blocks_patch_tokens_from_local_weights(tmp_path, feature_layer, block):
    full = full_model()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    encoder = TimmViTEncoder(TimmViTConfig(checkpoint=str(path), feature_layer=feature_layer, **TINY)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = full.forward_intermediates(pixels, indices=[block], intermediates_only=True)[0]  # (2, C, 4, 4)
        got = encoder(pixels, [(1, 1)] * 2)  # (2, 4, 4, C)
    torch.testing.assert_close(got, expected.permute(0, 2, 3, 1))
    assert len(encoder.vit.blocks) == block + 1  # later blocks are pruned


def test_normalisation_comes_from_timms_pretrained_config():
    assert TimmViTEncoder(TimmViTConfig(**TINY)).processor().mean == (0.5, 0.5, 0.5)
    deit = TimmViTEncoder(TimmViTConfig(model="deit_tiny_patch16_224", **TINY)).processor()
    assert deit.mean == tuple(IMAGENET_DEFAULT_MEAN) and deit.std == tuple(IMAGENET_DEFAULT_STD)


def test_a_timm_vit_can_be_the_base_of_dyns2():
    spec = {"name": "dyns2", "scales": [32, 64], "max_tiles": 6, "base": {"name": "timm-vit", **TINY}}
    encoder = build("encoder", spec)
    prepared = encoder.processor()(timm_image())
    with torch.no_grad():
        assert encoder(prepared.pixels, [prepared.grid]).shape == (4, 4, 4, 64)  # 1x4 blocks (3:1 image), two scales


def timm_image():
    from PIL import Image

    return Image.new("RGB", (120, 40), (10, 20, 30))


def test_bad_names_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(NvilaError, match="timm has no model 'vit_tiny_patch16_22'. Did you mean"):
        TimmViTEncoder(TimmViTConfig(model="vit_tiny_patch16_22", **TINY))
    with pytest.raises(NvilaError, match="'resnet18' is not a Vision Transformer"):
        TimmViTEncoder(TimmViTConfig(model="resnet18", image_size=None, patch_size=None, depth=None,
                                     embed_dim=None, num_heads=None))
    path = tmp_path / "other.safetensors"
    save_file({"pos_embed": torch.zeros(1, 5, 32)}, str(path))
    with pytest.raises(NvilaError, match="do not fit 'vit_tiny_patch16_224'.*missing"):
        TimmViTEncoder(TimmViTConfig(checkpoint=str(path), **TINY))
    with pytest.raises(NvilaError, match="not a file"):
        TimmViTEncoder(TimmViTConfig(checkpoint=str(tmp_path / "nowhere.safetensors"), **TINY))
    with pytest.raises(NvilaError, match="feature_layer -4 is out of range"):
        TimmViTEncoder(TimmViTConfig(feature_layer=-4, **TINY))
