"""Writes the corrupt-input corpus: hostile shards, bomb headers, bad JSON lines and bad recipes, each tiny.

``python tests/corpus/make_corpus.py OUT`` writes it to OUT; the tests call :func:`write_corpus`. Files are
generated rather than committed, so that the corpus stays a few kilobytes of readable code.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

from PIL import Image

from nvila.core.data.shardset import ShardSetWriter


def png(size: tuple[int, int] = (8, 8), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, format="PNG")
    return out.getvalue()


def bomb_png(side: int = 13000) -> bytes:
    """A PNG of a few KB whose header claims side x side pixels (1-bit, so it compresses to nothing)."""
    return png((side, side), "1")


def conv(question: str = "<image>\nColour?", answer: str = "red") -> bytes:
    return json.dumps({"conversations": [{"from": "human", "value": question},
                                         {"from": "gpt", "value": answer}]}).encode()


def write_tar(path: Path, samples: dict[str, dict[str, bytes]], cut: int | None = None) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[:cut] if cut else data)
    return path


BAD_SAMPLES = {  # key -> (files, skip reason)
    "garbage": ({"png": b"\x89PNG\r\n\x1a\n garbage", "json": conv()}, "bad_image"),
    "bomb": ({"0.png": bomb_png(), "1.png": bomb_png(), "json": conv("<image><image>\nSame?")}, "image_too_large"),
    "nojson": ({"png": png()}, "missing_json"),
    "badjson": ({"png": png(), "json": b'{"conversations": [ oops'}, "malformed_json"),
    "notutf8": ({"json": b'{"conversations": "\xff\xfe"}'}, "malformed_json"),
    "nomedia": ({"json": conv()}, "placeholder_without_media"),
}

TRUNCATED = (6, 3)
"""The truncated shards: samples written, samples lost (the shard is cut inside the header of sample 3)."""


def write_truncated(directory: Path) -> Path:
    """A shard written by nvila (so its set records how many samples it holds), then cut short."""
    with ShardSetWriter(directory, TRUNCATED[0], writer="make_corpus") as sink:
        for i in range(TRUNCATED[0]):
            sink.write({"__key__": f"s{i}", "png": png(), "json": conv()})
    (shard,) = sink.paths
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[2 * (TRUNCATED[0] - TRUNCATED[1])].offset + 100  # two files per sample
    shard.write_bytes(shard.read_bytes()[:cut])
    return shard


RECIPES = {  # file name -> (text, the message it must get)
    "python_tag.yaml": ("model: !!python/object/apply:os.system ['echo pwned']\n", "uses a YAML tag"),
    "python_name.yaml": ("model:\n  lr: !!python/name:os.system\n", "uses a YAML tag"),
    "broken.yaml": ("model: {encoder: [unclosed\n", "is not valid YAML"),
    "scalar_model.yaml": ("model: 5\n", "'model:' must be a mapping"),
    "list_recipe.yaml": ("- model\n- data\n", "holds a YAML list"),
    "typo_key.yaml": ("model:\n  lrr: 0.1\n", "unknown key 'model.lrr'. Did you mean 'lr'?"),
    "import_path.yaml": ("model:\n  encoder: {class_path: os.system}\n", "may not name import paths"),
}

LLAVA_LINES = [  # (JSONL line, reason or None when it converts)
    (json.dumps({"id": "good", "image": "a.png", "conversations": json.loads(conv())["conversations"]}), None),
    (json.dumps({"id": "int", "image": 123, "conversations": json.loads(conv())["conversations"]}),
     "malformed_record"),
    (json.dumps({"id": "null", "image": [None], "conversations": json.loads(conv())["conversations"]}),
     "malformed_record"),
    ('{"id": "cut", "conversations": [', "unreadable_line"),
    ('{"id": "bytes", "conversations": "\xff"}', "unreadable_line"),  # written as raw non-UTF-8 below
    (json.dumps({"id": "escape", "image": "../outside.png", "conversations": json.loads(conv())["conversations"]}),
     "outside_media_root"),
    (json.dumps({"id": "big", "image": "bomb.png", "conversations": json.loads(conv())["conversations"]}),
     "image_too_large"),
    (json.dumps({"id": "good2", "image": "a.png", "conversations": json.loads(conv())["conversations"]}), None),
]


def write_corpus(out: Path) -> Path:
    """Everything under ``out``: shards/, recipes/, llava/ (a JSONL, its media root and a file outside it)."""
    out = Path(out)
    good = {f"good{i}": {"png": png(), "json": conv()} for i in range(4)}
    write_tar(out / "shards" / "mixed" / "shard-0.tar", {**good, **{k: f for k, (f, _) in BAD_SAMPLES.items()}})
    write_tar(out / "shards" / "all_bad" / "shard-0.tar", {k: f for k, (f, _) in BAD_SAMPLES.items()})
    write_truncated(out / "shards" / "truncated")
    full = write_tar(out / "shards" / "truncated_foreign" / "tmp.tar", {f"s{i}": {"png": png(), "json": conv()}
                                                                         for i in range(TRUNCATED[0])})
    data = full.read_bytes()
    full.unlink()
    (out / "shards" / "truncated_foreign" / "shard-0.tar").write_bytes(data[:len(data) // 2])
    for name, (text, _) in RECIPES.items():
        (out / "recipes").mkdir(parents=True, exist_ok=True)
        (out / "recipes" / name).write_text(text)
    (out / "recipes" / "folder.yaml").mkdir(exist_ok=True)
    media = out / "llava" / "media"
    media.mkdir(parents=True, exist_ok=True)
    (media / "a.png").write_bytes(png())
    (media / "bomb.png").write_bytes(bomb_png())
    (out / "llava" / "outside.png").write_bytes(png())
    lines = [line.encode("utf-8") for line, _ in LLAVA_LINES]
    lines[4] = b'{"id": "bytes", "conversations": "\xff\xfe"}'
    (out / "llava" / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (out / "images").mkdir(exist_ok=True)
    (out / "images" / "bomb.png").write_bytes(bomb_png())
    (out / "images" / "huge.png").write_bytes(bomb_png(20000))  # past PIL's own DecompressionBombError limit
    (out / "images" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return out


if __name__ == "__main__":
    print(write_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "corpus")))
