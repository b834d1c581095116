"""The data suite (``nvila bench data``): what one data-loading worker delivers, and packing against padding.

- *pipeline*: one worker's work timed in this process with one torch thread, as a DataLoader worker runs it:
  decode, the encoder's preprocessing, tokenization and batching (``decoded_stream`` + ``Batching``) for demo
  samples and 640x480 JPEGs; decoding and preprocessing 32 frames of 10-second clips for videos.
- *packing*: the demo model trained on mixed-length samples, padded batches against packed rows, one untimed
  warm-up step a side; every step is ``NvilaModule.training_step`` (see
  :class:`~nvila.workflows.bench.training.TrainingSteps`).

Everything is generated here (images, MP4 clips, conversations); nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nvila.workflows.bench.measure import Stopwatch, time_call, torch_threads
from nvila.workflows.bench.models import build_model, build_module, demo_parts
from nvila.workflows.bench.record import Metric, Record
from nvila.workflows.bench.runner import BenchRun


@dataclass
class DataSizes:
    """How much data each measurement uses."""

    images: int = 200
    """Image samples per image measurement."""
    videos: int = 4
    """Clips for the video measurement (each 10 s at 30 fps)."""
    samples: int = 512
    """Mixed-length samples for the packing comparison."""
    pack_tokens: int = 1024
    """Tokens per packed row."""
    steps: int = 12
    """Timed training steps for each side of the packing comparison."""
    demo_steps: int = 10
    """Timed steps of the demo's training step."""


DEMO_STEP = "pipeline: demo training step (batch 32)"
DEMO_SAMPLE = "pipeline: demo sample (64 px PNG)"
IMAGE_SAMPLE = "pipeline: image (640x480 JPEG to a 448 px tile)"
VIDEO_SAMPLE = "pipeline: video (10 s 640x360 MP4, 32 frames at 448 px)"
PADDED = "packing: padded (batch 16)"
COMPARE = ("rate", "non-padding share", "throughput")
SUMMARY = ("*pipeline*: one data-loading worker's samples/s, timed in one process with one torch thread: decode, "
           "the encoder's preprocessing, tokenization and batching (demo samples through the demo model's "
           "processor; 640x480 JPEGs through SigLIP's at a 448 px tile); for videos, decoding a 10-second 30 fps "
           "clip and preprocessing 32 uniformly sampled frames at 448 px. The demo sample's gain is against the "
           "demo's own training step (the demo recipe's model and batch of 32, fp32, this process's threads, median "
           "of the timed steps): one worker produces that many times what training consumes. *packing*: the demo "
           "model trained on mixed-length samples (image questions with 0-6 extra turns, text-only samples of "
           "10-300 tokens), batches of 16 padded samples against rows packed to a token budget with a "
           "block-diagonal mask, one untimed warm-up step a side; throughput counts non-padding tokens trained on "
           "(forward, backward, AdamW step), fp32.")


def packed_name(pack_tokens: int) -> str:
    return f"packing: packed (4 rows of {pack_tokens} tokens)"


def photo(rng: random.Random, size: tuple[int, int] = (640, 480)) -> Any:
    """A noisy photo-like image (JPEG of noise is as costly to decode as a photo, or more)."""
    from PIL import Image

    base = Image.effect_noise(size, rng.randint(20, 80)).convert("RGB")
    return Image.blend(base, Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3))), 0.5)


def write_shard(path: Path, samples: list[dict[str, Any]]) -> str:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def measure_demo_step(bench: BenchRun, parts: dict[str, Any], sizes: DataSizes, batch_size: int = 32) -> None:
    """Samples/s the demo's training step consumes: the demo recipe's model, a batch of demo samples."""
    from nvila.core.data.synthetic import make_sample
    from nvila.core.processor import collate
    from nvila.workflows.bench.training import TrainingSteps

    torch.manual_seed(0)
    rng = random.Random(1)
    module = build_module({**parts, "max_length": 256})
    samples = []
    for i in range(batch_size):
        s = make_sample(rng, str(i), image_size=64)
        samples.append(module.model.processor.encode(
            [{"from": "human", "value": f"<image>\n{s.question}"}, {"from": "gpt", "value": s.answer}], [s.image]))
    batch = {k: v.to(bench.device) if torch.is_tensor(v) else v
             for k, v in collate(samples, module.model.tokenizer.pad_token_id).items()}
    step = TrainingSteps(module, bench.device)
    timing = time_call(lambda: step(batch), repeats=sizes.demo_steps, warmup=1, device=bench.device)
    bench.add(Record(bench.suite, DEMO_STEP, group="pipeline",
                     settings={"samples": batch_size * sizes.demo_steps, "torch threads": torch.get_num_threads()},
                     metrics={"rate": Metric(round(batch_size / timing.median, 2), "samples/s", "higher",
                                             "{:,.2f}"),
                              "time per sample": Metric(round(timing.median / batch_size * 1000, 1), "ms", "lower",
                                                        "{:,.1f}")}))


