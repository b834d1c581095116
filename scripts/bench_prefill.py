"""Prefill time for the same image, STC 2x2 against identity (no compression), measured side by side.

NVILA's claim: 4x fewer visual tokens make the language model's prefill about 4x cheaper. For each model
size this builds two random-initialised models that differ only in the compressor (and the projector's
input width), encodes one 896x896 image with a question, and times, alternating between the two so that
machine noise hits both alike:

- language-model prefill: the language model's forward over the prompt embeddings (visual tokens spliced);
- time to first token: the whole forward from pixels (encoder, compressor, projector, prefill).

Each time is the best of ``--repeats`` rounds (as ``timeit`` advises: other processes on a shared machine
only ever add time); the medians are printed too.

Usage:  python scripts/bench_prefill.py [--sizes demo mid] [--repeats 5] [--threads N]

Sizes: ``demo`` is the demo recipe's model (64 px SigLIP, 3 layers; Qwen2 width 128, 3 layers). ``mid``
has a SigLIP-so400m-shaped encoder (448 px, patch 14, width 1152) cut to 6 layers and a Qwen2-0.5B-shaped
language model (width 896, 24 layers, 14 heads, 2 KV heads, MLP 4864: 0.36 B parameters without the
embeddings), fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from nvila.core.model import NvilaModel
from nvila.core.processor import collate

SIZES = {
    "demo": {
        "encoder": {"name": "siglip", "image_size": 64, "patch_size": 8, "hidden_size": 128,
                    "intermediate_size": 256, "num_layers": 3, "num_heads": 4, "feature_layer": -1},
        "llm": {"name": "qwen2", "hidden_size": 128, "intermediate_size": 384, "num_layers": 3, "num_heads": 4,
                "num_kv_heads": 2},
    },
    "mid": {
        "encoder": {"name": "siglip", "image_size": 448, "patch_size": 14, "hidden_size": 1152,
                    "intermediate_size": 4304, "num_layers": 6, "num_heads": 16},
        "llm": {"name": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_layers": 24, "num_heads": 14,
                "num_kv_heads": 2},
    },
}
COMPRESSORS = {"identity": {"name": "identity"}, "stc-2x2": {"name": "stc", "ratio": 2}}


def build(size: str, compressor: dict) -> NvilaModel:
    torch.manual_seed(0)
    spec = {**SIZES[size], "compressor": compressor, "projector": {"name": "mlp"}}
    return NvilaModel({**spec, "max_length": 8192}).eval()


@torch.no_grad()
def measure(size: str, repeats: int) -> dict[str, dict[str, float]]:
    """Best and median seconds of prefill and time to first token per compressor, with token counts."""
    image = Image.new("RGB", (896, 896), (200, 120, 40))
    models = {name: build(size, spec) for name, spec in COMPRESSORS.items()}
    inputs = {}
    for name, model in models.items():
        prompt = model.processor.encode([{"from": "human", "value": "<image>\nWhat shape is shown?"}], [image],
                                        generation_prompt=True)
        batch = collate([prompt], model.tokenizer.pad_token_id, left_pad=True)
        batch.pop("labels")
        embeds = model.embed(batch["input_ids"], batch["pixels"], batch["grids"])  # (1, L, D)
        inputs[name] = (batch, embeds)
    times: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "ttft": []} for n in models}
    for rep in range(repeats + 1):  # the first round warms up and is dropped
        for name, model in models.items():
            batch, embeds = inputs[name]
            start = time.perf_counter()
            model.llm(embeds, attention_mask=batch["attention_mask"])
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            model(**batch)
            ttft = time.perf_counter() - start
            if rep:
                times[name]["prefill"].append(prefill)
                times[name]["ttft"].append(ttft)
    out = {}
    for name, model in models.items():
        batch, _ = inputs[name]
        out[name] = {
            "visual_tokens": int((batch["input_ids"] == model.image_token_id).sum()),
            "prompt_tokens": batch["input_ids"].shape[1],
            "llm_params": sum(p.numel() for p in model.llm.parameters()),
            "prefill": min(times[name]["prefill"]),
            "ttft": min(times[name]["ttft"]),
            "prefill_median": statistics.median(times[name]["prefill"]),
            "ttft_median": statistics.median(times[name]["ttft"]),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, best (median) of {args.repeats}\n")
    print("| size | compressor | visual tokens | prompt tokens | LLM params | LLM prefill (ms) | "
          "time to first token (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        result = measure(size, args.repeats)
        for name, r in result.items():
            print(f"| {size} | {name} | {r['visual_tokens']} | {r['prompt_tokens']} | {r['llm_params'] / 1e6:.1f} M | "
                  f"{r['prefill'] * 1000:.1f} ({r['prefill_median'] * 1000:.1f}) | "
                  f"{r['ttft'] * 1000:.1f} ({r['ttft_median'] * 1000:.1f}) |")
        a, b = result["identity"], result["stc-2x2"]
        print(f"| {size} | **identity / STC ratio** | {a['visual_tokens'] / b['visual_tokens']:.2f}x | "
              f"{a['prompt_tokens'] / b['prompt_tokens']:.2f}x | | **{a['prefill'] / b['prefill']:.2f}x** | "
              f"**{a['ttft'] / b['ttft']:.2f}x** |", flush=True)


if __name__ == "__main__":
    main()
