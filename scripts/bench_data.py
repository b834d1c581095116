"""Data-path benchmarks for docs/benchmarks.md: pipeline throughput per worker, and packing against padding.

    python scripts/bench_data.py pipeline     # image and 32-frame video samples/s in one worker
    python scripts/bench_data.py packing      # non-padding share and training tokens/s, packed vs padded

Everything is generated here (images, MP4 clips, conversations); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from nvila.core.data.packing import Batching, model_inputs
from nvila.core.data.shards import SampleDecoder, decoded_stream
from nvila.core.data.synthetic import make_sample
from nvila.core.data.video import VideoSampling, decode_video, encode_video
from nvila.core.model import NvilaModel
from nvila.core.processor import Encoded
from nvila.workflows.cli import model_spec, read_recipe

DEMO = model_spec(read_recipe(["--config", "demo"])).to_dict()  # the demo recipe's model


def photo(rng: random.Random, size=(640, 480)) -> Image.Image:
    """A noisy photo-like image (JPEG of noise is as costly to decode as a photo, or more)."""
    base = Image.effect_noise(size, rng.randint(20, 80)).convert("RGB")
    return Image.blend(base, Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3))), 0.5)


def write_shard(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


def per_worker(shard: str, decoder: SampleDecoder) -> tuple[float, int]:
    """Samples/s of one worker's work (decode, preprocess, tokenize, batch) on this process."""
    start = time.perf_counter()
    batches = list(Batching(16, 0)(decoded_stream([shard], decoder)))
    seconds = time.perf_counter() - start
    used = sum(b["num_samples"] for b in batches)
    assert not any(b["skipped"] for b in batches), [b["skipped"] for b in batches]
    return used / seconds, used


def bench_pipeline(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # one DataLoader worker
    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp())
    conv = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A photo."}]

    # images: 640x480 JPEGs, the SigLIP preprocessing at NVILA's 448 px tile
    jpegs = []
    for i in range(args.images):
        buf = io.BytesIO()
        photo(rng).save(buf, format="JPEG", quality=90)
        record = json.dumps({"conversations": conv}).encode()
        jpegs.append({"__key__": f"i{i:05d}", "jpg": buf.getvalue(), "json": record})
    shard = write_shard(tmp / "images.tar", jpegs)
    spec448 = {**DEMO, "encoder": {**DEMO["encoder"], "image_size": 448, "patch_size": 14}}
    model = NvilaModel({**spec448, "max_length": 2048})
    rate, n = per_worker(shard, SampleDecoder(model.processor))
    print(f"image 640x480 JPEG -> SigLIP 448 px tile + tokenize + batch: {rate:.0f} samples/s per worker ({n} samples)")

    demo_images = []
    for i in range(args.images):
        s = make_sample(rng, f"d{i:05d}", image_size=64)
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        demo_images.append({"__key__": s.key, "png": buf.getvalue(), "json": json.dumps(s.conversation()).encode()})
    demo = NvilaModel({**DEMO, "max_length": 256})
    rate, n = per_worker(write_shard(tmp / "demo.tar", demo_images), SampleDecoder(demo.processor))
    print(f"demo sample (64 px PNG) -> demo model's processor: {rate:.0f} samples/s per worker ({n} samples)")

    # videos: 10 s clips, 30 fps, 640x360, 32 frames sampled, each frame preprocessed by the encoder (448 px)
    clips = []
    for _ in range(args.videos):
        frames = [photo(rng, (640, 360)) for _ in range(8)]
        clips.append(encode_video([frames[i % 8] for i in range(300)], fps=30))
    sampling = VideoSampling(num_frames=32)
    frame_processor = model.processor.image_processor
    start = time.perf_counter()
    for data in clips:
        prepared = [frame_processor.frame(f) for f in decode_video(data, sampling)]
        assert len(prepared) == 32
    seconds = time.perf_counter() - start
    print(f"video 10 s 30 fps 640x360 MP4 -> 32 frames -> 448 px each: {len(clips) / seconds:.2f} samples/s "
          f"per worker ({len(clips)} clips, {seconds / len(clips) * 1000:.0f} ms each)")


def mixed_samples(model: NvilaModel, count: int, seed: int = 0) -> list[Encoded]:
    """Mixed lengths: image questions with 0-6 extra turns, and text-only samples of 10 to 300 tokens."""
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


def bench_packing(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = NvilaModel({**DEMO, "max_length": 512})
    pad = model.tokenizer.pad_token_id
    samples = mixed_samples(model, args.samples)
    lengths = [len(s.input_ids) for s in samples]
    print(f"{len(samples)} samples, {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f})")
    setups = {"padded, batch 16": Batching(16, pad), f"packed, rows of {args.pack_tokens}, 4 rows":
              Batching(4, pad, pack_tokens=args.pack_tokens)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for name, batching in setups.items():
        batches = list(batching(iter(samples)))
        real = sum(b["num_samples"] for b in batches)
        tokens = sum(len(s.input_ids) for s in samples)
        slots = sum(b["input_ids"].numel() for b in batches)
        model.train()
        start = time.perf_counter()
        for b in batches[: args.steps]:
            loss = model(**model_inputs(b, model.llm))["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds = time.perf_counter() - start
        trained = sum(int((b["input_ids"] != pad).sum()) for b in batches[: args.steps])
        print(f"{name}: {len(batches)} batches for {real} samples; non-padding {tokens / slots:.1%}; "
              f"{trained / seconds:.0f} training tokens/s ({args.steps} steps, {seconds:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pipeline")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--videos", type=int, default=6)
    k = sub.add_parser("packing")
    k.add_argument("--samples", type=int, default=512)
    k.add_argument("--pack-tokens", type=int, default=1024)
    k.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    {"pipeline": bench_pipeline, "packing": bench_packing}[args.what](args)


if __name__ == "__main__":
    main()
