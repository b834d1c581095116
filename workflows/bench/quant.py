"""The quantization suites (issue 13): ``quant-ttft`` (time to first token with a W8A8 vision tower),
``quant-decode`` (decode with a W4A16 language model), ``quant-peer`` (against transformers' LLaVA-OneVision with
the same widths), ``quant-quality`` (quantized against full precision on held-out conversations) and ``qlora``
(PEFT over a W4A16 language model: peak training memory against bf16-frozen PEFT, and NVILA-8B's training state
counted on the meta device).

Timings alternate between the configurations round by round and keep the best round (other processes on a
shared machine only ever add time), after a warm-up round on a small image that also packs the quantized layers.
The timing suites measure the machine's limits in the same run (copy bandwidth, peak matmul FLOP/s per dtype)
and report each configuration's share of them; each target of the issue is a note on its row, met or missed.

Sizes (configuration names start with them, so ``--only demo`` runs the demo size): ``demo`` is the demo recipe's
model. ``mid`` has NVILA's vision side at reduced depth: DynS2 over 448 px tiles at scales 448 and 896 of a
SigLIP-so400m-shaped encoder (patch 14, width 1152, MLP 4304) cut to 6 layers, STC 2x2 and the MLP projector;
and a Qwen2-0.5B-shaped language model (width 896, 24 layers, 14 heads, 2 KV heads, MLP 4864: 358M parameters,
1.4 GB in fp32, 0.7 GB in bf16), random weights, the shipped small tokenizer. ``mid-1tile`` (quality) is mid on
one 448 px tile. The peer is built with the same widths and depths.
"""

from __future__ import annotations

import copy
import gc
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from nvila.core.engine import ChatRequest, Engine
from nvila.core.errors import NvilaError
from nvila.core.model import NvilaModel
from nvila.quant import int4_cpu, w8a8
from nvila.quant.w4a16 import Int4WeightOnlyLinear
from nvila.workflows.bench.measure import Stopwatch, synchronize, time_call
from nvila.workflows.bench.record import Metric, Record
from nvila.workflows.bench.runner import BenchRun
from nvila.workflows.quantize import serving_mix

SIGLIP_MID = {"name": "siglip", "image_size": 448, "patch_size": 14, "hidden_size": 1152, "intermediate_size": 4304,
              "num_layers": 6, "num_heads": 16, "feature_layer": -1}
QWEN2_MID = {"name": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_layers": 24, "num_heads": 14,
             "num_kv_heads": 2}
SIZES: dict[str, dict[str, Any]] = {
    "mid": {"encoder": {"name": "dyns2", "scales": [448, 896], "max_tiles": 12, "base": SIGLIP_MID},
            "compressor": {"name": "stc", "ratio": 2}, "projector": {"name": "mlp"}, "llm": QWEN2_MID,
            "max_length": 16384},
}
"""Fixed sizes by name; ``demo`` is not here but read from the demo recipe itself (:func:`size_spec`)."""
SIZES["mid-1tile"] = {**SIZES["mid"], "encoder": SIGLIP_MID}
"""The mid model with its encoder on one 448 px tile (256 visual tokens): quality runs many forwards."""
TIMED_SIZES = ("demo", "mid")
IMAGES = ((896, 896), (1920, 1080))
QUESTION = "What is shown in this image? Answer briefly."
DEPLOYED = serving_mix({"encoder": {"name": "w8a8"}, "llm": {"name": "w4a16", "method": "rtn"}})
"""The serving mix as ``nvila quantize --vision w8a8 --llm w4a16`` writes it (the projector in W16A16), for timing
(AWQ and round-to-nearest run at the same speed; quality compares them)."""
TORCH_INT4 = "w4a16-torch"
"""W4A16 on torch's CPU int4 kernel (``kernel: cpu``), beside ``w4a16`` on the kernel 'auto' picks."""
INT8_ACTIVATIONS = "w4a16-a8"
"""The W4A16 checkpoint on nvila's CPU kernel with decoding activations rounded to int8 per group of 128
(``kernel: avx512_vnni``); measured where that kernel runs."""
A8_NOTE = ("activations rounded to int8 per group of 128 at decoding (kernel avx512_vnni, llama.cpp's way): the "
           "targets are for 16-bit activations, so this row is beside them, not an answer to them")
A8_RUNS = int4_cpu.int8_missing() is None
"""Whether ``kernel: avx512_vnni`` runs here: its rows are measured only where it does."""
W8A8_TORCH_AO = "w8a8-bf16-fbgemm"
"""The W8A8 tower on torch.ao's dynamic int8 linear (fbgemm: fp32 in and out, one activation scale a call), beside
``w8a8-bf16`` where ``auto`` picks nvila's own int8 linear instead."""
W8A8_OWN_KERNEL = A8_RUNS and not w8a8.cpu_has("amx")
"""Whether W8A8's ``auto`` picks nvila's int8 linear here (AVX512-VNNI, no AMX; told without building it)."""
DEPLOYED_A8 = "deployed-a8"
"""The deployed mix with the language model on ``kernel: avx512_vnni``: int8 activations at prefill too (an int8
GEMM over the weight widened to int8), so that the whole prefill runs int8 products."""
DEPLOYED_A8_NOTE = ("the language model's activations rounded to int8 too (kernel avx512_vnni: per row at prefill, "
                    "an int8 GEMM): beside the target, which is the W8A8 tower's alone")
LIMITS_GROUP = "machine limits"


# -- helpers --------------------------------------------------------------------------------------------------
def best_of(fn: Callable[[], Any], repeats: int, device: str = "cpu") -> float:
    return time_call(fn, repeats, warmup=0, device=device).best


