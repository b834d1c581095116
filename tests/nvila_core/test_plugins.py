"""The loader against fake third-party distributions placed on sys.path (no install needed)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from nvila_core.errors import PluginLoadError
from nvila_core.plugins import load_plugins

GOOD_PLUGIN = '''
from dataclasses import dataclass
from nvila_core import hookimpl
from compressors.identity import IdentityCompressor

@dataclass
class EchoConfig:
    """Echo."""

def make(config, in_channels=None):
    """Echo compressor."""
    return IdentityCompressor(config)

@hookimpl
def nvila_register(registry):
    registry.add("compressor", "{name}", make, EchoConfig)
'''


def fake_distribution(site: Path, dist: str, entry_point: str, module: str, source: str | None) -> None:
    """A minimal installed distribution: dist-info with an ``nvila`` entry point, plus its module."""
    info = site / f"{dist}-0.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.2\n")
    (info / "entry_points.txt").write_text(f"[nvila]\n{entry_point} = {module}\n")
    if source is not None:
        (site / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("NVILA_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("NVILA_DISABLE_PLUGINS", raising=False)
    return tmp_path


def test_builtins_are_found_through_our_own_entry_points():
    loaded = load_plugins()
    assert not loaded.failures
    names = {(c.kind, c.name): c.distribution for c in loaded.registry}
    assert names[("compressor", "stc")] == "nvila"
    assert names[("llm", "qwen2")] == "nvila"


def test_a_plugin_that_fails_to_import_is_named_and_the_rest_load(site, caplog):
    # "aaa" sorts first: pluggy's own loader would stop here and load nothing after it
    fake_distribution(site, "brokenplug", "aaa-broken", "brokenplug_mod", "import not_a_module_anywhere\n")
    fake_distribution(site, "goodplug", "zzz-good", "goodplug_mod", GOOD_PLUGIN.format(name="echo"))
    loaded = load_plugins()
    assert [(f.distribution, f.version, f.entry_point) for f in loaded.failures] == [
        ("brokenplug", "0.2", "aaa-broken")]
    assert "ModuleNotFoundError" in loaded.failures[0].error
    assert "brokenplug 0.2" in caplog.text
    assert loaded.registry.get("compressor", "echo").distribution == "goodplug"
    assert loaded.registry.get("compressor", "stc").distribution == "nvila"


def test_strict_mode_makes_a_broken_plugin_fatal(site, monkeypatch):
    fake_distribution(site, "brokenplug", "aaa-broken", "brokenplug_mod", "raise RuntimeError('boom')\n")
    monkeypatch.setenv("NVILA_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="brokenplug 0.2.*RuntimeError: boom"):
        load_plugins()


def test_disabled_plugins_are_not_imported(site, monkeypatch):
    fake_distribution(site, "brokenplug", "aaa-broken", "brokenplug_mod", "raise RuntimeError('boom')\n")
    monkeypatch.setenv("NVILA_DISABLE_PLUGINS", "aaa-broken")
    loaded = load_plugins()
    assert not loaded.failures and loaded.blocked == ["aaa-broken"]


def test_a_clashing_name_is_refused_and_the_original_kept(site):
    fake_distribution(site, "clashplug", "clash", "clashplug_mod", GOOD_PLUGIN.format(name="stc"))
    loaded = load_plugins()
    (failure,) = loaded.failures
    assert failure.distribution == "clashplug"
    assert "by nvila 0.1.0 and by clashplug 0.2" in failure.error
    assert loaded.registry.get("compressor", "stc").distribution == "nvila"


def test_a_hook_with_a_wrong_signature_is_refused(site):
    source = GOOD_PLUGIN.format(name="echo").replace("def nvila_register(registry):",
                                                     "def nvila_register(registry, extra):")
    fake_distribution(site, "sigplug", "sig", "sigplug_mod", source)
    loaded = load_plugins()
    (failure,) = loaded.failures
    assert failure.distribution == "sigplug" and "extra" in failure.error
    assert not loaded.registry.find("echo")


def test_a_mistyped_hook_name_is_an_error_not_silence(site):
    source = GOOD_PLUGIN.format(name="echo").replace("def nvila_register(", "def nvila_registr(")
    fake_distribution(site, "typoplug", "typo", "typoplug_mod", source)
    loaded = load_plugins()
    (failure,) = loaded.failures
    assert failure.distribution == "typoplug" and "nvila_registr" in failure.error


def test_a_hook_that_fails_half_way_leaves_nothing_behind(site):
    source = GOOD_PLUGIN.format(name="echo").replace(
        '    registry.add("compressor", "echo", make, EchoConfig)',
        '    registry.add("compressor", "echo", make, EchoConfig)\n    raise ValueError("half-way")')
    fake_distribution(site, "halfplug", "half", "halfplug_mod", source)
    loaded = load_plugins()
    assert loaded.failures[0].distribution == "halfplug"
    assert not loaded.registry.find("echo")
