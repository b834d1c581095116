"""Prefill timing: :func:`prefill` is the one place where a benchmark runs a prompt's prefill, and the
``prefill`` suite (``nvila bench prefill``) times it for the same image through STC 2x2 against identity.

NVILA's claim: 4x fewer visual tokens make the language model's prefill about 4x cheaper. For each model size
the suite builds two random-initialised models that differ only in the compressor (and the projector's input
width), encodes one 896x896 image with a question, and times, round by round so that machine noise hits
both alike:

- LLM prefill: the language model's forward over the prompt embeddings (visual tokens spliced in);
- time to first token: :func:`prefill`, the inference engine's prefill from pixels (encoder, compressor,
  projector, language model filling its KV cache, logits of the last position only), as generation runs it.

Each figure is the best of the rounds (other processes on a shared machine only ever add time); the medians
are reported beside them. ``nvila sweep``'s ``prefill_ms`` comes from :func:`time_prefill` too.
"""

from __future__ import annotations

from typing import Any

import torch

from nvila.core.engine import ChatRequest, Engine
from nvila.workflows.bench.measure import Timing, time_call, time_interleaved
from nvila.workflows.bench.models import build_model, demo_parts
from nvila.workflows.bench.record import Metric, Record
from nvila.workflows.bench.runner import BenchRun


def prefill(model: Any, batch: dict[str, Any]) -> Any:
    """Prefill one prompt batch exactly as generation does: the inference engine's prefill, from pixels and
    prompt ids to the KV cache and the logits of the first generated token.

    ``batch`` is what :func:`prompt_batch` makes. Every benchmark's prefill goes through here (``nvila bench
    prefill``'s time to first token and ``nvila sweep``'s ``prefill_ms``).
    """
    return Engine(model).prefill(batch)


