"""Quantized inference, measured (issue 13): the machine's limits, then time to first token with a W8A8 vision
tower, decode with a W4A16 language model, transformers' LLaVA-OneVision as the peer, and quality.

Every suite returns plain :class:`Row` records (suite, case, metric, value, unit, target, met), so that the
benchmark package can fold them into its one result record and writer; :func:`markdown` prints them.
``nvila bench-quant SUITE ...`` runs them. Timings alternate between the configurations round by round and
keep the best round (other processes on a shared machine only ever add time), after a warm-up round on a
small image that also packs the quantized layers.

Sizes: ``demo`` is the demo recipe's model. ``mid`` has NVILA's vision side at reduced depth: DynS2 over
448 px tiles at scales 448 and 896 of a SigLIP-so400m-shaped encoder (patch 14, width 1152, MLP 4304) cut to
6 layers, STC 2x2 and the MLP projector; and a Qwen2-0.5B-shaped language model (width 896, 24 layers, 14
heads, 2 KV heads, MLP 4864: 358M parameters, 1.4 GB in fp32, 0.7 GB in bf16), random weights, the shipped
small tokenizer. The peer is built with the same widths and depths.
"""

from __future__ import annotations

import copy
import gc
import logging
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image

from nvila.core.engine import ChatRequest, Engine
from nvila.core.errors import NvilaError
from nvila.core.model import NvilaModel

log = logging.getLogger(__name__)

SIGLIP_MID = {"name": "siglip", "image_size": 448, "patch_size": 14, "hidden_size": 1152, "intermediate_size": 4304,
              "num_layers": 6, "num_heads": 16, "feature_layer": -1}
QWEN2_MID = {"name": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_layers": 24, "num_heads": 14,
             "num_kv_heads": 2}
SIZES: dict[str, dict[str, Any]] = {
    "demo": {"encoder": {"name": "siglip", "image_size": 64, "patch_size": 8, "hidden_size": 128,
                         "intermediate_size": 256, "num_layers": 3, "num_heads": 4, "feature_layer": -1},
             "compressor": {"name": "stc", "ratio": 2}, "projector": {"name": "mlp"},
             "llm": {"name": "qwen2", "hidden_size": 128, "intermediate_size": 384, "num_layers": 3, "num_heads": 4,
                     "num_kv_heads": 2}, "max_length": 256},
    "mid": {"encoder": {"name": "dyns2", "scales": [448, 896], "max_tiles": 12, "base": SIGLIP_MID},
            "compressor": {"name": "stc", "ratio": 2}, "projector": {"name": "mlp"}, "llm": QWEN2_MID,
            "max_length": 16384},
}
SIZES["mid-1tile"] = {**SIZES["mid"], "encoder": SIGLIP_MID}
"""The mid model with its encoder on one 448 px tile (256 visual tokens): quality runs many forwards."""
IMAGES = ((896, 896), (1920, 1080))
QUESTION = "What is shown in this image? Answer briefly."
DEPLOYED = {"encoder": {"name": "w8a8"}, "llm": {"name": "w4a16", "method": "rtn"}}
"""The serving mix, for timing (AWQ and round-to-nearest run at the same speed; quality compares them)."""


@dataclass
class Row:
    """One measured figure."""

    suite: str
    case: str
    metric: str
    value: float
    unit: str
    target: str = ""
    met: bool | None = None
    note: str = ""