def one_worker(bench: BenchRun, name: str, shard: str, processor: Any, baseline: str | None = None) -> None:
    """Time one worker's work on a shard (decode, preprocess, tokenize, batch) and add its record."""
    from nvila.core.data.packing import Batching
    from nvila.core.data.shards import SampleDecoder, decoded_stream

    with torch_threads(1), Stopwatch() as watch:
        batches = list(Batching(16, 0)(decoded_stream([shard], SampleDecoder(processor))))
    used = sum(b["num_samples"] for b in batches)
    skipped = sum(len(b["skipped"]) for b in batches)
    record = per_worker_record(bench.suite, name, used, watch.seconds,
                               notes=[f"{skipped} sample(s) skipped"] if skipped else [])
    record.baseline = baseline
    bench.add(record)


def per_worker_record(suite: str, name: str, samples: int, seconds: float, notes: list[str] | None = None) -> Record:
    return Record(suite, name, group="pipeline", settings={"samples": samples, "torch threads": 1},
                  metrics={"rate": Metric(round(samples / seconds, 2), "samples/s", "higher", "{:,.2f}"),
                           "time per sample": Metric(round(seconds / samples * 1000, 1), "ms", "lower", "{:,.1f}")},
                  notes=notes or [])


def measure_pipeline(bench: BenchRun, names: list[str], sizes: DataSizes, tmp: Path) -> None:
    from nvila.core.data.synthetic import make_sample
    from nvila.core.data.video import VideoSampling, decode_video, encode_video

    rng = random.Random(0)
    demo = demo_parts()
    if DEMO_STEP in names:
        measure_demo_step(bench, demo, sizes)
    if DEMO_SAMPLE in names:
        samples = []
        for i in range(sizes.images):
            s = make_sample(rng, f"d{i:05d}", image_size=64)
            buf = io.BytesIO()
            s.image.save(buf, format="PNG")
            samples.append({"__key__": s.key, "png": buf.getvalue(), "json": json.dumps(s.conversation()).encode()})
        model = build_model(demo, max_length=256)
        one_worker(bench, DEMO_SAMPLE, write_shard(tmp / "demo.tar", samples), model.processor, baseline=DEMO_STEP)
    if IMAGE_SAMPLE not in names and VIDEO_SAMPLE not in names:
        return
    # NVILA's resolution: the demo model's encoder at a 448 px tile (patch 14); only its processor is used
    model448 = build_model({**demo, "encoder": {**demo["encoder"], "image_size": 448, "patch_size": 14}},
                           max_length=2048)
    if IMAGE_SAMPLE in names:
        conversation = json.dumps({"conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                                     {"from": "gpt", "value": "A photo."}]}).encode()
        jpegs = []
        for i in range(sizes.images):
            buf = io.BytesIO()
            photo(rng).save(buf, format="JPEG", quality=90)
            jpegs.append({"__key__": f"i{i:05d}", "jpg": buf.getvalue(), "json": conversation})
        one_worker(bench, IMAGE_SAMPLE, write_shard(tmp / "images.tar", jpegs), model448.processor)
    if VIDEO_SAMPLE in names:
        clips = []
        for _ in range(sizes.videos):
            frames = [photo(rng, (640, 360)) for _ in range(8)]
            clips.append(encode_video([frames[i % 8] for i in range(300)], fps=30))
        sampling, frame = VideoSampling(num_frames=32), model448.processor.image_processor.frame
        with torch_threads(1), Stopwatch() as watch:
            for data in clips:
                prepared = [frame(f) for f in decode_video(data, sampling)]
                assert len(prepared) == 32, len(prepared)
        bench.add(per_worker_record(bench.suite, VIDEO_SAMPLE, len(clips), watch.seconds))


def mixed_samples(model: Any, count: int, seed: int = 0) -> list[Any]:
    """Mixed lengths: image questions with 0-6 extra turns, and text-only samples of 10 to 300 tokens."""
    from nvila.core.data.synthetic import make_sample

    rng = random.Random(seed)
    out = []
    for i in range(count):
        s = make_sample(rng, str(i), image_size=64)
        if rng.random() < 0.3:
            turns = [{"from": "human", "value": "tell me more " * rng.randint(2, 60)},
                     {"from": "gpt", "value": "sure " * rng.randint(1, 40)}]
            out.append(model.processor.encode(turns))
            continue
        turns = [{"from": "human", "value": f"<image>\n{s.question}"}, {"from": "gpt", "value": s.answer}]
        for _ in range(rng.randint(0, 6)):
            turns += [{"from": "human", "value": "and what else " * rng.randint(1, 8)},
                      {"from": "gpt", "value": " ".join(rng.choice(["red", "blue", "square"]) for _ in range(6))}]
        out.append(model.processor.encode(turns, [s.image]))
    return out


def measure_packing(bench: BenchRun, names: list[str], sizes: DataSizes) -> None:
    from nvila.core.data.packing import Batching, model_inputs
    from nvila.workflows.bench.training import TrainingSteps

    if PADDED not in names and packed_name(sizes.pack_tokens) not in names:
        return
    torch.manual_seed(0)
    module = build_module({**demo_parts(), "max_length": 512})
    model, pad = module.model, module.model.tokenizer.pad_token_id
    step = TrainingSteps(module, bench.device)
    samples = mixed_samples(model, sizes.samples)
    lengths = [len(s.input_ids) for s in samples]
    tokens = sum(lengths)
    bench.note(f"packing: {len(samples)} samples of {min(lengths)}-{max(lengths)} tokens "
               f"(mean {tokens / len(samples):.0f}); {sizes.steps} timed steps a side.")
    setups = {PADDED: Batching(16, pad),
              packed_name(sizes.pack_tokens): Batching(4, pad, pack_tokens=sizes.pack_tokens)}
    for name, batching in setups.items():
        if name not in names:
            continue
        batches = list(batching(iter(samples)))
        timed = [{k: v.to(bench.device) if torch.is_tensor(v) else v for k, v in model_inputs(b, model.llm).items()}
                 for b in batches[: sizes.steps]]
        step(timed[0])  # warm-up: each side starts with the optimizer state allocated
        with Stopwatch(bench.device) as watch:
            for batch in timed:
                step(batch)
        trained = sum(int((b["input_ids"] != pad).sum()) for b in batches[: sizes.steps])
        bench.add(Record(
            bench.suite, name, group="packing",
            settings={"samples": sum(b["num_samples"] for b in batches), "timed steps": len(timed)},
            metrics={"non-padding share": Metric(round(tokens / sum(b["input_ids"].numel() for b in batches), 4),
                                                 "", "higher", "{:.1%}"),
                     "batches": Metric(len(batches)),
                     "throughput": Metric(round(trained / watch.seconds, 1), "tokens/s", "higher", "{:,.0f}")},
            baseline=None if name == PADDED else PADDED))


def run_data_suite(bench: BenchRun, sizes: DataSizes | None = None) -> None:
    """The pipeline rows, then the packing rows, each reported as it finishes."""
    sizes = sizes or DataSizes()
    names = bench.selected([DEMO_STEP, DEMO_SAMPLE, IMAGE_SAMPLE, VIDEO_SAMPLE, PADDED, packed_name(sizes.pack_tokens)])
    bench.note("sizes: " + ", ".join(f"{k} {v}" for k, v in asdict(sizes).items()))
    with tempfile.TemporaryDirectory() as tmp:
        measure_pipeline(bench, names, sizes, Path(tmp))
    measure_packing(bench, names, sizes)
