"""nvila installs under one import namespace (``nvila.*``): nothing generic lands at the top level of
site-packages, and a user's own ``plugins/`` or ``workflows/`` folder cannot shadow ours.

The wheel test builds the real wheel, installs it (not editable) into a fresh virtual environment and runs
``nvila plugins`` from a folder that holds its own ``plugins`` and ``workflows`` packages. The environment is
layered on the running one through a folder of links to every entry of its site-packages except nvila's own
(so torch and friends take no time to install, and the editable nvila cannot leak in).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_installed_under_nvila() -> None:
    config = _pyproject()["tool"]["setuptools"]
    listed, mapping = set(config["packages"]), config["package-dir"]
    folders = {name: Path(folder) for name, folder in mapping.items()}
    found = set()
    for name, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            if relative.parts[:1] in (("template",), ("examples",)):  # separate distributions
                continue
            found.add(".".join((name, *relative.parts)))
    assert found == listed, f"add to / remove from [tool.setuptools] packages: {sorted(found ^ listed)}"
    assert all(name.startswith("nvila.") for name in listed)


def test_entry_points_and_command_name_nvila_modules_only() -> None:
    project = _pyproject()["project"]
    targets = [*project["scripts"].values(), *project["entry-points"]["nvila"].values()]
    assert all(t.startswith("nvila.") for t in targets), targets


def _layered_site(tmp: Path) -> Path:
    """Links to the running environment's site-packages, without any nvila distribution or editable hook."""
    farm = tmp / "shared-site"
    farm.mkdir()
    for directory in map(Path, site.getsitepackages()):
        for entry in directory.iterdir():
            lowered = entry.name.lower()
            if lowered.startswith(("nvila", "__editable__", "_nvila")) or entry.suffix == ".pth":
                continue
            if not (farm / entry.name).exists():
                (farm / entry.name).symlink_to(entry)
    return farm


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy, so that the build writes nothing into the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in _pyproject()["tool"]["setuptools"]["package-dir"].values():
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (found,) = out.glob("nvila-*.whl")
    return found


def test_wheel_has_nothing_generic_at_the_top_level(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"nvila"}
    assert "nvila/__init__.py" not in names  # a namespace: third parties may add nvila.* packages too
    assert "nvila/workflows/recipes/demo.yaml" in names
    assert "nvila/plugins/assets/tiny-tokenizer/tokenizer.json" in names
    assert "nvila/quant/csrc/int4_cpu.cpp" in names  # nvila.quant.int4_cpu builds it where it is installed
    assert "nvila/plugins/csrc/decode_attention.cpp" in names  # and nvila.plugins.attention this one


def test_installed_wheel_is_not_shadowed_by_a_users_folders(wheel: Path, tmp_path: Path) -> None:
    venv.EnvBuilder(with_pip=False).create(tmp_path / "venv")
    python = tmp_path / "venv" / "bin" / "python"
    purelib = Path(subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (purelib / "_shared_env.pth").write_text(f"{_layered_site(tmp_path)}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NVILA_", "PYTHONPATH"))}
    install = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr

    user = tmp_path / "project"  # a plugin author's folder, with packages named like our old top-level ones
    for package in ("plugins", "workflows", "encoders", "quant"):
        (user / package).mkdir(parents=True)
        (user / package / "__init__.py").write_text("raise ImportError('the user folder was imported')\n")
    listing = subprocess.run([tmp_path / "venv" / "bin" / "nvila", "plugins"], capture_output=True, text=True,
                             env=env, cwd=user, timeout=300)
    assert listing.returncode == 0, listing.stderr
    assert "stc " in listing.stdout and "siglip " in listing.stdout and "failed" not in listing.stdout
    origin = subprocess.run([python, "-c", "import nvila.core, nvila.workflows; print(nvila.core.__file__)"],
                            capture_output=True, text=True, env=env, cwd=user, timeout=60)
    assert origin.stdout.strip().startswith(str(purelib / "nvila" / "core")), origin.stdout + origin.stderr
