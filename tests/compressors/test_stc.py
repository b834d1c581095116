import pytest
import torch

from nvila.compressors.stc import SpatialToChannel, STCConfig


def reference_stc(grid: torch.Tensor, k: int) -> torch.Tensor:
    """NVILA's layout written out by hand: blocks row by row; inside a block, rows then columns."""
    m, h, w, c = grid.shape
    hp, wp = -(-h // k) * k, -(-w // k) * k
    padded = torch.zeros(m, hp, wp, c)
    padded[:, :h, :w] = grid
    tokens = []
    for bi in range(hp // k):
        for bj in range(wp // k):
            parts = [padded[:, bi * k + di, bj * k + dj] for di in range(k) for dj in range(k)]
            tokens.append(torch.cat(parts, dim=-1))
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("k,h,w", [(2, 4, 4), (2, 5, 7), (3, 6, 6), (3, 7, 5), (2, 1, 1)])
def test_matches_nvila_layout_and_zero_pads_far_edges(k, h, w):
    grid = torch.randn(3, h, w, 5)
    out = SpatialToChannel(STCConfig(ratio=k))(grid)
    torch.testing.assert_close(out, reference_stc(grid, k), rtol=0, atol=0)


def test_2x2_matches_nvila_fixed_downsample_block():
    """The view/permute sequence of NVILA's `mlp_downsample_2x2_fix` projector, on a 4x4 grid."""
    x = torch.randn(1, 4, 4, 3)
    n, a, b, c = x.shape
    y = x.view(n, a, b // 2, c * 2).permute(0, 2, 1, 3).reshape(n, b // 2, a // 2, c * 4)
    y = y.permute(0, 2, 1, 3).reshape(n, -1, c * 4)
    torch.testing.assert_close(SpatialToChannel(STCConfig(ratio=2))(x), y, rtol=0, atol=0)


def test_output_shape_reports_padded_token_count():
    stc = SpatialToChannel(STCConfig(ratio=2))
    assert stc.output_shape((32, 32), 1152) == (256, 4608)
    assert stc.output_shape((27, 27), 1152) == (196, 4608)


def test_3x3_matches_nvila_fixed_downsample_block():
    """The padding and view/permute sequence of NVILA's `mlp_downsample_3x3_fix` projector, on a 7x5 grid."""
    x = torch.randn(2, 7, 5, 3)
    n, a, b, c = x.shape
    y = torch.cat([x, torch.zeros(n, 3 - a % 3, b, c)], dim=1)  # pad rows to 9
    y = torch.cat([y, torch.zeros(n, y.shape[1], 3 - b % 3, c)], dim=2)  # pad columns to 6
    n, a, b, c = y.shape
    y = y.reshape(n, a, b // 3, c * 3).permute(0, 2, 1, 3).reshape(n, b // 3, a // 3, c * 9)
    y = y.permute(0, 2, 1, 3).reshape(n, -1, c * 9)
    torch.testing.assert_close(SpatialToChannel(STCConfig(ratio=3))(x), y, rtol=0, atol=0)


def test_ratio_larger_than_the_grid_is_refused_naming_the_valid_range():
    with pytest.raises(ValueError, match=r"key 'ratio' = 4 is larger than the 3x3 feature grid; valid range 1..3"):
        SpatialToChannel(STCConfig(ratio=4)).output_shape((3, 3), 8)
