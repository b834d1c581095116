"""W4A16: int4 weights in groups, 16-bit activations, for the language model (NVILA's decode half).

Decoding reads every weight once per token, so it is bound by memory bandwidth: 4-bit weights (with one
16-bit scale and zero per group of 128 input channels, 4.25 bits a weight) read about 3.8x fewer bytes than
bf16. Scales come from AWQ calibration (``method: awq``, the default, on activations of samples drawn from
shards; see ``nvila.quant.awq``) or from plain round-to-nearest (``method: rtn``, no data needed).

Values follow tinygemm's convention, ``w = (q - 8) * scale + zero`` with ``q`` in 0..15. The checkpoint holds
them as plain tensors (two values a byte); the layer packs them for its device's kernel on first use
(API notes, section 3): on CPUs with AVX512-BF16, nvila's own kernel reads the plain layout as it is
(``nvila.quant.int4_cpu``, about 1.4x torch's speed at decoding; ``kernel: avx512_vnni`` rounds the activations
to int8, per group at decoding, llama.cpp's way, for about 1.1x that kernel's speed on Zen 4, and per row at
prefill for an int8 GEMM, about 1.9x the dequantize-then-bf16 matmul there); on other CPUs,
torchao's ``Int4OpaqueTensor`` (``PrototypeInt4WeightOnlyConfig``'s layout); the tile-packed tinygemm layout on
CUDA GPUs of compute capability 8.0 or higher. ``kernel: reference`` dequantizes at every call instead: slow, but it
runs on any device.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nvila.core.errors import NvilaError
from nvila.core.interfaces import Calibration, Quantizer
from nvila.quant import int4_cpu, int8_cpu
from nvila.quant.configs import W4A16Config
from nvila.quant.packed_linear import PackedLinear, cast_floating, check_widths, linear_layers, replace_layer

log = logging.getLogger(__name__)
DENSE_ROWS = {"avx512_bf16": 32, "avx512_vnni": 32, "cpu": 256}
"""Rows from which a call runs dequantize-then-bf16-matmul rather than the kernel, per CPU kernel (``dense_rows:
None``): about where the two cross on one core (Zen 4 for nvila's kernel, whose cost grows with the rows from 4 on;
Sapphire Rapids for torch's)."""
NVILA_KERNELS = ("avx512_bf16", "avx512_vnni")
"""nvila's own CPU kernels (``nvila.quant.int4_cpu``), which read the checkpoint's plain layout."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The torch dtype of each name in ``W4A16Config.dtype``'s choices (``configs.W4A16_DTYPES``)."""


def pick_kernel(kernel: str, device: torch.device, dtype: torch.dtype = torch.bfloat16, group_size: int = 128) -> str:
    """The kernel that runs W4A16 on ``device``: ``kernel`` itself unless 'auto'; NvilaError naming the alternative.

    'auto' on a CPU picks nvila's own kernel (``avx512_bf16``, :mod:`nvila.quant.int4_cpu`) where the CPU has
    AVX512-BF16 and it builds, for groups of 64 or 128; torch's int4 kernel (``cpu``) everywhere else. It never
    picks ``avx512_vnni``, whose int8 activations change the numbers: that one is asked for by name.
    """
    if kernel == "auto":
        if device.type not in ("cpu", "cuda"):
            raise NvilaError(f"W4A16 has no int4 kernel for {device.type} devices (torchao has them for CPUs and CUDA "
                             "GPUs of compute capability 8.0+). Set `kernel: reference` to dequantize at every call "
                             "(slow, any device), or serve on a CPU or a CUDA GPU.")
        kernel = device.type
        if kernel == "cpu" and dtype == torch.bfloat16 and group_size % 64 == 0:
            kernel = "avx512_bf16" if int4_cpu.available() else "cpu"
    if kernel == "avx512_bf16":
        if device.type != "cpu":
            raise NvilaError(f"W4A16 kernel 'avx512_bf16' runs on CPUs, not on {device}; use kernel 'auto'.")
        if group_size % 64:
            raise NvilaError(f"W4A16 kernel 'avx512_bf16' takes groups of 64 or 128, not {group_size}; use kernel "
                             "'cpu' (torch's int4 kernel) for groups of 32.")
        int4_cpu.load()  # NvilaError naming what the machine lacks, and kernel 'cpu'
    if kernel == "avx512_vnni":
        if device.type != "cpu":
            raise NvilaError(f"W4A16 kernel 'avx512_vnni' runs on CPUs, not on {device}; use kernel 'auto'.")
        if group_size != 128:
            raise NvilaError(f"W4A16 kernel 'avx512_vnni' rounds activations to int8 per group of 128, and this "
                             f"checkpoint has groups of {group_size}; use kernel 'avx512_bf16' or 'auto'.")
        int4_cpu.load()
        int8_cpu.load()  # its prefill's int8 GEMM
        if not int4_cpu.has_vnni():
            raise NvilaError("W4A16 kernel 'avx512_vnni' needs a CPU with AVX512-VNNI (its int8 dot products); use "
                             "kernel 'avx512_bf16' or 'auto'.")
    if kernel == "cpu" and device.type != "cpu":
        raise NvilaError(f"W4A16 kernel 'cpu' runs on CPUs, not on {device}; use kernel 'auto'.")
    if kernel == "cuda":
        if device.type != "cuda" or not torch.cuda.is_available():
            found = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
            raise NvilaError(f"W4A16 kernel 'cuda' (tinygemm int4) needs a CUDA GPU of compute capability 8.0 or "
                             f"higher (A100, L4, H100, ...); this runs on {device} and the machine has {found}. Use "
                             "kernel 'auto' (torchao's CPU int4 on a CPU) or 'reference' (any device, slow).")
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 0):
            raise NvilaError(f"W4A16 kernel 'cuda' (tinygemm int4) needs compute capability 8.0 or higher; "
                             f"{torch.cuda.get_device_name(device)} has {capability}. Use kernel 'reference'.")
    if kernel in ("cpu", "cuda", *NVILA_KERNELS) and dtype != torch.bfloat16:
        raise NvilaError(f"W4A16's int4 kernels take bf16 activations, not {dtype}; set dtype 'bf16', or kernel "
                         "'reference' for fp16.")
    return kernel


