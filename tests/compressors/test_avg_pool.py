import pytest
import torch

from nvila.compressors.avg_pool import AveragePool, AvgPoolConfig
from nvila.core.errors import SpecError
from nvila.core.specs import build


def reference_pool(grid: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of each k x k window, row by row; edge windows average only the features they cover."""
    m, h, w, c = grid.shape
    tokens = [grid[:, i:i + k, j:j + k].mean(dim=(1, 2)) for i in range(0, h, k) for j in range(0, w, k)]
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("k,h,w", [(2, 4, 4), (2, 5, 7), (3, 7, 5), (3, 9, 9), (1, 3, 2)])
def test_pools_each_window_and_averages_partial_edge_windows_over_what_they_cover(k, h, w):
    grid = torch.randn(2, h, w, 6)
    out = AveragePool(AvgPoolConfig(ratio=k))(grid)
    torch.testing.assert_close(out, reference_pool(grid, k))
    assert (out.shape[1], out.shape[2]) == AveragePool(AvgPoolConfig(ratio=k)).output_shape((h, w), 6)


def test_a_constant_grid_stays_constant_at_the_edges():
    out = AveragePool(AvgPoolConfig(ratio=3))(torch.full((1, 5, 5, 2), 7.0))
    assert torch.all(out == 7.0), "edge windows must not be diluted by zero padding"


@pytest.mark.parametrize("ratio", [0, -2])
def test_zero_or_negative_ratio_is_refused_naming_the_key_and_range(registry, ratio):
    with pytest.raises(SpecError, match=r"key 'ratio' = -?\d+ is out of range.*valid range 1\.\."):
        build("compressor", {"name": "avg-pool", "ratio": ratio}, registry, in_channels=4)


def test_ratio_larger_than_the_grid_is_refused_naming_the_valid_range():
    with pytest.raises(ValueError, match=r"key 'ratio' = 5 is larger than the 4x6 feature grid; valid range 1..4"):
        AveragePool(AvgPoolConfig(ratio=5)).output_shape((4, 6), 8)
