"""This package's components meet nvila's contracts: the same checks nvila runs on its own components."""

import torch
from nvila_core.testing import check_distribution

from nvila_myplugin.pool import AveragePool, AveragePoolConfig


def test_meets_the_nvila_contract():
    # builds from defaults, runs on tiny CPU inputs, checks shapes and token accounting, round-trips
    # the config and the state dict; a failure names the check, the component and this distribution
    assert check_distribution("nvila-myplugin") == ["compressor:my-pool"]


def test_pools_each_window_to_its_mean():
    blocks = torch.arange(2 * 3 * 3 * 1, dtype=torch.float32).reshape(2, 3, 3, 1)  # (M, h, w, C)
    tokens = AveragePool(AveragePoolConfig(stride=2))(blocks)  # (M, 4, 1)
    assert tokens[0, :, 0].tolist() == [(0 + 1 + 3 + 4) / 4, (2 + 5) / 2, (6 + 7) / 2, 8.0]
