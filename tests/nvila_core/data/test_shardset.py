"""Shard sets: each shard whole or absent, a manifest of counts, and a rerun that starts clean (issue 15)."""

import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from nvila.core.data.shards import find_shards
from nvila.core.data.shardset import MANIFEST, ShardSetWriter, read_manifest
from nvila.core.data.synthetic import write_dataset, write_split
from nvila.core.errors import NvilaError
from nvila.workflows.commands import main


def sample(i: int) -> dict:
    return {"__key__": f"k{i:04d}", "txt": f"sample {i}".encode(), "json": json.dumps({"i": i}).encode()}


def samples_of(shard: Path) -> dict[str, dict[str, bytes]]:
    """A shard's samples, key -> {extension: bytes}, read with tarfile (raises on a damaged archive)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def test_a_shard_appears_only_whole_and_the_manifest_counts_its_samples(tmp_path, caplog):
    sink = ShardSetWriter(tmp_path, 3, writer="test")
    for i in range(4):
        sink.write(sample(i))
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "shard-000000.tar", "shard-000001.tar.partial"]
    assert [Path(s).name for s in find_shards(tmp_path)] == ["shard-000000.tar"]  # never the .partial
    assert "unfinished shard set" in caplog.text
    with pytest.raises(NvilaError, match="a shard its writer never finished"):
        find_shards(tmp_path / "shard-000001.tar.partial")
    assert read_manifest(tmp_path)["shards"] == {"shard-000000.tar": 3} and not read_manifest(tmp_path)["complete"]
    assert sink.close() == [tmp_path / "shard-000000.tar", tmp_path / "shard-000001.tar"]
    manifest = read_manifest(tmp_path)
    assert manifest["complete"] and manifest["samples"] == 4
    assert manifest["shards"] == {"shard-000000.tar": 3, "shard-000001.tar": 1}
    assert [len(samples_of(p)) for p in sink.paths] == [3, 1]
    assert not list(tmp_path.glob("*.partial"))


def test_an_exception_inside_the_writer_deletes_the_shard_being_written(tmp_path):
    with pytest.raises(KeyboardInterrupt), ShardSetWriter(tmp_path, 3, writer="test") as sink:
        for i in range(5):
            sink.write(sample(i))
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "shard-000000.tar"]
    assert read_manifest(tmp_path)["complete"] is False


def test_an_interrupt_as_the_next_shard_is_opened_deletes_it_too(tmp_path, monkeypatch):
    """Ctrl-C right after a shard is finished lands, often, between `open` creating the next partial file and
    the writer holding it (CI saw it): that file must go as well."""
    def open_then_interrupt(path, mode):
        open(path, mode).close()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), ShardSetWriter(tmp_path, 3, writer="test") as sink:
        for i in range(3):
            sink.write(sample(i))
        monkeypatch.setattr("nvila.core.data.shardset.open", open_then_interrupt, raising=False)
        sink.write(sample(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "shard-000000.tar"]


def test_a_rerun_removes_only_its_own_leftovers_and_says_so_in_one_line(tmp_path, caplog):
    with pytest.raises(RuntimeError), ShardSetWriter(tmp_path, 2, writer="test") as sink:
        for i in range(5):
            sink.write(sample(i))
        sink._file.flush()
        os.link(sink._partial(2), tmp_path / "shard-000002.tar.partial.keep")  # then a kill: the partial stays
        raise RuntimeError
    os.rename(tmp_path / "shard-000002.tar.partial.keep", tmp_path / "shard-000002.tar.partial")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "download.partial").write_text("another program's")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "shard-000000.tar").write_text("not in this directory")
    caplog.clear()
    with caplog.at_level(logging.WARNING), ShardSetWriter(tmp_path, 10, writer="test") as sink:
        sink.write(sample(9))
    lines = [r.getMessage() for r in caplog.records if "leftovers" in r.getMessage()]
    assert lines == [f"removed the leftovers of an interrupted run from {tmp_path} (2 finished shard(s), "
                     "1 partial file(s)); starting clean"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["download.partial", MANIFEST, "notes.txt", "shard-000000.tar", "sub"])
    assert list(samples_of(tmp_path / "shard-000000.tar")) == ["k0009"]


def test_tar_files_another_writer_left_are_refused_and_kept(tmp_path):
    (tmp_path / "user.tar").write_bytes(b"\0" * 1024)
    with pytest.raises(NvilaError, match=r"holds \*\.tar files that nvila did not write there \(user\.tar"):
        ShardSetWriter(tmp_path, 3, writer="test")
    assert (tmp_path / "user.tar").exists() and not (tmp_path / MANIFEST).exists()


def test_a_manifest_naming_other_files_is_ignored_and_they_are_never_deleted(tmp_path, caplog):
    (tmp_path / "victim.txt").write_text("keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / MANIFEST).write_text(json.dumps(
        {"format": "nvila-shards", "complete": False, "shards": {"../victim.txt": 1}}))
    with ShardSetWriter(tmp_path / "out", 3, writer="test") as sink:
        sink.write(sample(0))
    assert (tmp_path / "victim.txt").read_text() == "keep me" and "not an nvila shard manifest" in caplog.text


def test_a_finished_set_is_replaced_only_with_overwrite_and_kept_when_synth_settings_match(tmp_path, caplog):
    first = write_split(tmp_path, 6, seed=1, image_size=16, shard_size=4)
    stamp = first[0].stat().st_mtime_ns
    assert write_split(tmp_path, 6, seed=1, image_size=16, shard_size=4) == first  # the same settings: kept
    assert first[0].stat().st_mtime_ns == stamp
    with pytest.raises(NvilaError, match=r"already holds a finished shard set \(6 samples in 2 shards, written by "
                                         r"nvila data synth\)\. Pass --overwrite"):
        write_split(tmp_path, 3, seed=2, image_size=16, shard_size=4)
    assert [p.name for p in write_split(tmp_path, 3, seed=2, image_size=16, overwrite=True)] == ["shard-000000.tar"]
    assert [Path(s).name for s in find_shards(tmp_path)] == ["shard-000000.tar"]  # no stale shard-000001.tar
    assert "replacing the finished shard set" in caplog.text


# -- a real `nvila data synth`, killed mid-write ----------------------------------------------------------------
SYNTH = ["--train", "2500", "--val", "8", "--image-size", "16"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    write_dataset(root, train=2500, val=8, seed=0, image_size=16)
    return root


def _default_sigint() -> None:
    """Ctrl-C as a terminal delivers it: a test run started as a background job (`cmd &` in a script) ignores
    SIGINT, and its children would inherit that and never see the interrupt this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_mid_write(out: Path, sig: int) -> str:
    """Start `nvila data synth`, and once its first shard is finished and the second is being written, send sig;
    returns what the command wrote to stderr."""
    process = subprocess.Popen([sys.executable, "-m", "nvila.workflows", "data", "synth", "--out", str(out), *SYNTH],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 60
        while not (out / "train" / "shard-000000.tar").exists():
            assert process.poll() is None and time.monotonic() < deadline, "synth ended before it could be killed"
            time.sleep(0.005)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode != 0
    return stderr


def assert_nothing_misleading(split: Path) -> None:
    """Every *.tar is whole and readable, and holds exactly the samples the (unfinished) manifest says."""
    manifest = read_manifest(split)
    assert manifest is not None and manifest["complete"] is False
    tars = sorted(split.glob("*.tar"))
    assert tars and {p.name for p in tars} <= set(manifest["shards"])
    for tar in tars:
        assert len(samples_of(tar)) == manifest["shards"][tar.name] == 1000, tar


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGKILL, marks=pytest.mark.slow), signal.SIGINT],
                         ids=["SIGKILL", "SIGINT"])
