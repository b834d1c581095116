import sys
from dataclasses import dataclass

import pytest

from nvila.core.errors import NvilaError, PluginLoadError
from nvila.core.registry import Registry, lazy


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


# -- lazy factories: registered by module and name, imported on the first build ---------------------------------
LAZY_MODULE = '''
IMPORTS = []
IMPORTS.append(1)

def make(config):
    """The factory's own docstring, which a lazy registration never reads for the listing."""
    return ("built", config)

not_callable = 3
'''


@dataclass
class LazyCfg:
    """A summary from the config's docstring.

    More detail that the listing leaves out."""

    size: int = 1


@pytest.fixture
def lazy_module(tmp_path, monkeypatch):
    """A module ``lazy_target_<n>`` on sys.path that counts its own imports; its name is unique per test."""
    name = f"lazy_target_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(LAZY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_lazy_factory_is_imported_on_first_use_only_and_then_kept(lazy_module):
    registry = Registry()
    r = registry.registrar("lazydist", "1.0")
    r.add("compressor", "later", lazy(lazy_module, "make"), LazyCfg)
    r.commit()
    component = registry.get("compressor", "later")
    assert component.is_lazy and lazy_module not in sys.modules  # registering and listing import nothing
    assert component.summary == "A summary from the config's docstring."
    assert lazy_module not in sys.modules
    factory = component.factory
    assert factory(LazyCfg()) == ("built", LazyCfg())
    assert component.factory is factory and sys.modules[lazy_module].IMPORTS == [1]


def test_a_summary_given_at_registration_wins_and_eager_factories_keep_their_docstring(lazy_module):
    registry = Registry()
    r = registry.registrar("d", "1")
    r.add("compressor", "given", lazy(lazy_module, "make"), LazyCfg, summary="Given here.\nNot this line.")
    r.add("compressor", "eager", make_documented, LazyCfg)
    r.commit()
    assert registry.get("compressor", "given").summary == "Given here."
    assert registry.get("compressor", "eager").summary == "An eager factory's docstring."
    assert not registry.get("compressor", "eager").is_lazy


def make_documented(config):
    """An eager factory's docstring."""
    return config


def test_a_lazy_factory_whose_module_is_missing_is_refused_at_registration():
    with pytest.raises(NvilaError, match=r"lazy factory no_such_module_anywhere\.make is not installed"):
        Registry().registrar("d", "1").add("compressor", "x", lazy("no_such_module_anywhere", "make"), Cfg)


@pytest.mark.parametrize("attribute, message", [
    ("no_such_name", r"importing its factory .*\.no_such_name failed with AttributeError"),
    ("not_callable", r"its factory .*\.not_callable is 3, which is not callable"),
])
def test_a_lazy_factory_that_cannot_be_resolved_names_the_component_and_distribution(lazy_module, attribute,
                                                                                      message):
    registry = Registry()
    r = registry.registrar("brokendist", "0.3")
    r.add("compressor", "later", lazy(lazy_module, attribute), LazyCfg)
    r.commit()
    with pytest.raises(PluginLoadError, match=r"compressor 'later' from brokendist 0\.3 could not be built: "
                                              + message):
        _ = registry.get("compressor", "later").factory


def test_a_lazy_factory_whose_module_fails_on_import_names_the_distribution(tmp_path, monkeypatch):
    (tmp_path / "lazy_raises_on_import.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry()
    r = registry.registrar("brokendist", "0.3")
    r.add("encoder", "later", lazy("lazy_raises_on_import", "Encoder"), LazyCfg)
    r.commit()
    with pytest.raises(PluginLoadError, match=r"encoder 'later' from brokendist 0\.3 could not be built: .*"
                                              r"ModuleNotFoundError.*Reinstall brokendist"):
        _ = registry.get("encoder", "later").factory


@pytest.mark.parametrize("module, attribute", [("", "make"), ("a.b", "not a name"), ("a/b", "make")])
def test_lazy_takes_a_dotted_module_name_and_an_attribute_name(module, attribute):
    with pytest.raises(NvilaError, match="dotted import name"):
        lazy(module, attribute)


def test_every_builtin_is_registered_lazily_with_a_real_summary(registry):
    builtins = [c for c in registry if c.distribution == "nvila"]
    assert builtins and all(c.is_lazy for c in builtins)
    for c in builtins:
        assert c.summary and not c.summary.endswith(("settings.", "settings")), c.origin
