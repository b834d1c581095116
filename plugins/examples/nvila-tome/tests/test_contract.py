"""The tome compressor meets nvila's contracts: the same checks nvila runs on its own components."""

from nvila.core.testing import check_distribution


def test_meets_the_nvila_contract():
    assert check_distribution("nvila-tome") == ["compressor:tome"]