def language_model_prefill(model: Any, embeds: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """The engine's prefill of the language model alone, over prompt embeddings with the visual tokens spliced in."""
    return Engine(model).prefill({"attention_mask": attention_mask}, embeds)


def prompt_batch(model: Any, conversation: list[dict[str, str]], images: list[Any]) -> dict[str, Any]:
    """One prompt as generation encodes it (the engine's inputs: chat template, generation prompt, left padding),
    on the model's device."""
    return Engine(model).inputs([ChatRequest(conversation, images=images)])


@torch.no_grad()
def time_prefill(model: Any, batch: dict[str, Any], repeats: int = 5, warmup: int = 1) -> Timing:
    """Seconds of :func:`prefill` over ``repeats`` runs after ``warmup`` untimed ones."""
    device = next(model.parameters()).device
    return time_call(lambda: prefill(model, batch), repeats, warmup, device)


SIZES: dict[str, dict[str, dict[str, Any]]] = {
    # a SigLIP-so400m-shaped encoder (448 px, patch 14, width 1152) cut to 6 of its 27 layers, and a
    # Qwen2-0.5B-shaped language model (width 896, 24 layers, 14 heads, 2 KV heads, MLP 4864)
    "mid": {
        "encoder": {"name": "siglip", "image_size": 448, "patch_size": 14, "hidden_size": 1152,
                    "intermediate_size": 4304, "num_layers": 6, "num_heads": 16},
        "llm": {"name": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_layers": 24, "num_heads": 14,
                "num_kv_heads": 2},
    },
}
"""Fixed sizes by name (the encoder and language model; the compressor is what varies); ``demo`` is read from the
demo recipe when the suite runs (:func:`default_sizes`)."""


def default_sizes() -> dict[str, dict[str, dict[str, Any]]]:
    """The suite's sizes: the demo recipe's encoder and language model as ``nvila fit --config demo`` builds them,
    then :data:`SIZES`."""
    demo = demo_parts()
    return {"demo": {"encoder": demo["encoder"], "llm": demo["llm"]}, **SIZES}


COMPRESSORS = {"identity": {"name": "identity"}, "STC 2x2": {"name": "stc", "ratio": 2}}
BASELINE = "identity"
COMPARE = ("visual tokens", "prompt tokens", "LLM prefill", "time to first token")
SUMMARY = ("The same 896x896 image and question through two random-initialised models that differ only in the "
           "compressor: identity (every feature a token) and NVILA's STC 2x2 (4x fewer tokens); fp32, batch 1, the "
           "two timed round by round after a warm-up round. *LLM prefill* is the language model's forward over the "
           "prompt embeddings; *time to first token* the inference engine's prefill from pixels (as generation runs "
           "it). Times are the best of the rounds, medians beside them. Sizes: *demo* is the demo recipe's model; "
           "*mid* a SigLIP-so400m-shaped encoder cut to 6 layers and a Qwen2-0.5B-shaped language model.")


def configuration_name(size: str, compressor: str) -> str:
    return f"{size}, {compressor}"


def size_model(parts: dict[str, dict[str, Any]], compressor: dict[str, Any]) -> Any:
    """One size's model with ``compressor`` and the MLP projector, random-initialised from seed 0, in eval mode."""
    torch.manual_seed(0)
    return build_model({**parts, "compressor": compressor, "projector": {"name": "mlp"}}, max_length=8192).eval()


@torch.no_grad()
def measure_size(bench: BenchRun, size: str, parts: dict[str, dict[str, Any]], compressors: list[str],
                 repeats: int) -> None:
    """Time the compressors at one model size round by round; add one record per compressor."""
    from PIL import Image

    image = Image.new("RGB", (896, 896), (200, 120, 40))
    conversation = [{"from": "human", "value": "<image>\nWhat shape is shown?"}]
    models, batches, embeds = {}, {}, {}
    for name in compressors:
        models[name] = size_model(parts, COMPRESSORS[name]).to(bench.device)
        batches[name] = prompt_batch(models[name], conversation, [image])
        embeds[name] = Engine(models[name]).embed(batches[name])  # (1, L, D)
    work = {}
    for name, model in models.items():
        mask = batches[name]["attention_mask"]
        work[f"{name}/llm"] = lambda m=model, e=embeds[name], a=mask: language_model_prefill(m, e, a)
        work[f"{name}/ttft"] = lambda m=model, b=batches[name]: prefill(m, b)
    timings = time_interleaved(work, repeats, warmup=1, device=bench.device)
    for name, model in models.items():
        batch, llm, ttft = batches[name], timings[f"{name}/llm"], timings[f"{name}/ttft"]
        ms = 1000
        bench.add(Record(
            bench.suite, configuration_name(size, name),
            metrics={"visual tokens": Metric(int((batch["input_ids"] == model.image_token_id).sum()), "", "lower"),
                     "prompt tokens": Metric(batch["input_ids"].shape[1], "", "lower"),
                     "LLM params": Metric(sum(p.numel() for p in model.llm.parameters()), format="millions"),
                     "LLM prefill": Metric(round(llm.best * ms, 2), "ms", "lower", "{:,.1f}"),
                     "LLM prefill, median": Metric(round(llm.median * ms, 2), "ms", None, "{:,.1f}"),
                     "time to first token": Metric(round(ttft.best * ms, 2), "ms", "lower", "{:,.1f}"),
                     "time to first token, median": Metric(round(ttft.median * ms, 2), "ms", None, "{:,.1f}")},
            baseline=None if name == BASELINE else configuration_name(size, BASELINE)))


def run_prefill_suite(bench: BenchRun, sizes: dict[str, dict[str, dict[str, Any]]] | None = None,
                      repeats: int = 5) -> None:
    """Every selected (size, compressor) pair; each size's rows are reported when its rounds finish."""
    sizes = default_sizes() if sizes is None else sizes
    names = bench.selected([configuration_name(s, c) for s in sizes for c in COMPRESSORS])
    bench.note(f"{repeats} timed rounds after one warm-up round; {torch.get_num_threads()} torch thread(s).")
    for size, parts in sizes.items():
        compressors = [c for c in COMPRESSORS if configuration_name(size, c) in names]
        if compressors:
            measure_size(bench, size, parts, compressors, repeats)
