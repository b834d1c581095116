"""nvila's W8A8 linear for x86 CPUs with AVX-512 (``csrc/int8_cpu.cpp``), built on first use.

``torch.ops.nvila_int8.linear(x, weight, weight_scale)``: ``x`` (M, K) bf16 or fp32 rounded to int8 per row
(per token), times the int8 ``weight`` (N, K) with one fp32 scale per output channel, through oneDNN's int8 GEMM
(``torch._int_mm``); the result comes back in ``x``'s dtype. Against torch.ao's dynamic int8 linear it saves the
fp32 conversions around every call of a bf16 model, and one scale per row rather than per call keeps a row of
small activations from losing its precision to a large one. The W8A8 vision tower runs it (``kernel:
avx512_vnni``), and so does W4A16's prefill with int8 activations, over its int4 weight widened to int8.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nvila.core.native import NativeOps

SOURCE = Path(__file__).parent / "csrc" / "int8_cpu.cpp"


def _register_fakes() -> None:
    """Shapes without running the kernel, for torch.compile's tracing."""
    @torch.library.register_fake("nvila_int8::linear")
    def _(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
          activation: str = "none") -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])


KERNEL = NativeOps("nvila_int8_cpu", SOURCE, "nvila's AVX-512 int8 linear",
                   "Use W8A8's kernel 'auto' (torch.ao's dynamic int8 linear there) or W4A16's 'avx512_bf16' instead.",
                   fakes=_register_fakes)
missing, available, load = KERNEL.missing, KERNEL.available, KERNEL.load


ACTIVATIONS = ("none", "gelu_tanh")
"""What :func:`linear` can apply to its output in the same pass (GELU-tanh: SigLIP's MLP after its first layer)."""


def linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str = "none") -> torch.Tensor:
    """``x`` (M, K) bf16 or fp32 rounded to int8 per row (scale: the row's largest magnitude over 127), times
    ``weight`` (N, K) int8 with ``weight_scale`` (N,) fp32, plus ``bias`` (N,) fp32, then ``activation`` (one of
    :data:`ACTIVATIONS`), in one pass over the output: (M, N) in ``x``'s dtype."""
    return torch.ops.nvila_int8.linear(x, weight, weight_scale, bias, activation)
