"""nvila's own W4A16 kernels for x86 CPUs with AVX512-BF16 (``csrc/int4_cpu.cpp``), built on first use.

Decoding reads every weight once per token. torch's CPU int4 kernel turns each nibble into fp32 and multiplies
in fp32, which leaves it compute-bound well below a core's memory bandwidth (9.6 GB/s of cold int4 weights on a
Zen 4 core that copies at 24.9); this one turns 32 nibbles into bf16 with one table lookup, multiplies them with
one bf16 dot-product instruction and prefetches ahead (15.5 GB/s; 1.4x torch's decoding, ``nvila bench
quant-decode``). It reads the checkpoint's own layout, so loading repacks nothing, and its dequantization (for
prefill-sized calls) is a plain pass over the bytes, about 13x faster than reading torch's packing back.

The ops, ``torch.ops.nvila_int4.matmul(x, qweight, scales, zeros)``, ``...dequantize(qweight, scales, zeros)``,
``...matmul_a8`` (the product with int8 activations, where the CPU has AVX512-VNNI: ``kernel: avx512_vnni``,
1.1-1.2x the speed of ``matmul`` at decoding on Zen 4, at a cost in exactness that ``nvila bench quant-quality``
measures) and ``...widen_to_int8`` (that kernel's prefill: int8 weights for an int8 GEMM), are compiled with
torch's C++ extension builder (a C++ compiler and ninja; about 8 s once, then cached under
``TORCH_EXTENSIONS_DIR``) and registered with fake tensors, so a compiled decoding step calls them as it calls any
aten op.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nvila.core.native import AVX512_FLAGS, NativeOps

SOURCE = Path(__file__).parent / "csrc" / "int4_cpu.cpp"


def _register_fakes() -> None:
    """Shapes without running the kernels, for torch.compile's tracing."""
    @torch.library.register_fake("nvila_int4::matmul")
    def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("nvila_int4::matmul_a8")
    def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("nvila_int4::widen_to_int8")
    def _(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = qweight.shape[0]
        return qweight.new_empty(n, qweight.shape[1] * 2, dtype=torch.int8), scales.new_empty(n, dtype=torch.float32)

    @torch.library.register_fake("nvila_int4::dequantize")
    def _(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return scales.new_empty(qweight.shape[0], qweight.shape[1] * 2)


KERNEL = NativeOps("nvila_int4_cpu", SOURCE, "nvila's AVX512-BF16 int4 kernel",
                   "Use W4A16's kernel 'cpu' (torch's int4 kernel, any CPU) or 'auto'.",
                   flags=[*AVX512_FLAGS, "-mavx512bf16"], needs_bf16=True, fakes=_register_fakes)
missing, available, load = KERNEL.missing, KERNEL.available, KERNEL.load


def matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``x`` (M, K) bf16 times the int4 weight (``qweight`` (N, K/2) uint8 in the checkpoint's layout, ``scales`` and
    ``zeros`` (N, K/group) bf16, group a multiple of 64): (M, N) bf16, accumulated in fp32."""
    return torch.ops.nvila_int4.matmul(x, qweight, scales, zeros)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The int4 weight as a dense (N, K) bf16 matrix, each value computed in fp32 and rounded once."""
    return torch.ops.nvila_int4.dequantize(qweight, scales, zeros)


def matmul_a8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """:func:`matmul` with ``x`` rounded to int8 per group of 128 columns (scale: the group's largest magnitude over
    127), as llama.cpp's CPU kernels round activations to their Q8 blocks: exactly the dequantized weight times the
    dequantized activations, with int8 dot products (AVX512-VNNI) that halve the instructions of the bf16 ones.
    Groups of 128 only."""
    return torch.ops.nvila_int4.matmul_a8(x, qweight, scales, zeros)


def matmul_int8_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """:func:`matmul` for prefill-sized ``x`` through an int8 GEMM: the weight widened to int8 per output channel,
    each row of ``x`` rounded to int8 with one scale (:func:`nvila.quant.int8_cpu.linear`). About 1.9x the
    dequantize-then-bf16 path at a thousand rows on Zen 4, with int8 rounding's error (about 1 % of the output's
    norm on random data)."""
    from nvila.quant import int8_cpu

    weight, weight_scale = torch.ops.nvila_int4.widen_to_int8(qweight, scales, zeros)
    return int8_cpu.linear(x, weight, weight_scale)


def has_vnni() -> bool:
    """Whether this CPU has AVX512-VNNI, which :func:`matmul_a8` needs."""
    try:
        return bool(torch.cpu._is_vnni_supported())
    except (AttributeError, RuntimeError):
        return False


def int8_missing() -> str | None:
    """Why :func:`matmul_a8` cannot run here (what the machine lacks), without building anything; None if it can."""
    from nvila.quant import int8_cpu

    if (reason := missing() or int8_cpu.missing()) is not None:
        return reason
    return None if has_vnni() else "this CPU has no AVX512-VNNI instructions (the int8 dot products)"
