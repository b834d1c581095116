"""A plugin author's journey, for real: pip-install the template and the example package (nvila-tome),
see them in `nvila plugins`, run their own test suites (nvila's public test kit), train with tome named
in a YAML spec, and uninstall.

Where they are installed: a throwaway virtual environment layered on the running one (its ``.pth`` file
runs ``site.addsitedir`` on the running interpreter's site-packages, so torch, nvila and pip come from
there). pip installs into it and uninstalls from it for real (build backend, dist-info, entry points,
RECORD), while the environment the test process and other concurrent test runs share never sees the
plugins, not even half-installed. Sources are copied first so builds write nothing into the repository.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import site as site_module
import subprocess
import sys
import venv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from nvila.core.plugins import load_plugins
from nvila.core.specs import describe
from tests.test_cli import MODULES_AT_EXIT, modules_of

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "plugins" / "template"
TOME = ROOT / "plugins" / "examples" / "nvila-tome"


@dataclass
class PluginEnv:
    """A virtual environment on top of the running one, where plugin packages are pip-installed."""

    root: Path
    python: Path
    site: Path
    env: dict[str, str]

    @classmethod
    def create(cls, root: Path) -> PluginEnv:
        venv.EnvBuilder(with_pip=False).create(root / "venv")
        python = root / "venv" / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
        site = Path(subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
        shared = "; ".join(f"site.addsitedir({p!r})" for p in site_module.getsitepackages())
        (site / "_nvila_shared_env.pth").write_text(f"import site; {shared}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("NVILA_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        return cls(root, python, site, env)

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.python), *args], capture_output=True, text=True, env=self.env, cwd=cwd,
                              timeout=300)

    def pip_install(self, *folders: Path) -> list[Path]:
        """``pip install`` copies of local package folders, offline; returns the copies."""
        copies = [shutil.copytree(folder, self.root / "src" / folder.name, ignore=shutil.ignore_patterns(
            "build", "*.egg-info", "__pycache__", ".pytest_cache")) for folder in folders]
        out = self.run("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", *map(str, copies))
        assert out.returncode == 0, out.stdout + out.stderr
        return copies

    def pip_uninstall(self, *distributions: str) -> None:
        out = self.run("-m", "pip", "uninstall", "-y", *distributions)
        assert out.returncode == 0, out.stdout + out.stderr
        for distribution in distributions:
            assert f"Successfully uninstalled {distribution}" in out.stdout, out.stdout

    def entry_points(self) -> dict[str, str]:
        """What nvila's loader will find in this environment: ``{entry point: distribution}`` (no torch import)."""
        out = self.run("-c", "import json; from importlib.metadata import entry_points; "
                             "from nvila.core.plugins import GROUP; "
                             "print(json.dumps({ep.name: ep.dist.name for ep in entry_points(group=GROUP)}))")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def nvila(self, *args: str) -> subprocess.CompletedProcess:
        return self.run("-m", "nvila.workflows", *args)

    def pytest(self, package: Path) -> subprocess.CompletedProcess:
        """The package's own test suite, run the way its author runs it: ``pytest`` in its folder."""
        return self.run("-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", cwd=package)


def listed(stdout: str, name: str) -> str | None:
    """The distribution and version `nvila plugins` shows beside component ``name``, or None."""
    match = re.search(rf"^  {re.escape(name)} +(\S+ \S+) ", stdout, re.MULTILINE)
    return match.group(1) if match else None


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Iterator[tuple[PluginEnv, dict[str, Path]]]:
    """The template and nvila-tome pip-installed in a plugin environment, with their source copies."""
    env = PluginEnv.create(tmp_path_factory.mktemp("plugin-env"))
    template, tome = env.pip_install(TEMPLATE, TOME)
    yield env, {"nvila-myplugin": template, "nvila-tome": tome}
    env.pip_uninstall("nvila-myplugin", "nvila-tome")
    shutil.rmtree(env.root, ignore_errors=True)


