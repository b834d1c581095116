"""The test kit's pruner checks catch pruners that break the contract."""

from dataclasses import dataclass

import pytest
import torch

from nvila.core.pruning import Pruner
from nvila.core.registry import Registry
from nvila.core.testing import ContractError, check_component


@dataclass
class NoConfig:
    """No settings."""


class BatchDependent(Pruner):
    """Scores each sample by its rank within the batch: a score that changes with the batch mates."""

    def __init__(self, config: NoConfig) -> None:
        pass

    def score(self, batch, models):
        return torch.arange(len(batch.ids), dtype=torch.float32)


class WrongShape(BatchDependent):
    def score(self, batch, models):
        return torch.zeros(len(batch.ids), 2)


@pytest.mark.parametrize("factory, message", [(BatchDependent, "batch mates"), (WrongShape, r"\(B,\) float")])
def test_the_kit_rejects_broken_pruners(registry, factory, message):
    mine = Registry()
    mine._components = dict(registry._components)  # the built-in components the kit builds tiny models from
    registrar = mine.registrar("broken-pruner", "0.1")
    registrar.add("pruner", "broken", factory, NoConfig)
    registrar.commit()
    with pytest.raises(ContractError, match=message):
        check_component(mine.get("pruner", "broken"), mine)