# -- helpers --------------------------------------------------------------------------------------------------
def machine() -> str:
    """The machine in words: CPU, threads, torch."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def sync() -> None:
    """Wait for queued GPU work, so that wall-clock times cover it (nothing to wait for on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def image(width: int, height: int) -> Image.Image:
    """A deterministic picture with some structure (a gradient and a rectangle)."""
    x = torch.linspace(0, 255, width).expand(height, width)
    y = torch.linspace(0, 255, height)[:, None].expand(height, width)
    rgb = torch.stack([x, y, 255 - x], dim=-1).to(torch.uint8)
    rgb[height // 4: height // 2, width // 3: width // 2] = torch.tensor([250, 250, 20], dtype=torch.uint8)
    return Image.fromarray(rgb.numpy())


def request(width: int, height: int) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": f"<image>\n{QUESTION}"}], images=[image(width, height)])


def build(size: str, seed: int = 0) -> NvilaModel:
    if size not in SIZES:
        raise NvilaError(f"Unknown size '{size}'; sizes: {', '.join(SIZES)}.")
    torch.manual_seed(seed)
    return NvilaModel(copy.deepcopy(SIZES[size])).eval()


def to_bf16(model: NvilaModel) -> NvilaModel:
    """The whole model in bf16 (weights and activations), as a 16-bit baseline."""
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    return model


def variants(base: NvilaModel, names: Sequence[str], device: str = "cpu") -> dict[str, NvilaModel]:
    """Copies of ``base`` per configuration name: fp32, bf16, w8a8 (vision W8A8, rest fp32), w8a8-bf16 (vision
    W8A8, rest bf16), w4a16 (language model W4A16, rest fp32), deployed (W8A8 vision, W4A16 language model)."""
    out = {}
    for name in names:
        model = copy.deepcopy(base)
        if name == "bf16":
            to_bf16(model)
        elif name == "w8a8":
            model.quantize({"encoder": {"name": "w8a8", "dtype": "fp32"}})
        elif name == "w8a8-bf16":
            to_bf16(model).quantize({"encoder": {"name": "w8a8", "dtype": "bf16"}})
        elif name == "w4a16":
            model.quantize({"llm": DEPLOYED["llm"]})
        elif name == "deployed":
            model.quantize(DEPLOYED)
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


# -- the machine's limits -------------------------------------------------------------------------------------
@dataclass
class Limits:
    bandwidth: float
    """Bytes per second moved by a large copy (read + write)."""
    peak: dict[str, float]
    """FLOP/s of a large matmul per dtype (fp32, bf16) and of oneDNN's dynamic int8 linear (int8)."""


def machine_limits(repeats: int = 5, copy_mib: int = 512, matmul: tuple[int, int, int] = (2048, 4096, 4096),
                   device: str = "cpu") -> tuple[Limits, list[Row]]:
    """Memory bandwidth (a large copy, far beyond the caches) and peak matmul throughput per dtype."""
    bandwidth = _copy_bandwidth(copy_mib * 1024 * 1024 // 4, repeats, device)
    m, k, n = matmul
    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        a @ b
        peak[name] = 2 * m * k * n / best_of(lambda a=a, b=b: a @ b, repeats)
    peak["int8"] = _int8_peak(m, k, n, repeats, device)
    rows = [Row("machine", f"copy {copy_mib} MiB", "memory bandwidth (read + write)", bandwidth / 1e9, "GB/s")]
    rows += [Row("machine", f"matmul {m}x{k}x{n}", f"peak {name}", flops / 1e9, "GFLOP/s")
             for name, flops in peak.items()]
    rows[-1].note = "oneDNN dynamic int8 linear (activation quantization included)"
    return Limits(bandwidth, peak), rows


def _copy_bandwidth(numel: int, repeats: int, device: str = "cpu") -> float:
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / best_of(lambda: dst.copy_(src), repeats)


def _int8_peak(m: int, k: int, n: int, repeats: int, device: str = "cpu") -> float:
    """FLOP/s of the W8A8 quantizer's CPU kernel on one large linear (activation quantization included)."""
    from nvila.core.specs import build as build_component

    layer = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
    build_component("quantizer", {"name": "w8a8", "dtype": "fp32"}).quantize(layer)
    layer.to(device)
    x = torch.randn(m, k, device=device)
    with torch.no_grad():
        layer(x)
        return 2 * m * k * n / best_of(lambda: layer(x), repeats)


# -- time to first token --------------------------------------------------------------------------------------
TTFT_CONFIGS = ("fp32", "w8a8", "bf16", "w8a8-bf16", "deployed")


@torch.no_grad()
def time_to_first_token(size: str = "mid", images: Sequence[tuple[int, int]] = IMAGES, repeats: int = 2,
                        configs: Sequence[str] = TTFT_CONFIGS, limits: Limits | None = None,
                        device: str = "cpu") -> list[Row]:
    """Time to first token (vision tower + language-model prefill, as ``Engine.prefill`` runs them) per config."""
    base = build(size)
    models = variants(base, configs, device)
    del base
    gc.collect()
    engines = {name: Engine(model) for name, model in models.items()}
    warm = request(448, 448)
    for engine in engines.values():  # packs the quantized layers; first-call costs
        engine.prefill(engine.inputs([warm]))
    rows = []
    for width, height in images:
        inputs = {name: e.inputs([request(width, height)]) for name, e in engines.items()}
        best = {name: [math.inf, math.inf] for name in engines}
        peak = limits.peak["bf16"] if limits is not None else 0.0
        for _ in range(repeats):
            if limits is not None:  # the compute limit, under the same load as the prefills
                peak = max(peak, machine_limits(1, copy_mib=8, device=device)[0].peak["bf16"])
            for name, engine in engines.items():
                sync()
                start = time.perf_counter()
                embeds = engine.embed(inputs[name])
                sync()
                vision = time.perf_counter() - start
                engine.prefill(inputs[name], embeds)
                sync()
                total = time.perf_counter() - start
                best[name] = [min(best[name][0], vision), min(best[name][1], total)]
        case = f"{size} {width}x{height}"
        tokens = int(inputs[next(iter(engines))]["input_ids"].shape[1])
        visual = int((inputs[next(iter(engines))]["input_ids"] == models[next(iter(engines))].image_token_id).sum())
        for name in engines:
            vision, total = best[name]
            rows += [Row("ttft", f"{case} {name}", "vision tower", vision * 1e3, "ms"),
                     Row("ttft", f"{case} {name}", "language-model prefill", (total - vision) * 1e3, "ms",
                         note=f"{tokens} prompt tokens, {visual} visual"),
                     Row("ttft", f"{case} {name}", "time to first token", total * 1e3, "ms")]
        for quantized, baseline in (("w8a8", "fp32"), ("w8a8-bf16", "bf16"), ("deployed", "bf16"),
                                    ("deployed", "fp32")):
            if quantized in best and baseline in best:
                ratio = best[baseline][1] / best[quantized][1]
                target = "≥ 1.3×" if quantized.startswith("w8a8") and size == "mid" else ""
                rows.append(Row("ttft", f"{case} {quantized} vs {baseline}", "time to first token, speed-up", ratio,
                                "×", target, ratio >= 1.3 if target else None,
                                f"vision tower {best[baseline][0] / best[quantized][0]:.2f}×"))
        if limits is not None and "bf16" in best:
            flops = 2 * sum(p.numel() for p in models["bf16"].llm.parameters()) * tokens
            for name in ("bf16", "w8a8-bf16", "deployed"):
                if name not in best:
                    continue
                rows.append(Row("ttft", f"{case} {name}", "language-model prefill, share of the bf16 compute limit",
                                100 * flops / (best[name][1] - best[name][0]) / peak, "%",
                                note=f"2 x parameters x prompt tokens / prefill time / {peak / 1e9:.0f} GFLOP/s "
                                     "(bf16 matmul, best of the start and each round)"))
    return rows


# -- decode ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def decode(size: str = "mid", tokens: int = 16, repeats: int = 2, limits: Limits | None = None,
           configs: Sequence[str] = ("fp32", "bf16", "w4a16"), device: str = "cpu") -> list[Row]:
    """Decode tokens/s after a short text prompt, and the language model's weight bytes, per configuration."""
    base = build(size)
    models = variants(base, configs, device)
    del base
    gc.collect()
    prompt = ChatRequest([{"role": "user", "content": "Describe a picture of a red square on a blue field."}])
    stats = {}
    for name, model in models.items():
        stats[name] = {"bytes": llm_bytes(model)}  # before the first forward: as the checkpoint stores them
        engine = Engine(model)
        engine.prefill(engine.inputs([prompt]))  # packs
    best = {name: math.inf for name in models}
    bandwidth = limits.bandwidth if limits is not None else 0.0
    for _ in range(repeats):
        bandwidth = max(bandwidth, _copy_bandwidth(128 * 1024 * 1024, 1, device))  # under the same load
        for name, model in models.items():
            engine = Engine(model)
            state = engine.prefill(engine.inputs([prompt]))
            sync()
            start = time.perf_counter()
            for _ in range(tokens):
                state = engine.step(state, state.logits.argmax(-1))
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) / tokens)
    rows = []
    fastest = min((n for n in models if n != "w4a16"), key=lambda n: best[n])
    for name in models:
        per_s, weight = 1 / best[name], stats[name]["bytes"]
        rows += [Row("decode", f"{size} {name}", "decode", per_s, "tokens/s"),
                 Row("decode", f"{size} {name}", "language-model weight bytes", weight / 1e6, "MB")]
        share = 100 * weight * per_s / bandwidth
        rows.append(Row("decode", f"{size} {name}", "weight bytes read per second, share of bandwidth", share,
                        "%", "≥ 50 %" if name == "w4a16" else "", share >= 50 if name == "w4a16" else None,
                        f"weights read once per token / copy bandwidth {bandwidth / 1e9:.2f} GB/s (best of the "
                        "start and each round)"))
    if "w4a16" in models:
        ratio = best[fastest] / best["w4a16"]
        rows.append(Row("decode", f"{size} w4a16 vs {fastest}", "decode speed-up over the fastest unquantized",
                        ratio, "×", "≥ 2×", ratio >= 2))
        if "bf16" in models:
            share = stats["w4a16"]["bytes"] / stats["bf16"]["bytes"]
            rows.append(Row("decode", f"{size} w4a16 vs bf16", "weight bytes", 100 * share, "% of bf16", "≤ 30 %",
                            share <= 0.30))
    return rows