def test_nvila_plugins_lists_them_with_distribution_and_version(installed, monkeypatch):
    env, _ = installed
    out = env.nvila("plugins")
    assert out.returncode == 0, out.stderr
    assert listed(out.stdout, "tome") == "nvila-tome 0.1.0", out.stdout
    assert listed(out.stdout, "my-pool") == "nvila-myplugin 0.1.0"
    assert listed(out.stdout, "stc") == "nvila 0.1.0" and "failed:" not in out.stdout

    # `--describe` reads the attribute docstrings from the installed source files
    monkeypatch.syspath_prepend(str(env.site))
    try:
        text = describe(load_plugins(strict=True).registry.get("compressor", "tome"))
    finally:  # leave the test process as it was: no plugin modules imported
        for name in [m for m in sys.modules if m.partition(".")[0] in ("nvila_tome", "nvila_myplugin")]:
            del sys.modules[name]
    assert text.startswith("compressor 'tome' from nvila-tome 0.1.0")
    assert "merge_fraction: float = 0.5" in text and "re-match" in text


def test_the_templates_lazy_factory_is_not_imported_by_the_listing(installed):
    env, _ = installed
    out = env.run("-c", MODULES_AT_EXIT, "plugins", "--describe", "my-pool")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "k x k average pooling of each feature block" in out.stdout and "stride: int = 2" in out.stdout
    imported = modules_of(out)
    assert {"nvila_myplugin.plugin", "nvila_myplugin.configs"} <= imported
    assert "nvila_myplugin.pool" not in imported  # registered as lazy("nvila_myplugin.pool", "AveragePool")


@pytest.mark.slow  # over 5 s on an AVX2 core: the default run stays under 5 minutes; CI runs it
@pytest.mark.parametrize("distribution, own_test", [
    ("nvila-myplugin", "test_pools_each_window_to_its_mean"),
    ("nvila-tome", "test_size_weighted_merges_are_means_of_the_originals"),
])
def test_each_package_passes_its_own_suite_which_runs_the_test_kit(installed, distribution, own_test):
    env, sources = installed
    suite = env.pytest(sources[distribution])
    assert suite.returncode == 0, suite.stdout[-3000:] + suite.stderr[-3000:]
    assert "PASSED tests/test_contract.py::test_meets_the_nvila_contract" in suite.stdout, suite.stdout
    assert f"::{own_test}" in suite.stdout


def test_pip_uninstall_removes_a_plugin_from_what_nvila_finds(tmp_path):
    env = PluginEnv.create(tmp_path)
    env.pip_install(TEMPLATE)
    assert env.entry_points()["myplugin"] == "nvila-myplugin"
    env.pip_uninstall("nvila-myplugin")
    found = env.entry_points()
    assert "myplugin" not in found and found["compressors"] == "nvila"


@pytest.mark.slow  # over 5 s on an AVX2 core: the default run stays under 5 minutes; CI runs it
def test_the_demo_recipe_trains_with_tome_named_in_a_yaml_spec(installed, tmp_path, tiny_fit_args):
    env, _ = installed
    spec = tmp_path / "tome.yaml"
    spec.write_text("# the demo recipe with token merging in place of spatial-to-channel\n"
                    "model:\n  compressor: {name: tome, ratio: 4, merge_fraction: 0.5}\n")
    out = env.nvila(*tiny_fit_args(tmp_path / "runs", steps=3, configs=(spec,)))
    assert out.returncode == 0, out.stderr[-3000:]

    (saved,) = (tmp_path / "runs").rglob("checkpoint/spec.yaml")
    assert yaml.safe_load(saved.read_text())["model"]["compressor"] == {
        "name": "tome", "ratio": 4, "merge_fraction": 0.5}
    (metrics,) = (tmp_path / "runs").rglob("metrics.csv")
    with open(metrics) as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
