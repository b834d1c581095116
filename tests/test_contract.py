"""Every registered component meets its kind's contract (the public test kit, run on our own plugins)."""

import pytest

from nvila.core.plugins import load_plugins
from nvila.core.testing import check_component

COMPONENTS = list(load_plugins(strict=True).registry)


@pytest.mark.parametrize("component", COMPONENTS, ids=[f"{c.kind}:{c.name}" for c in COMPONENTS])
def test_component_meets_its_contract(component, registry):
    check_component(component, registry)