# -- int4 values ---------------------------------------------------------------------------------------------
def quantize_groups(weight: torch.Tensor, group_size: int, dtype: torch.dtype,
                    clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group: ``weight`` (N, K) -> values (N, K) uint8 in 0..15, scales and zeros (N, K/group).

    ``clip`` (one ratio, or one per group) first clamps each group to that fraction of its largest magnitude
    (AWQ's clipping). Values are rounded against the scale and zero as stored (in ``dtype``), so that
    dequantizing reproduces exactly what the kernel computes with.
    """
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)  # (N, G, g)
    if not (isinstance(clip, float) and clip == 1.0):
        clip = torch.as_tensor(clip, dtype=torch.float32)
        limit = w.abs().amax(-1, keepdim=True) * (clip[..., None] if clip.ndim else clip)  # (N, G, 1)
        w = torch.maximum(torch.minimum(w, limit), -limit)
    low, high = w.amin(-1), w.amax(-1)  # (N, G)
    scale = ((high - low) / 15).clamp(min=1e-6).to(dtype)  # (N, G)
    zero = (low + scale.float() * 8).to(dtype)  # (N, G): the value of q = 8
    q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)  # (N, G, g)
    return q.reshape(n, k).to(torch.uint8), scale, zero


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Values (N, K) and per-group scales and zeros (N, G) -> weights (N, K) in the scales' dtype."""
    n, k = q.shape
    groups = scale.shape[1]
    w = (q.reshape(n, groups, k // groups).float() - 8) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(n, k).to(scale.dtype)


def dequantize_nibbles(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Two values a byte (N, K/2) and per-group scales and zeros (N, G) -> weights (N, K) in the scales' dtype,
    computed in that dtype with one fused multiply-add (within a rounding of :func:`dequantize_groups`, 2-3x faster
    than it, and far faster than reading a kernel's packing back): what the reference kernel does at every call."""
    n, groups = scales.shape
    q = unpack_nibbles(qweight).to(scales.dtype).reshape(n, groups, -1)  # (N, G, g)
    return torch.addcmul(zeros[..., None] - 8 * scales[..., None], q, scales[..., None]).reshape(n, -1)  # (N, K)


def fake_quant(group_size: int, dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]:
    """Quantize-then-dequantize in float32, as AWQ's search needs it: the values of :func:`quantize_groups` and
    :func:`dequantize_groups` (before the final rounding to ``dtype``), in fewer passes over the weight."""
    def run(weight: torch.Tensor, clip: torch.Tensor | float) -> torch.Tensor:
        n, k = weight.shape
        w = weight.float().reshape(n, k // group_size, group_size)  # (N, G, g)
        if not (isinstance(clip, float) and clip == 1.0):
            clip = torch.as_tensor(clip, dtype=torch.float32)
            limit = w.abs().amax(-1, keepdim=True) * (clip[..., None] if clip.ndim else clip)  # (N, G, 1)
            w = torch.maximum(torch.minimum(w, limit), -limit)
        low, high = torch.aminmax(w, dim=-1, keepdim=True)  # (N, G, 1)
        scale = ((high - low) / 15).clamp_(min=1e-6).to(dtype).float()
        zero = (low + scale * 8).to(dtype).float()
        q = (w - zero).div_(scale).round_().add_(8).clamp_(0, 15)  # (N, G, g)
        return q.sub_(8).mul_(scale).add_(zero).reshape(n, k)

    return run


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Values (N, K) in 0..15 -> (N, K/2) uint8, column 2j in the low nibble and 2j+1 in the high one."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> values (N, K) uint8: the inverse of :func:`pack_nibbles`."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def unpack_by_probe(pack: Callable[[torch.Tensor], torch.Tensor], packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Invert a kernel's int4 packing without knowing its layout: values (N, K) uint8 back from ``packed``.

    Kernels pack int4 values into bytes in their own (ISA- and device-specific) order. Packing the base-16
    digits of each element's index with the same function tells where each element went; the nibbles of
    ``packed`` are then put back at their sources. Packing must only move 4-bit values, which is checked.
    """
    device = packed.device
    index = torch.arange(1, n * k + 1, device=device, dtype=torch.int64).reshape(n, k)  # 0 marks padding
    source = torch.zeros(packed.numel() * 2, dtype=torch.int64, device=device)
    for digit in range(math.ceil(math.log(n * k + 1, 16))):
        probe = pack(((index >> (4 * digit)) & 15).to(torch.int32))
        source += _nibbles(probe).long() << (4 * digit)
    real = source > 0
    out = torch.empty(n * k, dtype=torch.uint8, device=device)
    if int(real.sum()) != n * k:
        raise NvilaError(f"cannot unpack an int4 weight ({n}x{k}): its kernel's packing is not a nibble permutation")
    out[source[real] - 1] = _nibbles(packed)[real]
    return out.reshape(n, k)


@functools.cache
def cpu_layout(n: int) -> list[tuple[int, int, torch.Tensor]]:
    """How the CPU int4 kernel lays out ``n`` output rows: ``(first row, rows, order)`` per block of rows.

    torch packs each block of rows (64 with AVX-512, 32 with AVX2, a shorter last block) column after column,
    each column of a block as ``rows / 2`` bytes whose nibbles hold the block's rows in ``order`` (an
    ISA-specific interleaving). The orders are learnt by packing row numbers with the kernel itself.
    """
    digits = max(1, math.ceil(math.log(n, 16)))
    rows = torch.arange(n, dtype=torch.int64)[:, None].expand(n, 2)  # (N, 2): two columns, the fewest it packs
    found = torch.zeros(2 * n, dtype=torch.int64)
    for digit in range(digits):
        found += _nibbles(_cpu_pack(((rows >> (4 * digit)) & 15).to(torch.int32))).long() << (4 * digit)
    blocks, at = [], 0
    while at < 2 * n:
        start = int(found[at])
        again = (found[at + 1:] == found[at]).nonzero()  # column 1 of the block starts with the same row
        size = int(again[0]) + 1 if len(again) else 0
        order = found[at:at + size] - start
        if size == 0 or not torch.equal(order.sort().values, torch.arange(size)):
            raise NvilaError("cannot read the CPU int4 kernel's packed layout: it does not pack blocks of rows column "
                             "by column")
        blocks.append((start, size, order))  # column 0's nibbles: the block's rows, in the kernel's order
        at += 2 * size  # the probe has two columns
    return blocks


@functools.cache
def split_nibble_blocks(n: int) -> int:
    """The CPU kernel's row block if it packs ``n`` rows as whole blocks whose bytes hold row ``j`` of the block in
    the low nibble and row ``j + block / 2`` in the high one (torch's AVX-512 and AVX2 layouts, for widths that are
    multiples of the block); 0 if not, and the layout must be read through :func:`unpack_cpu`."""
    layout = cpu_layout(n)
    size = layout[0][1]
    halves = torch.arange(size).reshape(2, size // 2).t().reshape(-1)  # 0, size/2, 1, size/2 + 1, ...
    whole = all(s == size and torch.equal(order, halves) for _, s, order in layout) and size % 2 == 0
    return size if whole else 0


def _cpu_pack(q: torch.Tensor) -> torch.Tensor:
    from nvila.quant._torchao import int4_cpu_pack

    return int4_cpu_pack(q)


def unpack_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Values (N, K) uint8 from the CPU kernel's packed bytes, with reshapes and one gather per kind of block."""
    _check_cpu_layout(n, k)
    return _unpack_cpu(packed, n, k)


@functools.cache
def _check_cpu_layout(n: int, k: int) -> None:
    """Once per shape: random values packed by the kernel come back from :func:`_unpack_cpu` unchanged."""
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    if not torch.equal(_unpack_cpu(_cpu_pack(q), n, k).int(), q):
        raise NvilaError(f"this torch's CPU int4 packing of a {n}x{k} weight is not the one nvila reads; set W4A16's "
                         "`kernel: reference` (or report the torch version, so that nvila learns its layout).")


def _unpack_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nibbles = _nibbles(packed)
    out = torch.empty(n, k, dtype=torch.uint8, device=packed.device)
    at = 0
    layout = cpu_layout(n)
    i = 0
    while i < len(layout):
        start, size, order = layout[i]
        same = 1  # full blocks share one order: take them together
        while i + same < len(layout) and layout[i + same][1] == size and torch.equal(layout[i + same][2], order):
            same += 1
        count = same * k * size
        values = nibbles[at:at + count].reshape(same, k, size)  # (blocks, K, rows in the kernel's order)
        rows = values.index_select(2, order.argsort())  # (blocks, K, rows in order)
        out[start:start + same * size] = rows.transpose(1, 2).reshape(same * size, k)
        at += count
        i += same
    return out


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1).to(torch.uint8)
    return torch.stack([flat & 15, flat >> 4], dim=-1).reshape(-1)  # (2 * bytes,)


# -- the layer -----------------------------------------------------------------------------------------------
class Int4WeightOnlyLinear(PackedLinear):
    """``y = (x * input_scale) @ dequant(W_int4)^T + b`` in 16 bits; ``input_scale`` is AWQ's 1/s (absent for RTN).

    Its weights are buffers, never trained; the output is differentiable in ``x``, so that LoRA adapters around
    the layer train (QLoRA-style, ``nvila.workflows.qlora``) while the weight stays int4.
    """

    PACKED = ("qweight", "scales", "zeros")

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 input_scale: torch.Tensor | None, bias: torch.Tensor | None, kernel: str = "auto",
                 dense_rows: int | None = None) -> None:
        super().__init__(qweight.shape[1] * 2, qweight.shape[0])
        self.register_buffer("qweight", qweight)  # (N, K/2) uint8, two values a byte
        self.register_buffer("scales", scales)  # (N, K/group), 16-bit
        self.register_buffer("zeros", zeros)  # (N, K/group), 16-bit
        self.register_buffer("input_scale", input_scale)  # (K,) 16-bit, or None
        self.register_buffer("bias", bias)  # (N,) 16-bit, or None
        self.kernel, self.dense_rows = kernel, dense_rows
        self.group_size = self.in_features // scales.shape[1]
        self._running: str | None = None  # the kernel, and the activations' dtype, of the packed form
        self._dtype = scales.dtype

    def pack(self, plain: dict[str, torch.Tensor]) -> Any:
        scales, zeros = plain["scales"], plain["zeros"]
        kernel = pick_kernel(self.kernel, scales.device, group_size=self.group_size)
        # the int4 kernels compute in bf16 whatever the scales are in
        self._running, self._dtype = kernel, scales.dtype if kernel == "reference" else torch.bfloat16
        if kernel == "reference":  # the plain tensors themselves, two values a byte
            return {"qweight": plain["qweight"], "scales": scales, "zeros": zeros}
        if kernel in NVILA_KERNELS:  # the plain layout too, with 16-bit numbers in bf16
            return {"qweight": plain["qweight"].contiguous(), "scales": scales.to(torch.bfloat16).contiguous(),
                    "zeros": zeros.to(torch.bfloat16).contiguous()}
        q = unpack_nibbles(plain["qweight"])
        from nvila.quant import _torchao

        make = _torchao.int4_cpu if kernel == "cpu" else _torchao.int4_cuda
        return make(q.to(torch.int32), scales.to(torch.bfloat16), zeros.to(torch.bfloat16), self.group_size)

    def unpack(self, packed: Any) -> dict[str, torch.Tensor]:
        n, k = self.out_features, self.in_features
        if self._running == "reference" or self._running in NVILA_KERNELS:
            return dict(packed)
        else:
            from nvila.quant import _torchao

            if self._running == "cpu":
                q = unpack_cpu(packed.qdata, n + (-n % _torchao.CPU_ROWS), k)[:n]
            else:
                k_pad, n_pad = -k % 1024, -n % 8
                q = unpack_by_probe(lambda d: _torchao.int4_cuda_pack(nn.functional.pad(d, (0, k_pad, 0, n_pad))),
                                    packed.qdata, n, k)
            scales, zeros = self._scales_and_zeros(packed)
        return {"qweight": pack_nibbles(q), "scales": scales.contiguous(), "zeros": zeros.contiguous()}

    def _scales_and_zeros(self, packed: Any) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = packed.scale_and_zero.transpose(0, 1)  # (N', G', 2), padded
        groups = self.in_features // self.group_size
        return pairs[:self.out_features, :groups, 0], pairs[:self.out_features, :groups, 1]

    def dense_weight(self, packed: Any) -> torch.Tensor:
        """The CPU-packed weight as a dense (N, K) bf16 matrix (each value rounded to bf16, as a bf16 GEMM reads it).

        Where the kernel packs whole blocks of rows as low and high nibbles (:func:`split_nibble_blocks`: every
        width that is a multiple of its block), the values are read in place, with no gather, into the transposed
        (K, N) matrix that a GEMM reads as fast, and returned as its (N, K) view: 2.9x faster than through
        :func:`unpack_cpu`, which matters as prefill-sized calls rebuild every layer's weight this way.
        """
        n, k = self.out_features, self.in_features
        rows = n + (-n % 16)
        scales, zeros = self._scales_and_zeros(packed)  # (N, G) bf16
        groups = scales.shape[1]
        block = split_nibble_blocks(rows)
        if block:
            by = packed.qdata.view(torch.uint8).reshape(rows // block, k, block // 2)  # (blocks, K, block / 2)
            q = torch.empty(k, rows // block, 2, block // 2, dtype=torch.uint8, device=by.device)  # (K, N') as blocks
            torch.bitwise_and(by, 15, out=q[:, :, 0].permute(1, 0, 2))  # low nibbles: each block's first half
            torch.bitwise_right_shift(by, 4, out=q[:, :, 1].permute(1, 0, 2))  # high nibbles: its second half
            q = q.reshape(groups, k // groups, rows)[..., :n]  # (G, g, N)
            st, zt = scales.t()[:, None].float(), zeros.t()[:, None].float()  # (G, 1, N)
            w = torch.addcmul(zt - 8 * st, q, st)  # (G, g, N) fp32: one rounding to bf16, below, as the kernel's
            return w.to(torch.bfloat16).reshape(k, n).t()  # (N, K): a view of the (K, N) matrix
        q = unpack_cpu(packed.qdata, rows, k)[:n]  # (N, K) uint8
        w = torch.addcmul((zeros.float() - 8 * scales.float())[..., None], q.reshape(n, groups, k // groups),
                          scales.float()[..., None])  # (N, G, g) fp32, rounded once below
        return w.to(torch.bfloat16).reshape(n, k)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """The layer as a plain ``nn.Linear`` in ``dtype`` computing the same product (AWQ's input scale folded into
        the weight's columns): what exporting a model trained over int4 weights writes."""
        plain = self.plain()
        weight = dequantize_groups(unpack_nibbles(plain["qweight"]), plain["scales"].float(),
                                   plain["zeros"].float()).to(dtype)  # (N, K), computed in fp32
        if self.input_scale is not None:
            weight = weight * self.input_scale.to(dtype)  # x * s @ W^T = x @ (W * s)^T
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device,
                          dtype=dtype)
        layer.weight.data = weight
        if self.bias is not None:
            layer.bias.data = self.bias.to(dtype)
        return layer.requires_grad_(False)

    def dequantized(self, packed: Any) -> torch.Tensor:
        """The weight as a dense (N, K) matrix in the activations' dtype, made anew at each call (never kept)."""
        if self._running == "reference":
            return dequantize_nibbles(**packed)
        if self._running in NVILA_KERNELS:
            return int4_cpu.dequantize(**packed)
        if self._running == "cpu":
            return self.dense_weight(packed)
        plain = self.unpack(packed)  # CUDA's tile layout: read back by probing (slower, still transient)
        return dequantize_groups(unpack_nibbles(plain["qweight"]), plain["scales"], plain["zeros"])

    def matmul(self, x: torch.Tensor, packed: Any) -> torch.Tensor:
        x = x.to(self._dtype)
        if self.input_scale is not None:
            x = x * self.input_scale  # (..., K): AWQ's 1/s, the inverse of the scale folded into the weight
        if torch.is_grad_enabled() and x.requires_grad:  # training adapters around this frozen layer (QLoRA)
            return _FrozenInt4Product.apply(x, self, packed)  # (..., N)
        return self.product(x, packed, self.bias)

    def product(self, x: torch.Tensor, packed: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (..., K) in the activations' dtype times the weight, plus ``bias``: (..., N); no autograd graph."""
        dense_rows = DENSE_ROWS.get(self._running, 0) if self.dense_rows is None else self.dense_rows
        long = dense_rows and x.numel() // x.shape[-1] >= dense_rows  # prefill-sized: one dense matmul
        if self._running == "cuda":
            weight = packed  # torchao's tensor subclass runs tinygemm
        elif self._running == "reference" or (long and self._running != "avx512_vnni"):
            weight = self.dequantized(packed).to(x.dtype)  # (N, K)
        else:  # on a CPU: the kernel itself (torch's without its tensor subclass's dispatch)
            rows = x.reshape(-1, self.in_features)
            if self._running == "avx512_bf16":
                y = int4_cpu.matmul(rows, **packed)  # (M, N)
            elif self._running == "avx512_vnni":  # int8 activations: per group at decoding, an int8 GEMM at prefill
                y = (int4_cpu.matmul_int8_gemm if long else int4_cpu.matmul_a8)(rows, **packed)  # (M, N)
            else:
                from nvila.quant._torchao import int4_cpu_mm

                y = int4_cpu_mm(rows, packed)[:, :self.out_features]  # (M, N)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y + bias.to(y.dtype) if bias is not None else y
        return nn.functional.linear(x, weight, bias.to(x.dtype) if bias is not None else None)


class _FrozenInt4Product(torch.autograd.Function):
    """``x @ W^T`` for a frozen int4 weight, differentiable in ``x`` only (what LoRA training over it needs).

    Forward runs the layer's own kernel; backward dequantizes the weight again, one layer at a time, for
    ``grad_x = grad_y @ W``, and drops it. Nothing but the packed int4 weight stays between the two passes: a
    plain ``linear`` over a dequantized weight would keep that dense weight alive until backward, every layer's
    at once, which is the memory int4 was meant to save.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: Int4WeightOnlyLinear, packed: Any) -> torch.Tensor:
        ctx.layer, ctx.packed = layer, packed
        return layer.product(x, packed, layer.bias)  # (..., N); the bias, a buffer, takes no gradient

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight = ctx.layer.dequantized(ctx.packed).to(grad.dtype)  # (N, K), freed on return
        return grad @ weight, None, None  # (..., K)


# -- the quantizer -------------------------------------------------------------------------------------------
class W4A16(Quantizer):
    """int4 weights (groups of 128, AWQ or round-to-nearest) and 16-bit activations for a part's linear layers."""

    def __init__(self, config: W4A16Config) -> None:
        self.config = config
        self.calibrates = config.method == "awq"
        self.dtype = DTYPES[config.dtype]
        self.last_search: dict[str, Any] = {}
        """AWQ's outcome per layer after the last :meth:`quantize` (alpha, clipping, output errors), to inspect."""

    def check_available(self, device: torch.device) -> None:
        pick_kernel(self.config.kernel, torch.device(device), self.dtype, self.config.group_size)

    def quantize(self, part: nn.Module, calibrate: Calibration | None = None) -> list[str]:
        from nvila.quant import awq

        config = self.config
        layers = linear_layers(part, config.skip)
        check_widths(layers, config.group_size, "group_size", "W4A16")
        stats = {}
        if config.method == "awq" and calibrate is not None:
            stats = awq.collect(part, layers, calibrate, config.calib_rows)
        elif config.method == "awq":
            log.info("W4A16 AWQ without calibration: unit scales (round to nearest); a checkpoint fills the real ones")
        self.last_search = {}
        for name, layer in layers.items():
            weight, input_scale, clip = layer.weight.detach().float(), None, 1.0
            if config.method == "awq":
                input_scale = torch.ones(layer.in_features, dtype=self.dtype)
                if name in stats:
                    found = awq.search(weight, stats[name], fake_quant(config.group_size, self.dtype),
                                       config.group_size, grid=config.awq_grid)
                    self.last_search[name] = found
                    input_scale = (1 / found.scale).to(self.dtype)  # (K,) as stored, and the scale it undoes:
                    weight = weight / input_scale.float()  # W * s, with s exactly 1 / input_scale
                    clip = found.clip
            q, scales, zeros = quantize_groups(weight, config.group_size, self.dtype, clip)
            bias = layer.bias.detach().to(self.dtype).clone() if layer.bias is not None else None
            replace_layer(part, name, Int4WeightOnlyLinear(pack_nibbles(q), scales, zeros, input_scale, bias,
                                                           config.kernel, config.dense_rows))
        cast_floating(part, self.dtype)  # the rest (embeddings, norms, the output layer) computes in 16 bits too
        return list(layers)