def test_a_killed_synth_leaves_only_whole_shards_and_a_rerun_writes_the_uninterrupted_set(
        tmp_path, uninterrupted, sig, capsys):
    stderr = kill_mid_write(tmp_path, sig)
    if sig == signal.SIGINT:  # Ctrl-C: one line and the conventional exit status, no traceback
        assert "nvila: interrupted" in stderr.splitlines() and "KeyboardInterrupt" not in stderr, stderr
    assert_nothing_misleading(tmp_path / "train")
    partials = list((tmp_path / "train").glob("*.partial"))
    assert not partials if sig == signal.SIGINT else len(partials) <= 1  # Ctrl-C cleans up its partial itself
    logging.getLogger().handlers.clear()  # main() logs to this test's captured stderr
    assert main(["data", "synth", "--out", str(tmp_path), *SYNTH]) == 0
    assert "removed the leftovers of an interrupted run" in capsys.readouterr().err
    for split in ("train", "val"):
        mine, reference = sorted((tmp_path / split).glob("*")), sorted((uninterrupted / split).glob("*"))
        assert [p.name for p in mine] == [p.name for p in reference]
        for a, b in zip(mine, reference):
            if a.suffix == ".tar":
                assert samples_of(a) == samples_of(b)
        assert read_manifest(tmp_path / split) == read_manifest(uninterrupted / split)
