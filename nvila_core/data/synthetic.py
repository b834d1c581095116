"""A synthetic visual question-answering task that a tiny model can learn on a CPU in minutes.

Each image holds one to four copies of one shape (circle, square or triangle) in one colour, each in
its own quadrant. Questions ask for the colour, the shape, the count, or a position; answers are one or
two words. Everything is drawn from a seeded generator, so a seed gives the same shards every time.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from nvila.core.data.shardset import ShardSetWriter, prepare_output, read_manifest

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three", "four")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")

# Question type -> (phrasings, the full answer set for that type). Chance = 1 / len(answers).
QUESTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "colour": (("What color are the shapes?", "Which color is shown?", "What color is it?"), tuple(COLOURS)),
    "shape": (("What shape is shown?", "Which shape do you see?", "What kind of shape is it?"), SHAPES),
    "count": (("How many shapes are there?", "Count the shapes.", "How many objects are in the image?"), COUNTS),
    "where": (("Where is the shape?", "In which corner is the shape?"), QUADRANTS),
    "occupied": (("Is there a shape in the {q}?", "Is the {q} corner occupied?"), ("yes", "no")),
}


@dataclass(frozen=True)
class SyntheticSample:
    """One generated sample: image, question, answer, and the question type (for chance and reports)."""

    key: str
    image: Image.Image
    question: str
    answer: str
    qtype: str

    def conversation(self) -> dict:
        """The LLaVA-style JSON record stored beside the image in a shard."""
        return {
            "id": self.key,
            "source": "synthetic-shapes",
            "qtype": self.qtype,
            "conversations": [
                {"from": "human", "value": f"<image>\n{self.question}"},
                {"from": "gpt", "value": self.answer},
            ],
        }


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def make_sample(rng: random.Random, key: str, image_size: int = 64) -> SyntheticSample:
    """Draw one image and one question about it."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    count = rng.randint(1, 4)
    cells = sorted(rng.sample(range(4), count))
    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    half = image_size // 2
    for cell in cells:
        side = rng.randint(half * 5 // 10, half * 8 // 10)
        x0 = (cell % 2) * half + rng.randint(1, half - side - 1)
        y0 = (cell // 2) * half + rng.randint(1, half - side - 1)
        _draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])

    qtype = rng.choice(["colour", "shape", "count", "where" if count == 1 else "occupied"])
    phrasings, _ = QUESTIONS[qtype]
    question = rng.choice(phrasings)
    if qtype == "colour":
        answer = colour
    elif qtype == "shape":
        answer = shape
    elif qtype == "count":
        answer = COUNTS[count - 1]
    elif qtype == "where":
        answer = QUADRANTS[cells[0]]
    else:
        asked = rng.randrange(4)
        question = question.format(q=QUADRANTS[asked])
        answer = "yes" if asked in cells else "no"
    return SyntheticSample(key, image, question, answer, qtype)


def chance_accuracy(qtypes: list[str]) -> float:
    """Expected accuracy of guessing uniformly among each question type's answers."""
    return sum(1 / len(QUESTIONS[q][1]) for q in qtypes) / max(len(qtypes), 1)


def write_split(out: Path, count: int, seed: int, image_size: int = 64, shard_size: int = 1000,
                overwrite: bool = False) -> list[Path]:
    """Write ``count`` samples as webdataset tar shards (png + json per sample) under ``out``.

    Through :class:`ShardSetWriter`: an interrupted run leaves no partial shard, and a rerun starts clean. A
    finished split written with the same settings is kept as it is (a rerun after an interruption in the
    next split resumes there); a different finished one is refused unless ``overwrite``.
    """
    out = Path(out)
    params = {"count": count, "seed": seed, "image_size": image_size, "shard_size": shard_size,
              "generator": _generator_fingerprint()}
    if prepare_output(out, overwrite, params):
        return sorted(out / name for name in read_manifest(out)["shards"])
    rng = random.Random(seed)
    with ShardSetWriter(out, shard_size, writer="nvila data synth", params=params, prepared=True) as sink:
        for i in range(count):
            sample = make_sample(rng, f"{seed:04d}-{i:07d}", image_size)
            png = io.BytesIO()
            sample.image.save(png, format="PNG")
            sink.write({"__key__": sample.key, "png": png.getvalue(),
                        "json": json.dumps(sample.conversation()).encode()})
    return sink.paths


def _generator_fingerprint() -> str:
    """A digest of this module's source: a split written by other generator code is never kept as the same."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def write_dataset(out: Path, train: int = 20000, val: int = 500, seed: int = 0,
                  image_size: int = 64, overwrite: bool = False) -> dict[str, list[Path]]:
    """Train and validation splits under ``out/train`` and ``out/val``, from independent seeds."""
    return {"train": write_split(out / "train", train, seed * 2 + 1, image_size, overwrite=overwrite),
            "val": write_split(out / "val", val, seed * 2 + 2, image_size, overwrite=overwrite)}
