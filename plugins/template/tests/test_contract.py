"""This package's components meet nvila's contracts: the same checks nvila runs on its own components."""

from nvila.core.testing import check_distribution


def test_meets_the_nvila_contract():
    # builds from defaults, runs on tiny CPU inputs, checks shapes and token accounting, round-trips
    # the config and the state dict; a failure names the check, the component and this distribution
    assert check_distribution("nvila-myplugin") == ["compressor:my-pool"]