# -- the peer: transformers' LLaVA-OneVision with the same widths ----------------------------------------------
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

    spec = SIZES[size]
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
def peer(size: str = "mid", images: Sequence[tuple[int, int]] = IMAGES[:1], tokens: int = 8,
         repeats: int = 1, device: str = "cpu") -> list[Row]:
    """Ours (bf16, and the deployed W8A8 + W4A16 mix) against LLaVA-OneVision in bf16, same widths and depths:
    visual tokens, time to first token, decode tokens/s, and ours / theirs."""
    base = build(size)
    theirs, processor = build_peer(size, base.tokenizer)
    theirs = theirs.to(device, torch.bfloat16)
    ours = variants(base, ("bf16", "deployed"), device)
    del base
    gc.collect()
    engines = {name: Engine(model) for name, model in ours.items()}
    for engine in engines.values():
        engine.prefill(engine.inputs([request(448, 448)]))
    theirs(**_peer_inputs(processor, 448, 448, torch.bfloat16, device), logits_to_keep=1)
    rows = []
    for width, height in images:
        case = f"{size} {width}x{height}"
        peer_inputs = _peer_inputs(processor, width, height, torch.bfloat16, device)
        peer_visual = int((peer_inputs["input_ids"] == theirs.config.image_token_index).sum())
        peer_ttft = best_of(lambda inputs=peer_inputs: theirs(**inputs, logits_to_keep=1), repeats)
        peer_decode = _peer_decode(theirs, peer_inputs, tokens)
        rows += [Row("peer", f"{case} llava-onevision bf16", "visual tokens", peer_visual, "tokens"),
                 Row("peer", f"{case} llava-onevision bf16", "time to first token", peer_ttft * 1e3, "ms"),
                 Row("peer", f"{case} llava-onevision bf16", "decode", peer_decode, "tokens/s")]
        for name, engine in engines.items():
            inputs = engine.inputs([request(width, height)])
            visual = int((inputs["input_ids"] == ours[name].image_token_id).sum())
            ttft = best_of(lambda engine=engine, inputs=inputs: engine.prefill(inputs), repeats)
            state = engine.prefill(inputs)
            sync()
            start = time.perf_counter()
            for _ in range(tokens):
                state = engine.step(state, state.logits.argmax(-1))
            sync()
            ours_decode = tokens / (time.perf_counter() - start)
            label = f"{case} nvila {name}"
            rows += [Row("peer", label, "visual tokens", visual, "tokens", "≤ 1/3 of the peer's",
                         visual <= peer_visual / 3),
                     Row("peer", label, "time to first token", ttft * 1e3, "ms"),
                     Row("peer", label, "decode", ours_decode, "tokens/s"),
                     Row("peer", f"{label} vs peer", "time to first token, speed-up", peer_ttft / ttft, "×", "≥ 1.6×",
                         peer_ttft / ttft >= 1.6),
                     Row("peer", f"{label} vs peer", "decode, speed-up", ours_decode / peer_decode, "×")]
    return rows


