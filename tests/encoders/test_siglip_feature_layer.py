import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from nvila.encoders.siglip import SiglipConfig, SiglipEncoder


@pytest.mark.parametrize("feature_layer", [-1, -2, 1])
def test_features_are_the_chosen_hidden_layer_of_the_full_model(feature_layer):
    torch.manual_seed(0)
    encoder = SiglipEncoder(SiglipConfig(num_layers=3, feature_layer=feature_layer))
    torch.manual_seed(0)
    full = SiglipVisionModel(SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                                num_attention_heads=4, image_size=64, patch_size=8,
                                                vision_use_head=False))
    pixels = torch.randn(2, 3, 64, 64)
    expected = full(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]  # (2, 64, C)
    torch.testing.assert_close(encoder(pixels, [(1, 1)] * 2).flatten(1, 2), expected)
    # unused layers are dropped, so every parameter takes part in the loss (DDP needs that)
    assert len(encoder.vision.encoder.layers) == feature_layer % 4


def test_every_layer_gets_contiguous_hidden_states():
    """transformers' patch embedding is a transposed view; kept, every LayerNorm would copy it and every residual add
    walk it strided."""
    encoder = SiglipEncoder(SiglipConfig(num_layers=2))
    seen = []
    for layer in encoder.vision.encoder.layers:
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    encoder(torch.randn(2, 3, 64, 64), [(1, 1)] * 2)
    assert seen == [True] * len(encoder.vision.encoder.layers) and seen
