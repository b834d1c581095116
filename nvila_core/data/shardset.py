"""A shard set: the tar shards of one directory, written so that an interrupted writer leaves nothing misleading.

:class:`ShardSetWriter` is the one way nvila writes shards (``nvila data synth``, ``nvila data convert``,
``nvila prune``). It wraps webdataset's ``TarWriter``; each shard is written as ``shard-000003.tar.partial``
and renamed to ``shard-000003.tar`` once closed, so a ``*.tar`` that exists is always whole. Beside the
shards it keeps :data:`MANIFEST`, the number of samples in each finished shard:

```json
{"format": "nvila-shards", "version": 1, "complete": true, "writer": "nvila data synth",
 "samples": 2000, "shards": {"shard-000000.tar": 1000, "shard-000001.tar": 1000}, "params": {...}}
```

It is replaced atomically (written to a temporary name, then renamed) when each shard is closed, with
``"complete": false``, and a last time at the end with ``"complete": true``. Readers take the counts from it
to count the samples a truncated shard lost (:class:`~nvila.core.data.skips.ShardErrors`).

A second writer into the same directory starts clean: it removes the leftovers of an unfinished run (the
shards its manifest lists, ``*.partial`` files of our names) and says so in one line; a finished set is
replaced only with ``overwrite``; and it refuses a directory holding ``*.tar`` files it did not write, since
readers take every ``*.tar`` of a directory and the two sets would mix. It never deletes a file it cannot
name as its own.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import webdataset as wds

from nvila.core.errors import NvilaError

log = logging.getLogger(__name__)
MANIFEST = "nvila-shards.json"
"""The manifest's file name, in the shard directory."""
SHARD_NAME = "shard-{:06d}.tar"
PARTIAL = ".partial"
_SHARD = re.compile(r"shard-\d{6}\.tar")
_LEFTOVER = re.compile(r"(shard-\d{6}\.tar|" + re.escape(MANIFEST) + r")" + re.escape(PARTIAL))


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of the shard set in ``directory``, or None when there is none (or it is not ours)."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not (isinstance(manifest, dict) and manifest.get("format") == "nvila-shards" and isinstance(shards, dict)
            and all(_SHARD.fullmatch(str(k)) and isinstance(v, int) for k, v in shards.items())):
        log.warning("ignoring %s: not an nvila shard manifest", path)  # and never deleting what it names
        return None
    return manifest


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + PARTIAL)
    with open(temporary, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _remove(paths: list[Path]) -> int:
    removed = 0
    for path in paths:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def check_output(out: str | Path) -> dict[str, Any] | None:
    """Refuse (:class:`NvilaError`) an output directory holding ``*.tar`` files that no manifest of ours lists;
    returns its manifest. Reads only: safe to call on every distributed rank."""
    out = Path(out)
    manifest = read_manifest(out)
    ours = set(manifest["shards"]) if manifest else set()
    foreign = sorted(p.name for p in out.glob("*.tar") if p.name not in ours)
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise NvilaError(f"'{out}' holds *.tar files that nvila did not write there ({listed}; no {MANIFEST} lists "
                         "them): readers take every *.tar of a directory, so a new shard set would mix with them. "
                         "Choose an empty output directory, or move them.")
    return manifest


def prepare_output(out: str | Path, overwrite: bool = False, params: dict[str, Any] | None = None) -> bool:
    """Make ``out`` ready for a new shard set; True when it already holds a finished one written with ``params``.

    Refuses (:class:`NvilaError`) a directory with ``*.tar`` files of another writer, and a finished set unless
    ``overwrite`` (or, when ``params`` is given, unless it was written with the same ``params``: then it is
    kept, and True returned). Leftovers of an unfinished run are removed, in one logged line.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = check_output(out)
    ours = set(manifest["shards"]) if manifest else set()
    leftovers = [p for p in out.iterdir() if _LEFTOVER.fullmatch(p.name)]
    if manifest is not None and manifest.get("complete"):
        whole = all((out / name).is_file() for name in ours)
        if params is not None and manifest.get("params") == params and whole and not overwrite:
            log.warning("%s already holds this shard set (%s samples, written with the same settings): kept; "
                        "--overwrite writes it again", out, manifest.get("samples"))
            return True
        if not overwrite:
            raise NvilaError(f"'{out}' already holds a finished shard set ({manifest.get('samples')} samples in "
                             f"{len(ours)} shards, written by {manifest.get('writer', 'nvila')}). Pass --overwrite "
                             "to replace it, or choose another output directory.")
        _write_json_atomically(out / MANIFEST, {**manifest, "complete": False})  # a kill now leaves leftovers
        _remove([out / name for name in ours] + leftovers + [out / MANIFEST])
        log.warning("replacing the finished shard set in %s (%s samples in %d shards)", out,
                    manifest.get("samples"), len(ours))
    elif manifest is not None or leftovers:
        finished = _remove([out / name for name in ours])
        partial = _remove([out / (name + PARTIAL) for name in ours] + leftovers)
        _remove([out / MANIFEST])
        log.warning("removed the leftovers of an interrupted run from %s (%d finished shard(s), %d partial "
                    "file(s)); starting clean", out, finished, partial)
    return False


class ShardSetWriter:
    """Writes samples into ``out/shard-NNNNNN.tar`` shards of ``shard_size`` samples, each whole or absent.

    ``with ShardSetWriter(out, 1000, writer="nvila data synth") as sink: sink.write(sample)``; :attr:`paths`
    holds the finished shards. Leaving the ``with`` block normally finishes the set (the last shard and the
    complete manifest); leaving it by an exception (Ctrl-C included) deletes the shard being written and
    leaves the manifest marked unfinished, for the next run to clean up. ``prepare_output`` runs first,
    unless the caller ran it (``prepared=True``).
    """

    def __init__(self, out: str | Path, shard_size: int, writer: str, overwrite: bool = False,
                 params: dict[str, Any] | None = None, prepared: bool = False) -> None:
        if shard_size < 1:
            raise NvilaError(f"the shard size must be at least 1, got {shard_size}.")
        self.out, self.shard_size, self.writer, self.params = Path(out), shard_size, writer, params
        if not prepared:
            prepare_output(self.out, overwrite)
        self.counts: dict[str, int] = {}
        self.paths: list[Path] = []
        self._tar: wds.TarWriter | None = None
        self._file: Any = None
        self._count = 0
        self._save(complete=False)  # from here on, whatever this run leaves is recognised as its own

    @property
    def samples(self) -> int:
        return sum(self.counts.values()) + self._count

    def write(self, sample: dict[str, Any]) -> None:
        """Write one webdataset sample (``__key__`` plus ``ext: bytes`` entries)."""
        if self._tar is None:
            self._file = open(self._partial(len(self.paths)), "wb")
            self._tar = wds.TarWriter(self._file)
        self._tar.write(sample)
        self._count += 1
        if self._count >= self.shard_size:
            self._close_shard()

    def _partial(self, index: int) -> Path:
        return self.out / (SHARD_NAME.format(index) + PARTIAL)

    def _close_shard(self) -> None:
        self._tar.close()  # writes tar's end-of-archive blocks
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        partial, final = self._partial(len(self.paths)), self.out / SHARD_NAME.format(len(self.paths))
        self.counts[final.name] = self._count
        self._save(complete=False)  # listed before the rename: a kill between the two leaves a known leftover
        os.replace(partial, final)
        self.paths.append(final)
        self._tar, self._file, self._count = None, None, 0

    def _save(self, complete: bool) -> None:
        _write_json_atomically(self.out / MANIFEST, {
            "format": "nvila-shards", "version": 1, "complete": complete, "writer": self.writer,
            "samples": sum(self.counts.values()), "shards": self.counts, "params": self.params})

    def close(self) -> list[Path]:
        """Finish the last shard and mark the set complete; returns the shards."""
        if self._tar is not None:
            self._close_shard()
        self._save(complete=True)
        return self.paths

    def abort(self) -> None:
        """Delete the shard being written; the finished ones stay, listed by a manifest marked unfinished.

        The partial file is removed by name even when no file object holds it: an interrupt that lands between
        ``open`` creating it and the assignment of its file object (right after a shard is finished) leaves it
        on disk with nothing here that knows of it.
        """
        if self._file is not None:
            try:
                self._tar.close()  # into the file about to be deleted: so that nothing writes to it later
            except Exception:  # noqa: BLE001 - the write that failed may have left the archive in any state
                pass
            self._file.close()
        _remove([self._partial(len(self.paths))])
        self._tar, self._file, self._count = None, None, 0

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def sample_counts(directory: str | Path) -> dict[str, int] | None:
    """Samples per shard file name, from the manifest of ``directory``; None for a set written without one."""
    manifest = read_manifest(directory)
    return None if manifest is None else {str(k): int(v) for k, v in manifest["shards"].items()}


def check_set(directory: str | Path, shards: list[str]) -> None:
    """Warn about a shard set an interrupted writer left, or one missing shards its manifest lists."""
    manifest = read_manifest(directory)
    if manifest is None:
        return
    present = {Path(s).name for s in shards}
    missing = sorted(set(manifest["shards"]) - present)
    if not manifest.get("complete"):
        log.warning("%s holds an unfinished shard set (its writer, %s, was interrupted): %d whole shard(s) of %d "
                    "samples so far; rerun the writer to finish it", directory, manifest.get("writer"),
                    len(manifest["shards"]), manifest.get("samples", 0))
    elif missing:
        log.warning("%s: %d shard(s) listed in %s are missing (%s); their samples are not read",
                    directory, len(missing), MANIFEST, ", ".join(missing[:3]))
