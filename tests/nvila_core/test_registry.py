from dataclasses import dataclass

import pytest

from nvila.core.errors import NvilaError
from nvila.core.registry import Registry


@dataclass
class Cfg:
    size: int = 1
    """A size."""


def make(config):
    return config


def test_a_name_registered_twice_is_refused_naming_both_distributions():
    registry = Registry()
    first = registry.registrar("dist-one", "1.0")
    first.add("compressor", "merge", make, Cfg)
    first.commit()
    second = registry.registrar("dist-two", "2.0")
    with pytest.raises(NvilaError, match=r"registered twice: by dist-one 1.0 and by dist-two 2.0"):
        second.add("compressor", "merge", make, Cfg)


def test_the_same_name_may_serve_two_kinds():
    registry = Registry()
    r = registry.registrar("d", "1")
    r.add("compressor", "x", make, Cfg)
    r.add("projector", "x", make, Cfg)
    r.commit()
    assert {c.kind for c in registry.find("x")} == {"compressor", "projector"}


@pytest.mark.parametrize("kind,name,config,message", [
    ("compresor", "ok", Cfg, "unknown kind 'compresor'. Did you mean 'compressor'"),
    ("compressor", "Bad_Name", Cfg, "kebab-case"),
    ("compressor", "ok", dict, "must be a dataclass"),
])
def test_invalid_registrations_are_refused(kind, name, config, message):
    with pytest.raises(NvilaError, match=message):
        Registry().registrar("d", "1").add(kind, name, make, config)


def test_staged_components_are_not_visible_until_committed():
    registry = Registry()
    r = registry.registrar("d", "1")
    r.add("compressor", "x", make, Cfg)
    assert len(registry) == 0
    r.commit()
    assert registry.get("compressor", "x").distribution == "d"


def test_unknown_names_suggest_the_closest_and_list_the_rest(registry):
    with pytest.raises(NvilaError, match=r"Unknown compressor 'sct'\. Did you mean 'stc'\?.*identity, .*stc"):
        registry.get("compressor", "sct")