def image(width: int, height: int) -> Image.Image:
    """A deterministic picture with some structure (a gradient and a rectangle)."""
    x = torch.linspace(0, 255, width).expand(height, width)
    y = torch.linspace(0, 255, height)[:, None].expand(height, width)
    rgb = torch.stack([x, y, 255 - x], dim=-1).to(torch.uint8)
    rgb[height // 4: height // 2, width // 3: width // 2] = torch.tensor([250, 250, 20], dtype=torch.uint8)
    return Image.fromarray(rgb.numpy())


def request(width: int, height: int) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": f"<image>\n{QUESTION}"}], images=[image(width, height)])


def size_spec(size: str) -> dict[str, Any]:
    """The model spec of a size: ``demo`` is the demo recipe's model as ``nvila fit --config demo`` builds it."""
    if size == "demo":
        from nvila.workflows.bench.models import demo_model_spec

        return demo_model_spec()
    if size not in SIZES:
        raise NvilaError(f"Unknown size '{size}'; sizes: demo, {', '.join(SIZES)}.")
    return copy.deepcopy(SIZES[size])


def build(size: str, seed: int = 0) -> NvilaModel:
    spec = size_spec(size)
    torch.manual_seed(seed)
    return NvilaModel(spec).eval()


def to_bf16(model: NvilaModel) -> NvilaModel:
    """The whole model in bf16 (weights and activations), as a 16-bit baseline."""
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    return model


def variants(base: NvilaModel, names: Sequence[str], device: str = "cpu") -> dict[str, NvilaModel]:
    """Copies of ``base`` per configuration name: fp32, bf16, w8a8 (vision W8A8, rest fp32), w8a8-bf16 (vision
    W8A8, rest bf16), w4a16 (language model W4A16, rest fp32), w4a16-torch (the same on torch's CPU int4 kernel),
    w4a16-a8 (the same with int8 activations), deployed (W8A8 vision, W4A16 language model, W16A16 projector),
    deployed-a8 (the same with the language model's activations in int8)."""
    out = {}
    for name in names:
        model = copy.deepcopy(base)
        if name == "bf16":
            to_bf16(model)
        elif name == "w8a8":
            model.quantize({"encoder": {"name": "w8a8", "dtype": "fp32"}})
        elif name == "w8a8-bf16":
            to_bf16(model).quantize({"encoder": {"name": "w8a8", "dtype": "bf16"}})
        elif name == W8A8_TORCH_AO:
            to_bf16(model).quantize({"encoder": {"name": "w8a8", "dtype": "bf16", "kernel": "fbgemm"}})
        elif name == "w4a16":
            model.quantize({"llm": DEPLOYED["llm"]})
        elif name == TORCH_INT4:
            model.quantize({"llm": {**DEPLOYED["llm"], "kernel": "cpu"}})
        elif name == INT8_ACTIVATIONS:
            model.quantize({"llm": {**DEPLOYED["llm"], "kernel": "avx512_vnni"}})
        elif name == "deployed":
            model.quantize(DEPLOYED)
        elif name == DEPLOYED_A8:
            model.quantize({**DEPLOYED, "llm": {**DEPLOYED["llm"], "kernel": "avx512_vnni"}})
        elif name != "fp32":
            raise NvilaError(f"unknown configuration '{name}'")
        out[name] = model.to(device)  # quantized layers pack for the device on their first forward
    return out


def llm_bytes(model: NvilaModel) -> int:
    """Bytes of the language model's weights as stored (a tied output layer counts once)."""
    seen, total = set(), 0
    for tensor in model.llm.state_dict().values():
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def target_note(what: str, value: float, target: float, unit: str, met: bool, shown: str | None = None) -> str:
    """A target of the issue and whether this row meets it, as a report note (the value with as many digits as
    it takes to tell it from the target: 49.96 %, not 50 %, for a missed 50 %); ``shown`` writes the target as the
    issue does (``1/3`` rather than 0.333333)."""
    digits = 3
    while float(f"{value:.{digits}g}") == abs(target) and value != abs(target) and digits < 8:
        digits += 1
    return f"target: {what} {'≥' if target > 0 else '≤'} {shown or f'{abs(target):g}'}{unit}: " \
           f"{'met' if met else 'MISSED'} ({value:.{digits}g}{unit})"


def sizes_of(bench: BenchRun, names: Sequence[str], sizes: Sequence[str]) -> dict[str, list[str]]:
    """The selected configuration names (``--only``), per size (names start with their size)."""
    kept = bench.selected(names)
    return {size: [n for n in kept if n.split(" ", 1)[0] == size] for size in sizes}


# -- the machine's limits -------------------------------------------------------------------------------------
@dataclass
class Limits:
    bandwidth: float
    """Bytes per second moved by a large copy (read + write)."""
    peak: dict[str, float]
    """FLOP/s of a large matmul per dtype (fp32, bf16) and of the W8A8 kernel's linear (int8)."""


def machine_limits(repeats: int = 5, copy_mib: int = 512, matmul: tuple[int, int, int] = (2048, 4096, 4096),
                   device: str = "cpu") -> Limits:
    """Memory bandwidth (a large copy, far beyond the caches) and peak matmul throughput per dtype."""
    bandwidth = _copy_bandwidth(copy_mib * 1024 * 1024 // 4, repeats, device)
    m, k, n = matmul
    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        a @ b
        peak[name] = 2 * m * k * n / best_of(lambda a=a, b=b: a @ b, repeats, device)
    peak["int8"] = _int8_peak(m, k, n, repeats, device)
    return Limits(bandwidth, peak)


def limits_record(bench: BenchRun, limits: Limits, copy_mib: int = 512,
                  matmul: tuple[int, int, int] = (2048, 4096, 4096)) -> Record:
    """The limits measured at the start of a suite, as a record of its own group."""
    m, k, n = matmul
    return bench.add(Record(
        bench.suite, "machine limits", group=LIMITS_GROUP,
        metrics={"copy bandwidth (read + write)": Metric(round(limits.bandwidth / 1e9, 2), "GB/s", format="{:.3g}"),
                 **{f"{name} matmul": Metric(round(flops / 1e9, 1), "GFLOP/s", format="{:,.0f}")
                    for name, flops in limits.peak.items()}},
        notes=[f"a {copy_mib} MiB fp32 copy; the best of 5 matmuls {m}x{k}x{n} per dtype; int8 is the W8A8 "
               "kernel's linear on the same shape (activation quantization included)"]))


def _copy_bandwidth(numel: int, repeats: int, device: str = "cpu") -> float:
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / best_of(lambda: dst.copy_(src), repeats, device)


def _int8_peak(m: int, k: int, n: int, repeats: int, device: str = "cpu") -> float:
    """FLOP/s of the W8A8 quantizer's kernel on one large linear (activation quantization included)."""
    from nvila.core.specs import build as build_component

    layer = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
    build_component("quantizer", {"name": "w8a8", "dtype": "fp32"}).quantize(layer)
    layer.to(device)
    x = torch.randn(m, k, device=device)
    with torch.no_grad():
        layer(x)
        return 2 * m * k * n / best_of(lambda: layer(x), repeats, device)


# -- quant-ttft: time to first token --------------------------------------------------------------------------
TTFT_CONFIGS = ("fp32", "w8a8", "bf16", "w8a8-bf16", *((W8A8_TORCH_AO,) if W8A8_OWN_KERNEL else ()), "deployed",
                *((DEPLOYED_A8,) if A8_RUNS else ()))
TTFT_BASELINES = {"bf16": "fp32", "w8a8": "fp32", "w8a8-bf16": "bf16", W8A8_TORCH_AO: "bf16", "deployed": "bf16",
                  DEPLOYED_A8: "bf16"}
"""Each configuration against the unquantized one of its dtype (the deployed mix also against fp32, in a note)."""
TTFT_SUMMARY = (
    "Time to first token (`Engine.prefill`: vision tower, then the language model's prefill) of one image question "
    "per configuration: fp32; w8a8 = W8A8 vision tower, rest fp32; bf16; w8a8-bf16 = W8A8 tower with its attention "
    "and norms in bf16, rest bf16 (where `auto` picks nvila's int8 linear, also w8a8-bf16-fbgemm = the same on "
    "torch.ao's dynamic int8 linear); deployed = W8A8 tower + W4A16 language model (round to nearest) + the "
    "projector in 16 bits (W16A16), as `nvila quantize` writes it; where the "
    "CPU has AVX512-VNNI, deployed-a8 = the same with the language model's activations in int8 (`kernel: "
    "avx512_vnni`; at prefill an int8 GEMM over its weights widened to int8 per channel). Best of the rounds, "
    "configurations alternated round by round after a warm-up round. Target (mid): W8A8 >= 1.3x faster end to end.")


def ttft_name(size: str, width: int, height: int, config: str) -> str:
    return f"{size} {width}x{height} {config}"


def start_timed_suite(bench: BenchRun, names: list[str], sizes: Sequence[str],
                      limits: Limits | None) -> tuple[dict[str, list[str]], Limits]:
    """The configurations ``--only`` keeps, by size, and the machine's limits (measured unless given), recorded
    first as a row of their own: what every timed suite starts with."""
    selected = sizes_of(bench, names, sizes)
    bench.total = (bench.total or 0) + 1  # the limits' row
    limits = limits or machine_limits(device=bench.device)
    limits_record(bench, limits)
    return selected, limits


@torch.no_grad()
def run_ttft_suite(bench: BenchRun, sizes: Sequence[str] = TIMED_SIZES,
                   images: Sequence[tuple[int, int]] = IMAGES, repeats: int = 2,
                   limits: Limits | None = None) -> None:
    names = [ttft_name(s, w, h, c) for s in sizes for w, h in images for c in TTFT_CONFIGS]
    selected, limits = start_timed_suite(bench, names, sizes, limits)
    repeats = bench.rounds(repeats)
    for size, kept in selected.items():
        if kept:
            time_to_first_token(bench, size, [i for i in images if any(ttft_name(size, *i, c) in kept
                                                                      for c in TTFT_CONFIGS)],
                                [c for c in TTFT_CONFIGS if any(n.endswith(" " + c) for n in kept)], repeats, limits)
            gc.collect()
    bench.order(names)


def time_to_first_token(bench: BenchRun, size: str, images: Sequence[tuple[int, int]], configs: Sequence[str],
                        repeats: int, limits: Limits) -> None:
    """Time to first token (vision tower + language-model prefill, as ``Engine.prefill`` runs them) per config."""
    device = bench.device
    base = build(size)
    models = variants(base, configs, device)
    del base
    gc.collect()
    engines = {name: Engine(model) for name, model in models.items()}
    for engine in engines.values():  # packs the quantized layers; first-call costs
        engine.prefill(engine.inputs([request(448, 448)]))
    for width, height in images:
        inputs = {name: e.inputs([request(width, height)]) for name, e in engines.items()}
        best = {name: [math.inf, math.inf] for name in engines}
        peak = limits.peak["bf16"]
        for _ in range(repeats):
            peak = max(peak, machine_limits(1, copy_mib=8, device=device).peak["bf16"])  # under the same load
            for name, engine in engines.items():
                with Stopwatch(device) as whole:
                    with Stopwatch(device) as vision:
                        embeds = engine.embed(inputs[name])
                    engine.prefill(inputs[name], embeds)
                best[name] = [min(best[name][0], vision.seconds), min(best[name][1], whole.seconds)]
        first = next(iter(engines))
        tokens = int(inputs[first]["input_ids"].shape[1])
        visual = int((inputs[first]["input_ids"] == models[first].image_token_id).sum())
        flops = 2 * sum(p.numel() for p in models[first].llm.parameters()) * tokens
        for name in engines:
            vision, total = best[name]
            metrics = {"vision tower": Metric(round(vision * 1e3, 1), "ms", "lower", "{:,.0f}"),
                       "LLM prefill": Metric(round((total - vision) * 1e3, 1), "ms", "lower", "{:,.0f}"),
                       "time to first token": Metric(round(total * 1e3, 1), "ms", "lower", "{:,.0f}"),
                       "prompt tokens": Metric(tokens), "visual tokens": Metric(visual)}
            notes = []
            if name in ("bf16", "w8a8-bf16", "deployed"):
                share = 100 * flops / (total - vision) / peak
                metrics["LLM prefill, share of the bf16 limit"] = Metric(round(share, 1), "%", format="{:.1f}")
            elif name == DEPLOYED_A8:
                share = 100 * flops / (total - vision) / limits.peak["int8"]
                metrics["LLM prefill, share of the int8 limit"] = Metric(round(share, 1), "%", format="{:.1f}")
            base_name = TTFT_BASELINES.get(name)
            if name == W8A8_TORCH_AO:
                notes.append("torch.ao's dynamic int8 linear (fbgemm), what W8A8's auto picked on this CPU before")
            elif name.startswith("w8a8") and size == "mid" and base_name in best:
                ratio = best[base_name][1] / total
                notes.append(target_note(f"time to first token against {base_name}", ratio, 1.3, "×", ratio >= 1.3))
            if name == DEPLOYED_A8:
                notes.append(DEPLOYED_A8_NOTE)
            if name.startswith("deployed") and "fp32" in best:
                notes.append(f"against fp32: {best['fp32'][1] / total:.2f}×")
            if base_name in best:
                notes.append(f"vision tower against {base_name}: {best[base_name][0] / vision:.2f}×")
            bench.add(Record(bench.suite, ttft_name(size, width, height, name), metrics=metrics,
                             settings={"size": size, "image": f"{width}x{height}"},
                             baseline=ttft_name(size, width, height, base_name) if base_name in best else None,
                             notes=notes, group="time to first token"))
        bench.note(f"{size} {width}x{height}: LLM prefill share = 2 x {flops // 2 // tokens / 1e6:.0f}M parameters x "
                   f"{tokens} prompt tokens / prefill time / {peak / 1e9:.0f} GFLOP/s (bf16 matmul, best of the start "
                   "and each round)")


# -- quant-decode ---------------------------------------------------------------------------------------------
COMPILED = " compiled"
"""The suffix of a configuration decoded through ``torch.compile`` (``Engine(compile_decode=True)``)."""
DECODE_CONFIGS = ("fp32", "bf16", TORCH_INT4, "w4a16", "bf16 compiled", f"{TORCH_INT4} compiled", "w4a16 compiled",
                  *((INT8_ACTIVATIONS, INT8_ACTIVATIONS + COMPILED) if A8_RUNS else ()))
DECODE_SUMMARY = (
    "Decode tokens/s (`Engine.step`, 16 steps) after each context (a short text prompt; the 896x896 and the "
    "1920x1080 image with a short question, whose visual tokens make attention over the cache count) per "
    "configuration: fp32, bf16 and a W4A16 "
    "language model (round to nearest; the rest fp32) on the int4 kernel `kernel: auto` picks (its name under "
    "*kernel*) and on torch's (`w4a16-torch`); where the CPU has AVX512-VNNI, also the same checkpoint with the "
    "decoding activations rounded to int8 per group of 128 (`w4a16-a8`, `kernel: avx512_vnni`, beside the "
    "targets rather than for them); eager and with the step compiled (`compiled`: "
    "`Engine(compile_decode=True)`, `nvila generate --compile`; its compile time is that of the first steps). LLM "
    "weight bytes are the language model's state dict as stored (a tied output layer once), read once per token; the "
    "bandwidth share is those bytes x tokens/s over the copy bandwidth, the best one measured at the start and in "
    "every round. Targets: W4A16 >= 2x the fastest unquantized decoding the same way (eager or compiled), <= 30 % "
    "of bf16's weight bytes, >= 50 % of the bandwidth.")


TEXT = "text"
"""The decoding context of a short text prompt, beside the images of :data:`IMAGES`."""


def decode_name(size: str, context: str | tuple[int, int], config: str) -> str:
    return f"{size} {config}" if context == TEXT else f"{size} {context[0]}x{context[1]} {config}"


@torch.no_grad()
def run_decode_suite(bench: BenchRun, sizes: Sequence[str] = TIMED_SIZES, tokens: int = 16, repeats: int = 3,
                     limits: Limits | None = None, configs: Sequence[str] = DECODE_CONFIGS,
                     contexts: Sequence[str | tuple[int, int]] = (TEXT, *IMAGES)) -> None:
    names = [decode_name(s, x, c) for s in sizes for x in contexts for c in configs]
    selected, limits = start_timed_suite(bench, names, sizes, limits)
    repeats = bench.rounds(repeats)
    for size, kept in selected.items():
        runs = [(x, c) for x in contexts for c in configs if decode_name(size, x, c) in kept]
        if runs:
            decode(bench, size, runs, tokens, repeats, limits)
            gc.collect()
    bench.order(names)


def decode(bench: BenchRun, size: str, runs: Sequence[tuple[str | tuple[int, int], str]], tokens: int, repeats: int,
           limits: Limits) -> None:
    """Decode tokens/s after each context (a short text prompt, an image prompt), and the language model's weight
    bytes, per configuration. Each model runs each prompt once, untimed; every round decodes from a copy of that
    state, so long image prompts are not prefilled again per round and engine."""
    device = bench.device
    configs = list(dict.fromkeys(c for _, c in runs))
    contexts = list(dict.fromkeys(x for x, _ in runs))
    base = build(size)
    models = variants(base, sorted({c.removesuffix(COMPILED) for c in configs}), device)  # compiled or not, one model
    del base
    gc.collect()
    text = ChatRequest([{"role": "user", "content": "Describe a picture of a red square on a blue field."}])
    weight, engines, compile_s, kernel = {}, {}, {}, {}
    for name in configs:
        model = models[name.removesuffix(COMPILED)]
        weight[name] = llm_bytes(model)  # before the first forward: as the checkpoint stores them
        engines[name] = Engine(model, compile_decode=name.endswith(COMPILED))
        with Stopwatch(device) as watch:
            engines[name].warm_up()  # packs quantized layers; compiles a compiled step
        compile_s[name] = watch.seconds
        kernel[name] = next((m._running for m in model.modules() if isinstance(m, Int4WeightOnlyLinear)), None)
    prefilled, context_tokens = {}, {}
    for context in contexts:
        prompt = text if context == TEXT else request(*context)
        for model_name in {c.removesuffix(COMPILED) for c in configs}:
            engine = Engine(models[model_name])
            inputs = engine.inputs([prompt])
            prefilled[context, model_name] = engine.prefill(inputs)
            context_tokens[context] = int(inputs["input_ids"].shape[1])
    best = {run: math.inf for run in runs}
    bandwidth = limits.bandwidth
    for _ in range(repeats):
        bandwidth = max(bandwidth, _copy_bandwidth(128 * 1024 * 1024, 1, device))  # under the same load
        for context, name in runs:
            engine, state = engines[name], copy.deepcopy(prefilled[context, name.removesuffix(COMPILED)])
            with Stopwatch(device) as watch:
                for _ in range(tokens):
                    state = engine.step(state, state.logits.argmax(-1))
            best[context, name] = min(best[context, name], watch.seconds / tokens)
    for context, name in runs:
        per_s = 1 / best[context, name]
        share = 100 * weight[name] * per_s / bandwidth
        notes, baseline = [], None
        compiled = name.endswith(COMPILED)
        here = [c for x, c in runs if x == context]
        if name.startswith("w4a16"):
            same_way = [n for n in here if not n.startswith("w4a16") and n.endswith(COMPILED) == compiled]
            fastest = min(same_way, key=lambda n: best[context, n]) if same_way else None
            if fastest:
                baseline = decode_name(size, context, fastest)
                ratio = best[context, fastest] / best[context, name]
                notes.append(target_note(f"decode against the fastest unquantized ({fastest})", ratio, 2, "×",
                                         ratio >= 2))
            bf16 = "bf16 compiled" if compiled and "bf16 compiled" in weight else "bf16"
            if bf16 in weight:
                part = 100 * weight[name] / weight[bf16]
                notes.append(target_note("weight bytes, % of bf16", part, -30, " %", part <= 30))
            notes.append(target_note("bandwidth share", share, 50, " %", share >= 50))
            if name.startswith(INT8_ACTIVATIONS):
                notes.append(A8_NOTE)
                a16 = "w4a16" + (COMPILED if compiled else "")
                if a16 in here:
                    notes.append(f"against {a16} (16-bit activations): {best[context, a16] / best[context, name]:.2f}×")
            on_torch = TORCH_INT4 + (COMPILED if compiled else "")
            if not name.startswith(TORCH_INT4) and on_torch in here and kernel[name] != kernel[on_torch]:
                ratio = best[context, on_torch] / best[context, name]
                notes.append(f"{kernel[name]} kernel against torch's ({on_torch}): {ratio:.2f}×")
        elif compiled and name.removesuffix(COMPILED) in here:
            baseline = decode_name(size, context, name.removesuffix(COMPILED))
        elif name == "bf16" and "fp32" in here:
            baseline = decode_name(size, context, "fp32")
        metrics = {"decode": Metric(round(per_s, 2), "tokens/s", "higher", "{:.3g}"),
                   "LLM weight bytes": Metric(round(weight[name] / 1e6, 2), "MB", "lower", "{:,.4g}"),
                   "share of the copy bandwidth": Metric(round(share, 1), "%", format="{:.1f}")}
        if compiled:
            metrics["compile (first steps)"] = Metric(round(compile_s[name], 1), "s", None, "{:.1f}")
        settings = {"size": size, "context": context if context == TEXT else f"{context[0]}x{context[1]} image",
                    "context tokens": context_tokens[context], "steps": tokens,
                    **({"kernel": kernel[name]} if kernel[name] else {})}
        bench.add(Record(bench.suite, decode_name(size, context, name), group="decode", baseline=baseline,
                         notes=notes, settings=settings, metrics=metrics))
    bench.note(f"{size}: copy bandwidth {bandwidth / 1e9:.2f} GB/s (best of the start and each round)")


# -- quant-peer: transformers' LLaVA-OneVision with the same widths ---------------------------------------------
PEER_SUMMARY = (
    "Ours (bf16, and the deployed W8A8 + W4A16 mix, its projector in 16 bits) against transformers' "
    "LLaVA-OneVision in bf16 built with the "
    "same widths and depths (the same SigLIP tower and Qwen2, random weights, our tokenizer, anyres pinpoints 1x1 "
    "to 6x6 tiles): visual tokens, time to first token (best of the rounds), decode tokens/s over 8 steps after "
    "the image prompt. Targets: <= 1/3 of the peer's visual tokens, time to first token >= 1.6x faster.")
PEER_CONFIGS = ("llava-onevision bf16", "nvila bf16", "nvila deployed")


def build_peer(size: str, tokenizer: Any, seed: int = 0) -> tuple[Any, Any]:
    """LLaVA-OneVision (SigLIP + Qwen2, random weights, no download) with our ``size``'s widths and depths, and its
    processor (LLaVA-OneVision's anyres tiling over the same tile size, our tokenizer with its ``<image>`` token)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    spec = size_spec(size)
    vision = spec["encoder"].get("base", spec["encoder"])
    llm = spec["llm"]
    tokenizer = copy.deepcopy(tokenizer)
    tile = vision["image_size"]
    pinpoints = [[tile * r, tile * c] for r in range(1, 7) for c in range(1, 7)]  # LLaVA-OneVision's 1x1 .. 6x6
    vision_config = SiglipVisionConfig(
        hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"], image_size=tile,
        num_hidden_layers=vision["num_layers"], num_attention_heads=vision["num_heads"],
        patch_size=vision["patch_size"], vision_use_head=False)
    text_config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=llm["hidden_size"], intermediate_size=llm["intermediate_size"],
        num_hidden_layers=llm["num_layers"], num_attention_heads=llm["num_heads"],
        num_key_value_heads=llm["num_kv_heads"], max_position_embeddings=32768, tie_word_embeddings=True)
    config = LlavaOnevisionConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessor(size={"height": tile, "width": tile},
                                                   image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3,
                                                   image_std=[0.5] * 3)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, video_processor=LlavaOnevisionVideoProcessor(), tokenizer=tokenizer,
        num_image_tokens=(tile // vision["patch_size"]) ** 2, vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template)
    return model, processor


def _peer_inputs(processor: Any, width: int, height: int, dtype: torch.dtype, device: str = "cpu") -> dict[str, Any]:
    text = processor.tokenizer.apply_chat_template([{"role": "user", "content": f"<image>\n{QUESTION}"}],
                                                   tokenize=False, add_generation_prompt=True)  # our prompt
    inputs = dict(processor(images=image(width, height), text=text, return_tensors="pt"))
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


@torch.no_grad()
def run_peer_suite(bench: BenchRun, sizes: Sequence[str] = TIMED_SIZES,
                   images: Sequence[tuple[int, int]] = IMAGES, tokens: int = 8, repeats: int = 2) -> None:
    names = [ttft_name(s, w, h, c) for s in sizes for w, h in images for c in PEER_CONFIGS]
    repeats = bench.rounds(repeats)
    for size, kept in sizes_of(bench, names, sizes).items():
        for width, height in images:
            if any(ttft_name(size, width, height, c) in kept for c in PEER_CONFIGS):
                peer(bench, size, width, height, tokens, repeats)
                gc.collect()
    bench.order(names)


def peer(bench: BenchRun, size: str, width: int, height: int, tokens: int, repeats: int) -> None:
    """One image through LLaVA-OneVision and through ours (bf16 and deployed), all three always side by side."""
    device = bench.device
    base = build(size)
    theirs, processor = build_peer(size, base.tokenizer)
    theirs = theirs.to(device, torch.bfloat16)
    ours = variants(base, ("bf16", "deployed"), device)
    del base
    gc.collect()
    engines = {name: Engine(model) for name, model in ours.items()}
    for engine in engines.values():  # a first prefill and step pack the layers and build nvila's kernels, untimed
        state = engine.prefill(engine.inputs([request(448, 448)]))
        engine.step(state, state.logits.argmax(-1))
    _peer_decode(theirs, _peer_inputs(processor, 448, 448, torch.bfloat16, device), 1, device)
    peer_inputs = _peer_inputs(processor, width, height, torch.bfloat16, device)
    peer_visual = int((peer_inputs["input_ids"] == theirs.config.image_token_index).sum())
    peer_ttft = best_of(lambda: theirs(**peer_inputs, logits_to_keep=1), repeats, device)
    peer_decode = _peer_decode(theirs, peer_inputs, tokens, device)
    peer_name = ttft_name(size, width, height, PEER_CONFIGS[0])
    settings = {"size": size, "image": f"{width}x{height}"}
    bench.add(Record(bench.suite, peer_name, settings=settings, group="against the peer",
                     metrics=_peer_metrics(peer_visual, peer_ttft, peer_decode)))
    for name, engine in engines.items():
        inputs = engine.inputs([request(width, height)])
        visual = int((inputs["input_ids"] == ours[name].image_token_id).sum())
        ttft = best_of(lambda engine=engine, inputs=inputs: engine.prefill(inputs), repeats, device)
        state = engine.prefill(inputs)
        with Stopwatch(device) as watch:
            for _ in range(tokens):
                state = engine.step(state, state.logits.argmax(-1))
        notes = [target_note("visual tokens, share of the peer's", visual / peer_visual, -1 / 3, "",
                             visual <= peer_visual / 3, shown="1/3"),
                 target_note("time to first token against the peer", peer_ttft / ttft, 1.6, "×",
                             peer_ttft / ttft >= 1.6)]
        bench.add(Record(bench.suite, ttft_name(size, width, height, f"nvila {name}"), settings=settings,
                         group="against the peer", baseline=peer_name, notes=notes,
                         metrics=_peer_metrics(visual, ttft, tokens / watch.seconds)))


def _peer_metrics(visual: int, ttft: float, decode_per_s: float) -> dict[str, Metric]:
    return {"visual tokens": Metric(visual, "", "lower"),
            "time to first token": Metric(round(ttft * 1e3, 1), "ms", "lower", "{:,.0f}"),
            "decode": Metric(round(decode_per_s, 2), "tokens/s", "higher", "{:.3g}")}


def _peer_decode(model: Any, inputs: dict[str, Any], tokens: int, device: str = "cpu") -> float:
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    mask = inputs["attention_mask"]
    synchronize(device)
    start = time.perf_counter()
    for _ in range(tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        out = model(input_ids=token, attention_mask=mask, cache=out.cache, use_cache=True)
    synchronize(device)
    return tokens / (time.perf_counter() - start)


# -- quant-quality --------------------------------------------------------------------------------------------
QUALITY_CONFIGS: dict[str, dict[str, Any]] = {
    "w8a8 vision": {"encoder": {"name": "w8a8"}},
    "w4a16 awq": {"llm": {"name": "w4a16", "method": "awq"}},
    "w4a16 rtn": {"llm": {"name": "w4a16", "method": "rtn"}},
    "w8a8 + w4a16 awq": serving_mix({"encoder": {"name": "w8a8"}, "llm": {"name": "w4a16", "method": "awq"}}),
    "w8a8 + w4a16 rtn": serving_mix({"encoder": {"name": "w8a8"}, "llm": {"name": "w4a16", "method": "rtn"}}),
}
"""Each part alone, then the serving mixes as ``nvila quantize`` writes them (with the projector in W16A16)."""
A8_QUALITY = f"{INT8_ACTIVATIONS} rtn"
"""W4A16 round to nearest with int8 activations at every position (``dense_rows: 0``: teacher-forced, each position
computes as a decoding step does), against ``w4a16 rtn``; where the kernel runs."""
DEPLOYED_A8_QUALITY = f"w8a8 + {INT8_ACTIVATIONS} rtn"
"""The serving mix of ``deployed-a8`` (the language model's activations in int8: per row at prefill, where every
teacher-forced position is computed, per group at decoding), against ``w8a8 + w4a16 rtn``; where the kernel runs."""
A8_TWINS = {A8_QUALITY: "w4a16 rtn", DEPLOYED_A8_QUALITY: "w8a8 + w4a16 rtn"}
if A8_RUNS:
    QUALITY_CONFIGS[A8_QUALITY] = {"llm": {"name": "w4a16", "method": "rtn", "kernel": "avx512_vnni", "dense_rows": 0}}
    QUALITY_CONFIGS[DEPLOYED_A8_QUALITY] = serving_mix({"encoder": {"name": "w8a8"}, "llm": {
        "name": "w4a16", "method": "rtn", "kernel": "avx512_vnni"}})
QUALITY_SIZES = {"demo": ("demo", tuple(QUALITY_CONFIGS)),
                 "mid-1tile": ("mid-1tile", ("w8a8 vision", "w8a8 + w4a16 awq", "w8a8 + w4a16 rtn",
                                             *(("w4a16 rtn", *A8_TWINS) if A8_RUNS else ())))}
"""Per size: the model, and the configurations (at mid size one AWQ search takes minutes: the serving mix only)."""
QUALITY_RUNS = {"demo": {"calib_samples": 128, "samples": 64, "eval_limit": 500},
                "mid-1tile": {"calib_samples": 16, "samples": 16, "eval_limit": 200}}
"""Calibration samples, held-out conversations compared and held-out questions answered, per size."""
QUALITY_SUMMARY = (
    "Quantized against full precision on held-out conversations: next-token top-1 agreement at every text position "
    "(teacher-forced) and the mean relative error of those logits; with a trained checkpoint (--ckpt, the demo's), "
    "held-out accuracy by greedy generation (exact match) and its drop. Calibration (AWQ) on --calib, held-out "
    "conversations from --held-out; without them, shards of the synthetic shapes task written for the run. Each "
    "AWQ row against its round-to-nearest twin; where the CPU has AVX512-VNNI, `w4a16-a8 rtn` (int8 activations at "
    "every position, as `kernel: avx512_vnni` decodes) against `w4a16 rtn`, and `w8a8 + w4a16-a8 rtn` (that kernel "
    "as it serves: int8 activations per row at prefill, which computes every teacher-forced position, and per group "
    "at decoding) against `w8a8 + w4a16 rtn`.")


def run_quality_suite(bench: BenchRun, sizes: dict[str, tuple[str, Sequence[str]]] | None = None,
                      runs: dict[str, dict[str, int]] | None = None) -> None:
    options = bench.options
    ckpt = options.ckpt
    if sizes is None:  # a trained checkpoint takes the random demo model's place; mid size runs beside it
        sizes = {"checkpoint": ("", tuple(QUALITY_CONFIGS)), "mid-1tile": QUALITY_SIZES["mid-1tile"]} if ckpt \
            else QUALITY_SIZES
    runs = runs or QUALITY_RUNS
    names = [f"{s} {c}" for s, (_, configs) in sizes.items()
             for c in (*(["full precision"] if ckpt and s == "checkpoint" else []), *configs)]
    selected = sizes_of(bench, names, list(sizes))
    with ExitStack() as stack:
        calib, held = options.calib, options.held_out
        if not (calib and held):
            from nvila.core.data.synthetic import write_dataset

            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nvila-quality-")))
            write_dataset(root, train=128, val=64, seed=0, image_size=64)
            calib, held = calib or str(root / "train"), held or str(root / "val")
            bench.note("No --calib/--held-out given: calibration and held-out samples come from shards of the "
                       "synthetic shapes task written for this run (128 train, 64 held-out).")
        for size, kept in selected.items():
            configs = [c for c in sizes[size][1] if f"{size} {c}" in kept]
            if configs or f"{size} full precision" in kept:
                quality(bench, size, sizes[size][0], configs, calib, held, ckpt if size == "checkpoint" else None,
                        **runs.get(size, QUALITY_RUNS["demo"]))
                gc.collect()
    bench.order(names)


def held_out(model: NvilaModel, shards: str, samples: int) -> list[dict[str, Any]]:
    """The first ``samples`` conversations of ``shards`` (prompt and answer), each a one-sample batch."""
    from nvila.core.data.shards import find_shards, sample_stream
    from nvila.core.processor import collate

    batches = []
    for encoded in sample_stream(find_shards(shards), model.processor):
        batch = collate([encoded], model.tokenizer.pad_token_id)
        batch.pop("labels", None)
        batches.append(batch)
        if len(batches) == samples:
            break
    return batches


@torch.no_grad()
def agreement(reference: NvilaModel, quantized: NvilaModel, batches: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """Next-token top-1 agreement over every text position of the batches (teacher-forced), and the mean relative
    error of the logits there."""
    agree = total = 0
    errors = []
    for batch in batches:
        text = batch["input_ids"][0] != reference.image_token_id  # (L,)
        a = reference(**batch)["logits"][0, text].float()  # (T, V)
        b = quantized(**batch)["logits"][0, text].float()
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += int(text.sum())
        errors.append(float((a - b).norm() / a.norm()))
    return agree / max(total, 1), sum(errors) / max(len(errors), 1)


def quality(bench: BenchRun, label: str, size: str, configs: Sequence[str], calib: str, held_out_shards: str,
            ckpt: str | None = None, calib_samples: int = 64, samples: int = 32, eval_limit: int = 200) -> None:
    """Each configuration quantized from the same reference (``ckpt``, else ``size`` with random weights) and
    compared with it; with a checkpoint also held-out accuracy and its drop."""
    from nvila.core.checkpoint import load_checkpoint
    from nvila.workflows.evaluate import evaluate
    from nvila.workflows.quantize import quantize_model

    reference = load_checkpoint(ckpt) if ckpt else build(size)
    batches = held_out(reference, held_out_shards, samples)
    settings = {"calibration samples": calib_samples, "held-out conversations": len(batches)}
    accuracy = None
    if ckpt:
        from nvila.core.data.shards import find_shards

        shards = find_shards(held_out_shards)
        accuracy = evaluate(reference, shards, limit=eval_limit).accuracy
        bench.add(Record(bench.suite, f"{label} full precision", settings=settings, group="quality",
                         metrics={"held-out accuracy": Metric(round(100 * accuracy, 2), "%", "higher", "{:.1f}")},
                         notes=[f"{eval_limit} questions, greedy, exact match"]))
    found = {}
    for config in configs:
        model = copy.deepcopy(reference)
        start = time.perf_counter()
        quantize_model(model, QUALITY_CONFIGS[config], calib, calib_samples)
        seconds = time.perf_counter() - start
        top1, error = agreement(reference, model, batches)
        metrics = {"top-1 agreement": Metric(round(100 * top1, 2), "%", "higher", "{:.2f}"),
                   "relative logit error": Metric(round(error, 5), "", "lower", "{:.3g}"),
                   "quantization time": Metric(round(seconds, 1), "s", None, "{:,.1f}")}
        if ckpt:
            quantized = evaluate(model, shards, limit=eval_limit).accuracy
            metrics["held-out accuracy"] = Metric(round(100 * quantized, 2), "%", "higher", "{:.1f}")
            metrics["accuracy drop"] = Metric(round(100 * (accuracy - quantized), 2), "points", None, "{:.1f}")
        twin = A8_TWINS.get(config) or (config.replace("awq", "rtn") if config.endswith("awq") else None)
        notes = [A8_NOTE.replace("at decoding", "at every position")] if config == A8_QUALITY else \
            [DEPLOYED_A8_NOTE] if config == DEPLOYED_A8_QUALITY else []
        record = Record(bench.suite, f"{label} {config}", metrics=metrics, settings=settings, group="quality",
                        baseline=f"{label} {twin}" if twin in configs else None, notes=notes)
        found[config] = (top1, bench.add(record))
        del model
        gc.collect()
    for config, (top1, record) in found.items():
        twin = config.replace("awq", "rtn") if config.endswith("awq") else None
        if twin in found:
            record.notes.append(f"AWQ minus round to nearest: {100 * (top1 - found[twin][0]):+.2f} points of top-1 "
                                "agreement")


# -- qlora: PEFT over a W4A16 language model -------------------------------------------------------------------
QLORA_SUMMARY = (
    "PEFT over a W4A16 language model (QLoRA-style: LoRA adapters in fp32 around frozen int4 linear layers, "
    "stages/peft + stages/qlora) against today's PEFT with frozen weights in bf16 (stages/peft with frozen_in_bf16), "
    "both in bf16 mixed precision with gradient checkpointing, LoRA r=16 and LayerNorm tuning, on the same model "
    "and batch (4 x ~138 tokens): peak training memory measured (each configuration in its own process), then "
    "NVILA-8B's training state counted on the meta device with the shipped recipes (weights as stored, int4 "
    "buffers included, plus an fp32 gradient and two AdamW moments per trainable parameter; activations not "
    "included).")
COUNTS = {"nvila-8b stages/peft (frozen weights bf16), counted": ["stages/peft"],
          "nvila-8b stages/peft + stages/qlora (W4A16 LLM), counted": ["stages/peft", "stages/qlora"]}


def training_state_gib(stages: Sequence[str], recipe: str = "nvila-8b") -> tuple[float, int, int]:
    """``recipe`` with ``stages`` built on the meta device: (training state in GiB, trainable and stored parameters).
    The int4 weights are buffers, counted as stored."""
    from nvila.workflows.bench.models import build_module
    from nvila.workflows.cli import read_recipe

    config = read_recipe(["--config", recipe, *[a for s in stages for a in ("--config", s)]])
    with torch.device("meta"):
        module = build_module(config["model"])
    model = module.model
    params = list(model.parameters())
    total = sum(p.numel() * (p.element_size() + (12 if p.requires_grad else 0)) for p in params)
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    return total / 2**30, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def run_qlora_suite(bench: BenchRun, counts: bool = True) -> None:
    """The measured training configurations (``training.TRAINING_SUITES['qlora']``, each in its own process), then
    the NVILA-8B counts."""
    from nvila.workflows.bench.training import TRAINING_SUITES, run_training_suite

    measured = list(TRAINING_SUITES[bench.suite])
    wanted = [w.lower() for w in bench.options.only]
    if not wanted or any(w in n.lower() for n in measured for w in wanted):
        run_training_suite(bench)
        for record in bench.records:
            record.group = "peak training memory, measured"
    if counts and (not wanted or any(w in n.lower() for n in COUNTS for w in wanted)):
        first = next(iter(COUNTS))
        bench.total = None  # the measured rows' count no longer holds
        for name, stages in COUNTS.items():
            gib, trainable, total = training_state_gib(stages)
            bench.add(Record(bench.suite, name, group="NVILA-8B training state, counted on the meta device",
                             baseline=None if name == first else first,
                             metrics={"training state": Metric(round(gib, 2), "GiB", "lower", "{:.2f}"),
                                      "trainable params": Metric(trainable, format="millions")},
                             settings={"recipe": " + ".join(["nvila-8b", *stages])}))
    if not bench.records:
        bench.selected([*measured, *COUNTS])  # refuses an --only that matches nothing, naming the configurations
