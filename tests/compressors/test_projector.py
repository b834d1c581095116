import torch
from torch import nn

from nvila.compressors.projector import (
    MLP3x3ProjectorConfig,
    mlp_3x3_projector,
    vila_projector_export,
    vila_projector_state_dict,
)
from nvila.compressors.stc import SpatialToChannel, STCConfig


def test_3x3_projector_has_nvilas_layers_in_nvilas_order():
    c, d = 4, 10
    layers = [(type(m).__name__, getattr(m, "normalized_shape", None) or
               (getattr(m, "in_features", None), getattr(m, "out_features", None)))
              for m in mlp_3x3_projector(MLP3x3ProjectorConfig(), in_dim=9 * c, out_dim=d)]
    assert layers == [("LayerNorm", (9 * c,)), ("Linear", (9 * c, 3 * c)), ("GELU", (None, None)),
                      ("LayerNorm", (3 * c,)), ("Linear", (3 * c, d)), ("GELU", (None, None)),
                      ("Linear", (d, d))]


def vila_3x3_projector(c: int, d: int) -> nn.Sequential:
    """The layer list of NVILA's ``mlp_downsample_3x3_fix``, with an Identity where its downsample block sits."""
    return nn.Sequential(nn.Identity(), nn.LayerNorm(9 * c), nn.Linear(9 * c, 3 * c), nn.GELU(),
                         nn.LayerNorm(3 * c), nn.Linear(3 * c, d), nn.GELU(), nn.Linear(d, d))


def test_released_3x3_projector_weights_load_and_give_the_same_tokens():
    torch.manual_seed(0)
    c, d = 4, 10
    vila = vila_3x3_projector(c, d)
    released = {f"mm_projector.layers.{k}": v for k, v in vila.state_dict().items()}
    released["llm.model.embed_tokens.weight"] = torch.zeros(3, 3)  # other parts of a checkpoint are skipped
    ours = mlp_3x3_projector(MLP3x3ProjectorConfig(), in_dim=9 * c, out_dim=d)
    ours.load_state_dict(vila_projector_state_dict(released), strict=True)
    tokens = SpatialToChannel(STCConfig(ratio=3))(torch.randn(2, 7, 8, c))  # (M, n, 9C)
    torch.testing.assert_close(ours(tokens), vila(tokens))


def test_released_projector_file_keys_load_with_the_default_prefix():
    """A released mm_projector/model.safetensors stores layers.N.* (NVILA's save strips 'mm_projector.')."""
    torch.manual_seed(0)
    c, d = 4, 10
    vila = vila_3x3_projector(c, d)
    released_file = {f"layers.{k}": v for k, v in vila.state_dict().items()}
    ours = mlp_3x3_projector(MLP3x3ProjectorConfig(), in_dim=9 * c, out_dim=d)
    ours.load_state_dict(vila_projector_state_dict(released_file), strict=True)
    tokens = SpatialToChannel(STCConfig(ratio=3))(torch.randn(2, 7, 8, c))  # (M, n, 9C)
    torch.testing.assert_close(ours(tokens), vila(tokens))
    assert vila_projector_export(ours.state_dict()).keys() == released_file.keys()
