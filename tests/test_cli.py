"""The `nvila` command as a user runs it: a subprocess, its output and its exit status."""

import json
import shlex
import subprocess
import sys

import pytest


def nvila(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nvila.workflows", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_plugins_lists_components_by_kind_with_their_distribution():
    out = nvila("plugins")
    assert out.returncode == 0, out.stderr
    assert "compressor (" in out.stdout and "stc " in out.stdout and "nvila 0.1.0" in out.stdout


def test_plugins_describe_prints_fields_types_defaults_and_docs():
    out = nvila("plugins", "--describe", "siglip")
    assert out.returncode == 0, out.stderr
    assert "feature_layer: int = -2" in out.stdout
    assert "second-to-last" in out.stdout or "NVILA: -2" in out.stdout


@pytest.mark.slow  # over 5 s on an AVX2 core: the default run stays under 5 minutes; CI runs it
def test_user_errors_are_one_paragraph_without_a_traceback(tmp_path):
    out = nvila("fit", "--config", "demo", f"--data.train={tmp_path / 'missing'}")
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "nvila data synth" in out.stderr
    assert "Traceback" not in out.stderr


def test_debug_shows_the_traceback():
    out = nvila("--debug", "plugins", "--describe", "nothing-like-this")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_data_synth_writes_train_and_val_shards(tmp_path):
    out = nvila("data", "synth", "--out", str(tmp_path), "--train", "20", "--val", "5", "--image-size", "32")
    assert out.returncode == 0, out.stderr
    assert list((tmp_path / "train").glob("*.tar")) and list((tmp_path / "val").glob("*.tar"))


HEAVY = ("torch", "torchvision", "transformers", "timm", "lightning", "pytorch_lightning", "torchao")
"""Libraries whose import alone takes seconds: listing and describing plugins must not import them."""

MODULES_AT_EXIT = ("import atexit, json, runpy, sys; "
                   "atexit.register(lambda: print('MODULES=' + json.dumps(sorted(sys.modules)), file=sys.stderr)); "
                   "sys.argv[0] = 'nvila'; runpy.run_module('nvila.workflows', run_name='__main__', alter_sys=True)")
"""``python -c MODULES_AT_EXIT ARGS`` runs ``nvila ARGS`` and prints every module it imported, at exit, to stderr."""


def modules_of(out: subprocess.CompletedProcess) -> set[str]:
    """The modules a MODULES_AT_EXIT run had imported when it ended."""
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("MODULES=")]
    return set(json.loads(line.removeprefix("MODULES=")))


@pytest.mark.parametrize("args", [("plugins",), ("plugins", "--describe", "siglip"), ("--help",)],
                         ids=["plugins", "describe", "help"])
def test_listing_and_describing_plugins_imports_no_torch_transformers_timm_or_lightning(args):
    out = subprocess.run([sys.executable, "-c", MODULES_AT_EXIT, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    modules = modules_of(out)
    assert args == ("--help",) or "nvila.encoders.configs" in modules  # the registry really was loaded
    heavy = sorted({m.partition(".")[0] for m in modules} & set(HEAVY))
    assert not heavy, f"`nvila {' '.join(args)}` imported {heavy}: keep them behind lazy factories"


def test_a_reader_that_leaves_early_ends_the_listing_quietly():
    """`nvila plugins | head -1`: the closed pipe is the reader's choice, not an error with a traceback."""
    out = subprocess.run(f"{shlex.quote(sys.executable)} -m nvila.workflows plugins | head -1", shell=True,
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.startswith("encoder") and len(out.stdout.splitlines()) == 1
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