def _peer_decode(model: Any, inputs: dict[str, Any], tokens: int) -> float:
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    mask = inputs["attention_mask"]
    sync()
    start = time.perf_counter()
    for _ in range(tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        out = model(input_ids=token, attention_mask=mask, cache=out.cache, use_cache=True)
    sync()
    return tokens / (time.perf_counter() - start)


# -- quality --------------------------------------------------------------------------------------------------
QUALITY_CONFIGS: dict[str, dict[str, Any]] = {
    "w8a8 vision": {"encoder": {"name": "w8a8"}},
    "w4a16 awq": {"llm": {"name": "w4a16", "method": "awq"}},
    "w4a16 rtn": {"llm": {"name": "w4a16", "method": "rtn"}},
    "w8a8 + w4a16 awq": {"encoder": {"name": "w8a8"}, "llm": {"name": "w4a16", "method": "awq"}},
    "w8a8 + w4a16 rtn": {"encoder": {"name": "w8a8"}, "llm": {"name": "w4a16", "method": "rtn"}},
}


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


def quality(calib: str, held_out_shards: str, ckpt: str | None = None, size: str = "mid-1tile",
            configs: Sequence[str] = tuple(QUALITY_CONFIGS), calib_samples: int = 64, samples: int = 32,
            eval_limit: int = 200) -> list[Row]:
    """Quantized against full precision on held-out conversations: next-token top-1 agreement and logit error; with
    a trained checkpoint (the demo), held-out accuracy by generation and its drop; AWQ against round-to-nearest."""
    from nvila.core.checkpoint import load_checkpoint
    from nvila.workflows.evaluate import evaluate
    from nvila.workflows.quantize import quantize_model

    reference = load_checkpoint(ckpt) if ckpt else build(size)
    name = "demo checkpoint" if ckpt else size
    batches = held_out(reference, held_out_shards, samples)
    accuracy = None
    rows = []
    if ckpt:
        from nvila.core.data.shards import find_shards

        shards = find_shards(held_out_shards)
        accuracy = evaluate(reference, shards, limit=eval_limit).accuracy
        rows.append(Row("quality", f"{name} full precision", "held-out accuracy", 100 * accuracy, "%",
                        note=f"{eval_limit} questions, greedy, exact match"))
    results = {}
    for config in configs:
        model = copy.deepcopy(reference)
        start = time.perf_counter()
        quantize_model(model, QUALITY_CONFIGS[config], calib, calib_samples)
        seconds = time.perf_counter() - start
        top1, error = agreement(reference, model, batches)
        results[config] = top1
        rows += [Row("quality", f"{name} {config}", "next-token top-1 agreement", 100 * top1, "%",
                     note=f"{len(batches)} held-out conversations, every text position; quantized in {seconds:.0f} s"),
                 Row("quality", f"{name} {config}", "relative logit error", error, "")]
        if ckpt:
            quantized = evaluate(model, shards, limit=eval_limit).accuracy
            rows += [Row("quality", f"{name} {config}", "held-out accuracy", 100 * quantized, "%"),
                     Row("quality", f"{name} {config}", "held-out accuracy drop", 100 * (accuracy - quantized),
                         "points")]
        del model
        gc.collect()
    for a, b in (("w4a16 awq", "w4a16 rtn"), ("w8a8 + w4a16 awq", "w8a8 + w4a16 rtn")):
        if a in results and b in results:
            rows.append(Row("quality", f"{name} {a} vs {b.rsplit(' ', 1)[-1]}", "top-1 agreement, AWQ minus RTN",
                            100 * (results[a] - results[b]), "points"))
    return rows


# -- PEFT over a W4A16 language model: the NVILA-8B count -------------------------------------------------------
def qlora_count(group_size: int = 128) -> list[Row]:
    """NVILA-8B's PEFT training state counted on the meta device (weights as stored, plus an fp32 gradient and two
    fp32 AdamW moments per trainable parameter, as tests/workflows/test_recipes.py counts it): today's recipe
    (frozen weights in bf16) against the same with the language model's frozen linear weights in W4A16
    (4 bits plus a bf16 scale and zero per group), as QLoRA would hold them. A count, not a training run."""
    from torch import nn

    from nvila.workflows.cli import read_recipe
    from nvila.workflows.module import build_module

    config = read_recipe(["--config", "nvila-8b", "--config", "stages/peft"])
    with torch.device("meta"):
        module = build_module(**config["model"])
    model = module.model
    int4 = {id(m.weight) for name, m in model.llm.named_modules()
            if type(m) is nn.Linear and not m.weight.requires_grad and "lora_" not in name
            and not name.endswith("lm_head") and m.in_features % group_size == 0}
    bits = 4 + 2 * 16 / group_size

    def state(int4_ids: set[int]) -> float:
        total = 0.0
        for p in model.parameters():
            stored = p.numel() * bits / 8 if id(p) in int4_ids else p.numel() * p.element_size()
            total += stored + (12 * p.numel() if p.requires_grad else 0)
        return total / 2**30

    bf16, qlora = state(set()), state(int4)
    note = "counted on the meta device: weights, fp32 gradients and AdamW moments; activations not included"
    return [Row("qlora", "nvila-8b stages/peft, frozen weights bf16", "training state", bf16, "GiB", note=note),
            Row("qlora", "nvila-8b stages/peft, frozen LLM linears W4A16", "training state", qlora, "GiB",
                note=note + "; QLoRA training itself is not implemented"),
            Row("qlora", "W4A16 / bf16 frozen", "training state", qlora / bf16, "×")]


# -- running --------------------------------------------------------------------------------------------------
SUITES = ("machine", "ttft", "decode", "peer", "quality", "qlora")


def run_suites(suites: Sequence[str], size: str = "mid", images: Sequence[tuple[int, int]] = IMAGES,
               repeats: int = 2, tokens: int = 16, calib: str | None = None, held_out_shards: str | None = None,
               ckpt: str | None = None, calib_samples: int = 64, samples: int = 32,
               eval_limit: int = 200, device: str = "cpu") -> list[Row]:
    """The machine's limits, then each suite asked for, in order; all rows. ``device`` "cuda" runs the
    machine, ttft, decode and peer suites on a GPU (the quantizers pick torchao's CUDA kernels there)."""
    unknown = sorted(set(suites) - set(SUITES))
    if unknown:
        raise NvilaError(f"Unknown suite(s) {unknown}; suites: {', '.join(SUITES)}.")
    if "quality" in suites and not (calib and held_out_shards):
        raise NvilaError("The quality suite calibrates and evaluates on shards: give --calib and --held-out "
                         "(e.g. the train and val folders of `nvila data synth`), and --ckpt for a trained model.")
    limits, rows = machine_limits(device=device)
    for suite in suites:
        log.warning("bench-quant: %s (%s)", suite, size)
        if suite == "ttft":
            rows += time_to_first_token(size, images, repeats, limits=limits, device=device)
        elif suite == "decode":
            rows += decode(size, tokens, repeats, limits, device=device)
        elif suite == "peer":
            rows += peer(size, images, min(tokens, 8), repeats, device)
        elif suite == "qlora":
            rows += qlora_count()
        elif suite == "quality":  # at mid size one AWQ search takes minutes: the serving mix, AWQ and RTN
            configs = tuple(QUALITY_CONFIGS) if size == "demo" else ("w8a8 vision", "w8a8 + w4a16 awq",
                                                                      "w8a8 + w4a16 rtn")
            rows += quality(calib, held_out_shards, ckpt, "mid-1tile" if size == "mid" else size, configs,
                            calib_samples=calib_samples, samples=samples, eval_limit=eval_limit)
        gc.collect()
    return rows


# -- reporting ------------------------------------------------------------------------------------------------
def markdown(rows: Sequence[Row]) -> str:
    lines = ["| suite | case | metric | value | target | met | note |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.unit in ("%", "points", "% of bf16"):
            value = f"{r.value:.2f}"
        else:
            value = f"{r.value:,.0f}" if abs(r.value) >= 100 else f"{r.value:.3g}"
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.suite} | {r.case} | {r.metric} | {value} {r.unit} | {r.target} | {met} | {r.note} |")
    return "\n".join(lines)


def as_dicts(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
