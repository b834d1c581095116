"""The loader and the test kit against fake third-party distributions placed on sys.path (no install needed).

Where it matters, the failure cases run through the real ``nvila`` command, with the fake
distributions on its PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nvila.core.errors import NvilaError, PluginLoadError
from nvila.core.model import NvilaModel
from nvila.core.plugins import load_plugins
from nvila.core.testing import CHECKS, ContractError, check_distribution

ROOT = Path(__file__).resolve().parents[2]

GOOD_PLUGIN = '''
from dataclasses import dataclass
from nvila.core import hookimpl
from nvila.compressors.identity import IdentityCompressor

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


# A compressor with a switchable defect; {name} is its registry name.
COMPRESSOR_PLUGIN = '''
from dataclasses import dataclass
from nvila.core import hookimpl
from nvila.core.interfaces import Compressor

@dataclass
class FlatConfig:
    """Flattening settings."""
    {field}

class Flat({base}):
    """Flattens each block; the defect under test is in {where}."""
    def __init__(self, config, in_channels=None):
        super().__init__()
    def output_shape(self, block_size, channels):
        return block_size[0] * block_size[1], channels
    def forward(self, blocks):
        return {forward}

@hookimpl
def nvila_register(registry):
    registry.add("compressor", "{name}", Flat, FlatConfig)
'''
SOUND = {"field": "scale: float = 1.0", "base": "Compressor", "forward": "blocks.flatten(1, 2) * 1.0",
         "where": "nothing"}
DROPS_A_TOKEN = {**SOUND, "forward": "blocks.flatten(1, 2)[:, 1:]", "where": "forward (one token short)"}


def compressor_plugin(name: str, **defect: str) -> str:
    return COMPRESSOR_PLUGIN.format(name=name, **{**SOUND, **defect})


@pytest.mark.parametrize("defect, check, detail", [
    (DROPS_A_TOKEN, "token accounting", "forward gave (2, 35, 8) but output_shape promised (2, 36, 8)"),
    ({"forward": "blocks.flatten(0, 2)"}, "shape contract", "forward gave (72, 8); a compressor returns"),
    ({"forward": "blocks.nonexistent()"}, "forward on tiny CPU inputs", "AttributeError"),
    ({"base": "torch.nn.Module"}, "interface", "must subclass Compressor"),
    ({"field": "scale: float"}, "config defaults", "TypeError"),
], ids=["drops-a-token", "wrong-rank", "forward-raises", "no-interface", "no-default"])
def test_the_kit_names_the_failed_check_the_component_and_its_distribution(site, defect, check, detail):
    source = "import torch\n" + compressor_plugin("flat", **defect)
    fake_distribution(site, "flatplug", "flat", f"flatplug_{check.replace(' ', '_').replace('-', '_')}", source)
    with pytest.raises(ContractError) as failure:
        check_distribution("flatplug")
    message = str(failure.value)
    assert message.startswith(f"compressor 'flat' from flatplug 0.2 failed the '{check}' check: "), message
    assert detail in message
    assert failure.value.check == check and failure.value.component.distribution == "flatplug"
    assert check in CHECKS  # every check a failure can name is documented


def test_the_kit_lists_every_broken_component_of_a_distribution(site):
    source = compressor_plugin("short-a", **DROPS_A_TOKEN).replace(
        '    registry.add("compressor", "short-a", Flat, FlatConfig)',
        '    registry.add("compressor", "short-a", Flat, FlatConfig)\n'
        '    registry.add("compressor", "short-b", Flat, FlatConfig)')
    fake_distribution(site, "twoplug", "two", "twoplug_mod", source)
    with pytest.raises(ContractError, match=r"2 of 2 components from twoplug broke their contracts:\n"
                                            r"  - compressor 'short-a' .*\n  - compressor 'short-b' "):
        check_distribution("twoplug")


def test_the_kit_reports_a_distribution_that_failed_to_load(site):
    fake_distribution(site, "brokenplug", "aaa-broken", "brokenplug_kit", "import not_a_module_anywhere\n")
    with pytest.raises(ContractError, match="from brokenplug 0.2 was not loaded: ModuleNotFoundError"):
        check_distribution("brokenplug")


def test_another_packages_broken_plugin_does_not_fail_the_kit(site):
    fake_distribution(site, "brokenplug", "aaa-broken", "brokenplug_other", "import not_a_module_anywhere\n")
    fake_distribution(site, "soundplug", "sound", "soundplug_mod", compressor_plugin("sound"))
    assert check_distribution("soundplug") == ["compressor:sound"]


def test_a_disabled_distribution_is_named_not_silently_empty(site, monkeypatch):
    fake_distribution(site, "soundplug", "sound", "soundplug_disabled", compressor_plugin("sound"))
    monkeypatch.setenv("NVILA_DISABLE_PLUGINS", "soundplug")
    with pytest.raises(ContractError, match="soundplug is disabled by NVILA_DISABLE_PLUGINS"):
        check_distribution("soundplug")


def test_a_pruner_that_is_not_a_pruner_is_reported_by_the_kit(site):
    source = textwrap.dedent('''
        from dataclasses import dataclass
        from nvila.core import hookimpl

        @dataclass
        class KeepAllConfig:
            """Keeps every sample."""
            fraction: float = 1.0

        def keep_all(config):
            """Keeps every sample."""
            return config

        @hookimpl
        def nvila_register(registry):
            registry.add("pruner", "keep-all", keep_all, KeepAllConfig)
    ''')
    fake_distribution(site, "pruneplug", "prune", "pruneplug_mod", source)
    with pytest.raises(ContractError, match="pruner 'keep-all' from pruneplug 0.2 failed the 'interface' check: "
                                            "a pruner must subclass nvila.core.pruning.Pruner"):
        check_distribution("pruneplug")


def test_a_model_built_with_a_shape_breaking_compressor_names_its_distribution(site, tiny_spec):
    fake_distribution(site, "shapeplug", "shape", "shapeplug_model", compressor_plugin("drop-one", **DROPS_A_TOKEN))
    loaded = load_plugins()
    assert not loaded.failures  # it loads: only running it shows the defect
    model = NvilaModel({**tiny_spec, "compressor": {"name": "drop-one"}}, loaded.registry)
    with pytest.raises(NvilaError, match=r"compressor 'drop-one' from shapeplug 0.2 broke its shape contract: "
                                         r"blocks \(1, 4, 4, 32\) became tokens \(1, 15, 32\), but its "
                                         r"output_shape promised \(M, 16, 32\)"):
        model.visual_tokens(torch.zeros(1, 3, 32, 32), [(1, 1)])


def every_kind_of_broken_plugin(site: Path) -> dict[str, str]:
    """Fake distributions with each failure of issue 7 on ``site``; the environment that puts them on the path."""
    fake_distribution(site, "brokenplug", "aaa-broken", "brokenplug_cli", "import not_a_module_anywhere\n")
    fake_distribution(site, "clashplug", "clash", "clashplug_cli", GOOD_PLUGIN.format(name="stc"))
    fake_distribution(site, "sigplug", "sig", "sigplug_cli", GOOD_PLUGIN.format(name="echo").replace(
        "def nvila_register(registry):", "def nvila_register(registry, extra):"))
    fake_distribution(site, "shapeplug", "shape", "shapeplug_cli", compressor_plugin("drop-one", **DROPS_A_TOKEN))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVILA_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def nvila(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nvila.workflows", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_nvila_plugins_names_each_broken_distribution_and_lists_the_rest(site):
    out = nvila("plugins", env=every_kind_of_broken_plugin(site))
    assert out.returncode == 0, out.stderr
    failed = [line for line in out.stdout.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 3, out.stdout
    assert ("failed: plugin 'aaa-broken' from brokenplug 0.2 was not loaded: ModuleNotFoundError: "
            "No module named 'not_a_module_anywhere'") in failed
    assert any("from clashplug 0.2" in f and "by nvila 0.1.0 and by clashplug 0.2" in f for f in failed)
    assert any("from sigplug 0.2" in f and "extra" in f for f in failed)
    assert "WARNING nvila.core.plugins: plugin 'aaa-broken' from brokenplug 0.2 was not loaded" in out.stderr
    listed = out.stdout.split("failed: ")[0]
    assert "stc " in listed and "qwen2 " in listed and "drop-one " in listed and "shapeplug 0.2" in listed


def test_strict_mode_stops_nvila_with_one_paragraph_naming_the_distribution(site):
    env = every_kind_of_broken_plugin(site)
    out = nvila("plugins", env={**env, "NVILA_STRICT_PLUGINS": "1"})
    assert out.returncode == 2
    assert out.stderr.startswith("nvila: error: plugin 'aaa-broken' from brokenplug 0.2 was not loaded: "
                                 "ModuleNotFoundError"), out.stderr
    assert "NVILA_STRICT_PLUGINS is set" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow  # over 5 s on an AVX2 core: the default run stays under 5 minutes; CI runs it
def test_training_runs_while_broken_plugins_are_installed(site, tmp_path, tiny_fit_args):
    out = nvila(*tiny_fit_args(tmp_path, steps=2), env=every_kind_of_broken_plugin(site))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "plugin 'aaa-broken' from brokenplug 0.2 was not loaded" in out.stderr
    assert "from sigplug 0.2 was not loaded" in out.stderr
    (metrics,) = tmp_path.rglob("metrics.csv")
    assert "train/loss" in metrics.read_text()
    assert list(tmp_path.rglob("checkpoint/model.safetensors"))


# -- a third-party plugin that registers its factory lazily -------------------------------------------------------
LAZY_PLUGIN = '''
from dataclasses import dataclass
from nvila.core import hookimpl
from nvila.core.registry import lazy

@dataclass
class LazyFlatConfig:
    """Flattens each block, imported only when built."""
    scale: float = 1.0

@hookimpl
def nvila_register(registry):
    registry.add("compressor", "{name}", lazy("{impl}", "{attribute}"), LazyFlatConfig)
'''
LAZY_IMPL = '''
from nvila.core.interfaces import Compressor

class Flat(Compressor):
    """Flattens each block."""
    def __init__(self, config, in_channels=None):
        super().__init__()
    def output_shape(self, block_size, channels):
        return block_size[0] * block_size[1], channels
    def forward(self, blocks):
        return blocks.flatten(1, 2) * 1.0
'''


def lazy_distribution(site: Path, dist: str, name: str, attribute: str = "Flat", impl_source: str = LAZY_IMPL) -> str:
    """A fake distribution whose plugin module registers ``lazy("<dist>_impl", attribute)``; returns that module."""
    impl = f"{dist}_impl"
    (site / f"{impl}.py").write_text(impl_source)
    fake_distribution(site, dist, name, f"{dist}_plugin", LAZY_PLUGIN.format(name=name, impl=impl,
                                                                             attribute=attribute))
    return impl


def test_a_lazy_third_party_factory_is_listed_without_import_and_passes_the_kit(site):
    impl = lazy_distribution(site, "lazyplug", "lazy-flat")
    loaded = load_plugins()
    component = loaded.registry.get("compressor", "lazy-flat")
    assert component.summary == "Flattens each block, imported only when built." and impl not in sys.modules
    assert check_distribution("lazyplug") == ["compressor:lazy-flat"]  # the kit builds it, which imports it
    assert impl in sys.modules


def test_the_kit_reports_a_lazy_factory_that_fails_to_import(site):
    lazy_distribution(site, "lazybroken", "lazy-broken", impl_source="import not_a_module_anywhere\n")
    with pytest.raises(ContractError, match=r"compressor 'lazy-broken' from lazybroken 0.2 failed the 'build from "
                                            r"defaults' check: PluginLoadError: .*ModuleNotFoundError"):
        check_distribution("lazybroken")


def test_a_model_spec_resolves_lazy_factories_when_the_model_is_built(site, tiny_spec):
    impl = lazy_distribution(site, "lazymodel", "lazy-model")
    loaded = load_plugins()
    assert impl not in sys.modules
    model = NvilaModel({**tiny_spec, "compressor": {"name": "lazy-model"}}, loaded.registry)
    assert type(model.compressor).__module__ == impl
    tokens = model.visual_tokens(torch.zeros(1, 3, 32, 32), [(1, 1)])
    assert tokens.shape == (16, tiny_spec["llm"]["hidden_size"])  # one 4 x 4 block of patches, flattened


def test_building_a_lazy_factory_that_fails_names_its_distribution(site, tiny_spec):
    lazy_distribution(site, "lazyattr", "lazy-attr", attribute="NoSuchClass")
    loaded = load_plugins()
    with pytest.raises(PluginLoadError, match=r"compressor 'lazy-attr' from lazyattr 0.2 could not be built: "
                                              r"importing its factory lazyattr_impl.NoSuchClass failed"):
        NvilaModel({**tiny_spec, "compressor": {"name": "lazy-attr"}}, loaded.registry)
