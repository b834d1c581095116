"""``nvila bench attention``: prefill attention in bf16 on the CPU, nvila's kernel against torch's SDPA side by side.

Attention was the larger half of the W8A8 vision tower's time on the CPU (torch's flash kernel at 57-80 GFLOP/s on one
Zen 5 core, against 384 for the same core's bf16 matmuls), so the tower and prefill figures of ``quant-ttft`` rest on
it. This suite times the attention call alone, at the shapes those models run: a SigLIP-so400m tile (16 heads of 72,
1,024 tokens, no mask), and causal prompts of 1,024 tokens for a Qwen2-0.5B-shaped model (14 query heads on 2
key/value heads of 64) and a Qwen2-7B-shaped one (28 on 4, of 128). Each row reports its throughput as a share of the
bf16 matmul peak measured at the start of the same run, and its largest difference from attention in fp64 on the same
bf16 inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention

from nvila.core.errors import NvilaError
from nvila.plugins import attention
from nvila.workflows.bench.measure import time_interleaved
from nvila.workflows.bench.quant import Limits, limits_record, machine_limits
from nvila.workflows.bench.record import Metric, Record
from nvila.workflows.bench.runner import BenchRun


@dataclass(frozen=True)
class Shape:
    heads: int
    kv_heads: int
    tokens: int
    dim: int
    causal: bool

    def flops(self) -> float:
        """Multiply-adds of both products, twice (halved for causal attention, which skips the upper triangle)."""
        full = 4 * self.heads * self.tokens * self.tokens * self.dim
        return full / 2 if self.causal else full


SHAPES: dict[str, Shape] = {
    "siglip tile": Shape(16, 16, 1024, 72, causal=False),
    "qwen2-0.5b prompt": Shape(14, 2, 1024, 64, causal=True),
    "qwen2-7b prompt": Shape(28, 4, 1024, 128, causal=True),
}
KERNELS = ("torch sdpa", "nvila")
BASELINE = "torch sdpa"
COMPARE = ("attention",)
SUMMARY = ("Prefill attention alone in bf16, batch 1: torch's SDPA (its CPU flash kernel) against nvila's AVX512-BF16 "
           "kernel, timed round by round after a warm-up round, the best of the rounds. *siglip tile*: one "
           "448x448 tile of a SigLIP-so400m tower (16 heads of 72, 1,024 tokens, no mask); *qwen2-0.5b / qwen2-7b "
           "prompt*: a causal 1,024-token prompt (14 query heads on 2 key/value heads of 64; 28 on 4 of 128). "
           "*of bf16 peak*: the throughput against the bf16 matmul limit measured at the start of the run; *max "
           "error*: the largest difference from fp64 attention on the same inputs.")


def require_kernel() -> None:
    """Refuse the suite (before anything runs) where nvila's prefill kernel cannot run, saying why."""
    missing = attention.PREFILL_KERNEL.missing()
    if missing is not None:
        raise NvilaError(f"`nvila bench attention` compares nvila's prefill attention kernel with torch's SDPA, and "
                         f"the kernel cannot run here: {missing}.")
    attention.PREFILL_KERNEL.load()


def configuration_name(shape: str, kernel: str) -> str:
    return f"{shape}, {kernel}"


def _inputs(shape: Shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 query (laid out as projections are: (1, L, H, D) transposed), key and value, from seed 0."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, shape.tokens, shape.heads, shape.dim, generator=g).bfloat16().transpose(1, 2)
    k = torch.randn(1, shape.kv_heads, shape.tokens, shape.dim, generator=g).bfloat16()
    v = torch.randn(1, shape.kv_heads, shape.tokens, shape.dim, generator=g).bfloat16()
    return q, k, v


def _calls(shape: Shape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Any]:
    """The two kernels, each returning (B, L, H, D) as transformers' attention functions do."""
    scaling = shape.dim ** -0.5
    return {
        "torch sdpa": lambda: scaled_dot_product_attention(q, k, v, scale=scaling, is_causal=shape.causal,
                                                           enable_gqa=True).transpose(1, 2),
        "nvila": lambda: torch.ops.nvila_prefill_attention.forward(q, k, v, scaling, shape.causal),
    }


@torch.no_grad()
def measure_shape(bench: BenchRun, name: str, shape: Shape, kernels: list[str], peak: float, repeats: int) -> None:
    q, k, v = _inputs(shape)
    calls = {kernel: call for kernel, call in _calls(shape, q, k, v).items() if kernel in kernels}
    exact = scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=shape.dim ** -0.5,
                                         is_causal=shape.causal, enable_gqa=True).transpose(1, 2)
    timings = time_interleaved(calls, repeats, warmup=1)
    for kernel in kernels:
        seconds = timings[kernel].best
        flops = shape.flops() / seconds
        error = (calls[kernel]().double() - exact).abs().max().item()
        bench.add(Record(
            bench.suite, configuration_name(name, kernel), group="prefill attention",
            metrics={"attention": Metric(round(seconds * 1000, 2), "ms", "lower", "{:,.2f}"),
                     "throughput": Metric(round(flops / 1e9, 1), "GFLOP/s", "higher", "{:,.0f}"),
                     "of bf16 peak": Metric(round(100 * flops / peak, 1), "%", None, "{:.1f}"),
                     "max error": Metric(round(error, 4), "", None, "{:.4f}")},
            baseline=None if kernel == BASELINE else configuration_name(name, BASELINE)))


def run_attention_suite(bench: BenchRun, shapes: dict[str, Shape] | None = None, repeats: int = 5,
                        limits: Limits | None = None) -> None:
    """The machine's limits, then every selected (shape, kernel) pair, the two kernels of a shape round by round."""
    shapes = SHAPES if shapes is None else shapes
    names = bench.selected([configuration_name(s, k) for s in shapes for k in KERNELS])
    limits = limits or machine_limits(device="cpu")
    limits_record(bench, limits)
    repeats = bench.rounds(repeats)
    bench.note(f"{repeats} timed rounds after one warm-up round; {torch.get_num_threads()} torch thread(s).")
    for name, shape in shapes.items():
        kernels = [k for k in KERNELS if configuration_name(name, k) in names]
        if kernels:
            measure_shape(bench, name, shape, kernels, limits.peak["bf16"], repeats)
