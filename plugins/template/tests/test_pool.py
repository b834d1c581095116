"""What the contract cannot know: the component computes the right thing."""

import torch

from nvila_myplugin.pool import AveragePool, AveragePoolConfig


def test_pools_each_window_to_its_mean():
    blocks = torch.arange(2 * 3 * 3 * 1, dtype=torch.float32).reshape(2, 3, 3, 1)  # (M, h, w, C)
    tokens = AveragePool(AveragePoolConfig(stride=2))(blocks)  # (M, 4, 1)
    assert tokens[0, :, 0].tolist() == [(0 + 1 + 3 + 4) / 4, (2 + 5) / 2, (6 + 7) / 2, 8.0]
