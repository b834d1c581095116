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

import webdataset as wds
from PIL import Image, UnidentifiedImageError

from nvila.core.data.shards import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VIDEO_TOKEN
from nvila.core.errors import NvilaError
from nvila.core.processor import IMAGE_TOKEN, NvilaProcessor

REPORT_FILE = "convert-report.json"
CONVERT_REASONS = {
    "malformed_record": "not an object with a list of conversation turns (from/value or role/content)",
    "missing_media": "a media file named by the record does not exist under --media-root",
    "unsupported_media": "a media file whose extension is neither an image nor a video format we read",
    "unreadable_image": "an image file PIL cannot identify",
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


def read_llava(path: Path) -> list:
    """Records of a LLaVA JSON array or JSON-lines file."""
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NvilaError(f"'{path}' is not valid JSON{' lines' if path.suffix == '.jsonl' else ''}: {exc}") from None
    if not isinstance(records, list):
        raise NvilaError(f"'{path}' holds a JSON {type(records).__name__}; LLaVA data is a list of records.")
    return records


def _paths(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _key(index: int, record_id: str) -> str:
    # webdataset splits a file name at its first dot: keys have none
    return f"{index:09d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', record_id)[:64]}"


def convert_llava(llava_json: str | Path, media_root: str | Path, out: str | Path, shard_size: int = 1000,
                  source: str | None = None) -> ConvertReport:
    """Write the records of ``llava_json`` as shards under ``out``; returns (and saves) the report."""
    llava_json, media_root, out = Path(llava_json), Path(media_root), Path(out)
    if not llava_json.is_file():
        raise NvilaError(f"--llava-json '{llava_json}' is not a file.")
    if not media_root.is_dir():
        raise NvilaError(f"--media-root '{media_root}' is not a directory.")
    if shard_size < 1:
        raise NvilaError(f"--shard-size must be at least 1, got {shard_size}.")
    records = read_llava(llava_json)
    out.mkdir(parents=True, exist_ok=True)
    report = ConvertReport()
    default_source = source or llava_json.stem
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for index, record in enumerate(records):
            sample = _sample(index, record, media_root, default_source, report)
            if sample is not None:
                sink.write(sample)
                report.written += 1
    report.shards = sorted(p.name for p in out.glob("shard-*.tar"))
    (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    return report


def _sample(index: int, record, media_root: Path, source: str, report: ConvertReport) -> dict | None:
    record_id = str(record.get("id", index)) if isinstance(record, dict) else str(index)
    try:
        conversations = record["conversations"]
        if not isinstance(conversations, list) or not conversations:
            raise ValueError("'conversations' is not a non-empty list")
        NvilaProcessor.messages(conversations)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        report.skip("malformed_record", record_id, f"{type(exc).__name__}: {exc}")
        return None
    text = "".join(str(t.get("value", t.get("content", ""))) for t in conversations)
    media: dict[str, list[Path]] = {"image": [], "video": []}
    for kind in media:
        for name in _paths(record.get(kind)):
            path = media_root / name
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
            with Image.open(path):  # reads the header only
                pass
        except (UnidentifiedImageError, OSError) as exc:
            report.skip("unreadable_image", record_id, f"{path}: {exc}")
            return None
    kept = {k: v for k, v in record.items() if k not in ("image", "video")}
    kept.setdefault("id", record_id)
    kept.setdefault("source", source)
    sample = {"__key__": _key(index, record_id), "json": json.dumps(kept).encode()}
    for kind in ("image", "video"):
        paths = media[kind]
        for i, path in enumerate(paths):
            ext = path.suffix.lower().lstrip(".")
            sample[ext if len(paths) == 1 else f"{i}.{ext}"] = path.read_bytes()
    return sample
