"""SigLIP from a local Hugging Face directory: its weights and its preprocessor's normalisation."""

import json

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from nvila.core.errors import NvilaError
from nvila.encoders.siglip import SiglipConfig, SiglipEncoder


def test_weights_and_normalisation_come_from_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, image_size=32, patch_size=8,
                                                 vision_use_head=False)).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                   "image_std": [0.4, 0.5, 0.6]}))
    encoder = SiglipEncoder(SiglipConfig(checkpoint=str(tmp_path), feature_layer=-2)).eval()
    assert encoder.processor().mean == (0.1, 0.2, 0.3) and encoder.processor().std == (0.4, 0.5, 0.6)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(encoder(pixels, [(1, 1)]).flatten(1, 2), expected)


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(NvilaError, match="Cannot load SigLIP weights"):
        SiglipEncoder(SiglipConfig(checkpoint=str(tmp_path / "nothing")))
