"""``nvila data convert``: a LLaVA-style JSON (or JSONL) file and its media folder -> webdataset shards.

Each record ``{"id", "image": path | [paths], "video": path | [paths], "conversations": [...]}`` becomes
one tar sample: the record as ``.json`` (media paths dropped, ``source`` added) and the media bytes as
``.jpg``/``.png``/... (``0.jpg``, ``1.jpg``, ... when there are several) and ``.mp4``. Records that could
not train are left out, counted by reason, and listed (first few ids per reason) in the report.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from nvila.core.data.shards import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VIDEO_TOKEN
from nvila.core.data.shardset import ShardSetWriter, prepare_output
from nvila.core.errors import NvilaError
from nvila.core.media import ImageRefused, max_image_pixels, open_header
from nvila.core.processor import IMAGE_TOKEN, NvilaProcessor

REPORT_FILE = "convert-report.json"
CONVERT_REASONS = {
    "malformed_record": "not an object with a list of conversation turns (from/value or role/content)",
    "missing_media": "a media file named by the record does not exist under --media-root",
    "unsupported_media": "a media file whose extension is neither an image nor a video format we read",
    "unreadable_image": "an image file PIL cannot identify",
    "image_too_large": "an image whose header claims more pixels than the limit (NVILA_MAX_IMAGE_PIXELS)",
    "outside_media_root": "a media path that leaves --media-root (../, absolute, or a link out); "
                          "--allow-outside-media-root reads it",
    "unreadable_line": "a JSONL line that is not valid UTF-8 JSON",
    "placeholder_without_media": "more <image>/<video> placeholders than media files",
    "media_without_placeholder": "more media files than <image>/<video> placeholders",
}


@dataclass
class ConvertReport:
    """What a conversion wrote and what it left out, and why."""

    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    """Up to five record ids per skip reason, with the detail."""

    def skip(self, reason: str, record_id: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(f"{record_id}: {detail}")

    def to_dict(self) -> dict:
        return {"written": self.written, "shards": self.shards, "skipped": dict(self.skipped),
                "skip_reasons": {r: CONVERT_REASONS[r] for r in self.skipped}, "examples": dict(self.examples)}

    def summary(self) -> str:
        lines = [f"wrote {self.written} sample(s) in {len(self.shards)} shard(s); skipped {sum(self.skipped.values())}"]
        for reason, n in self.skipped.most_common():
            lines.append(f"  {reason}: {n} ({CONVERT_REASONS[reason]}); e.g. {'; '.join(self.examples[reason][:2])}")
        return "\n".join(lines)


def read_llava(path: Path) -> list[tuple[str, object]]:
    """``(where, record)`` for each record of a LLaVA JSON array or JSON-lines file. ``where`` names the record
    by its line (JSONL: ``line 7``) or position (JSON: ``record 7``); a JSONL line that cannot be parsed comes
    back as its ``ValueError``, so that one bad line costs one record."""
    data = path.read_bytes()
    if path.suffix == ".jsonl":
        out: list[tuple[str, object]] = []
        for number, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                out.append((f"line {number}", json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError as exc:
                out.append((f"line {number}", ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})")))
            except json.JSONDecodeError as exc:
                out.append((f"line {number}", ValueError(f"not valid JSON: {exc.msg} at column {exc.colno}")))
        return out
    try:
        records = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise NvilaError(f"'{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except json.JSONDecodeError as exc:
        raise NvilaError(f"'{path}' is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}. "
                         "(A .jsonl file, one record per line, is converted line by line.)") from None
    if not isinstance(records, list):
        raise NvilaError(f"'{path}' holds a JSON {type(records).__name__}; LLaVA data is a list of records.")
    return [(f"record {i}", r) for i, r in enumerate(records)]


def _paths(value: object, kind: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return value
    raise ValueError(f"'{kind}' must be a path or a list of paths, got {json.dumps(value)[:80]}")


def _key(index: int, record_id: str) -> str:
    # webdataset splits a file name at its first dot: keys have none
    return f"{index:09d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', record_id)[:64]}"


def convert_llava(llava_json: str | Path, media_root: str | Path, out: str | Path, shard_size: int = 1000,
                  source: str | None = None, allow_outside_media_root: bool = False,
                  max_pixels: int | None = None, overwrite: bool = False) -> ConvertReport:
    """Write the records of ``llava_json`` as shards under ``out``; returns (and saves) the report.

    Media paths must stay inside ``media_root`` unless ``allow_outside_media_root``; image headers are held to
    the pixel limit (:mod:`nvila.core.media`). A bad record is counted, named by its line, and left out.
    Shards go through :class:`ShardSetWriter`: an interrupted conversion leaves no partial shard and a rerun
    starts clean; a finished shard set in ``out`` is replaced only with ``overwrite``.
    """
    llava_json, media_root, out = Path(llava_json), Path(media_root), Path(out)
    if not llava_json.is_file():
        raise NvilaError(f"--llava-json '{llava_json}' is not a file.")
    if not media_root.is_dir():
        raise NvilaError(f"--media-root '{media_root}' is not a directory.")
    if shard_size < 1:
        raise NvilaError(f"--shard-size must be at least 1, got {shard_size}.")
    limit = max_image_pixels(max_pixels)
    prepare_output(out, overwrite)  # before reading: a refusal costs nothing
    records = read_llava(llava_json)
    report = ConvertReport()
    default_source = source or llava_json.stem
    context = _Context(media_root, media_root.resolve(), default_source, allow_outside_media_root, limit, report)
    with ShardSetWriter(out, shard_size, writer="nvila data convert", prepared=True) as sink:
        for index, (where, record) in enumerate(records):
            if isinstance(record, ValueError):
                report.skip("unreadable_line", where, str(record))
                continue
            sample = _sample(index, where, record, context)
            if sample is not None:
                sink.write(sample)
                report.written += 1
    report.shards = [p.name for p in sink.paths]
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    return report


@dataclass
class _Context:
    media_root: Path
    resolved_root: Path
    source: str
    allow_outside: bool
    max_pixels: int
    report: ConvertReport


def _sample(index: int, where: str, record: object, context: _Context) -> dict | None:
    report, media_root = context.report, context.media_root
    record_id = f"{record['id']} ({where})" if isinstance(record, dict) and "id" in record else where
    try:
        if not isinstance(record, dict):
            raise TypeError(f"a record is a JSON object, got {type(record).__name__}")
        conversations = record["conversations"]
        if not isinstance(conversations, list) or not conversations:
            raise ValueError("'conversations' is not a non-empty list")
        NvilaProcessor.messages(conversations)
        names = {kind: _paths(record.get(kind), kind) for kind in ("image", "video")}
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        report.skip("malformed_record", record_id, f"{type(exc).__name__}: {exc}")
        return None
    text = "".join(str(t.get("value", t.get("content", ""))) for t in conversations)
    media: dict[str, list[Path]] = {"image": [], "video": []}
    for kind in media:
        for name in names[kind]:
            path = media_root / name
            if not context.allow_outside and not path.resolve().is_relative_to(context.resolved_root):
                report.skip("outside_media_root", record_id, f"{name!r} leads to {path.resolve()}")
                return None
            ext = path.suffix.lower().lstrip(".")
            if not path.is_file():
                report.skip("missing_media", record_id, str(path))
                return None
            if ext not in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
                report.skip("unsupported_media", record_id, str(path))
                return None
            media["image" if ext in IMAGE_EXTENSIONS else "video"].append(path)
    for kind, token in (("image", IMAGE_TOKEN), ("video", VIDEO_TOKEN)):
        wanted, have = text.count(token), len(media[kind])
        if wanted != have:
            reason = "placeholder_without_media" if wanted > have else "media_without_placeholder"
            report.skip(reason, record_id, f"{wanted} {token} placeholder(s), {have} {kind}(s)")
            return None
    for path in media["image"]:
        try:
            open_header(path, context.max_pixels).close()  # the header only: nothing is decoded
        except ImageRefused as exc:
            report.skip("image_too_large" if exc.reason == "too_large" else "unreadable_image", record_id, str(exc))
            return None
    kept = {k: v for k, v in record.items() if k not in ("image", "video")}
    kept.setdefault("id", str(record.get("id", index)))
    kept.setdefault("source", context.source)
    sample = {"__key__": _key(index, str(kept["id"])), "json": json.dumps(kept).encode()}
    for kind in ("image", "video"):
        paths = media[kind]
        for i, path in enumerate(paths):
            ext = path.suffix.lower().lstrip(".")
            sample[ext if len(paths) == 1 else f"{i}.{ext}"] = path.read_bytes()
    return sample
