"""Every torchao import in one place: its APIs moved between 0.12 and 0.18 (we pin 0.18.*).

Besides FP8 training, this shim builds torchao's quantized weight tensors from integers we computed
ourselves (so that a checkpoint holds plain tensors and each device repacks them into its own layout):

- ``int4_cpu``: ``Int4OpaqueTensor`` (the tensor behind ``PrototypeInt4WeightOnlyConfig``), the CPU int4 kernel;
- ``int4_cuda``: ``Int4TilePackedTo4dTensor`` (``Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")``),
  tinygemm on CUDA compute capability >= 8.0;
- ``int8_dynamic``: ``Int8Tensor`` with per-row dynamic int8 activations
  (``Int8DynamicActivationInt8WeightConfig``'s tensor), torchao's W8A8, meant for GPUs.

Int4 values follow tinygemm's convention: ``w = (q - 8) * scale + zero``, ``q`` in 0..15, one scale and one
zero per group of ``group_size`` input channels, both in the activations' 16-bit dtype.
"""

from __future__ import annotations

import torch
from torchao.float8 import Float8LinearConfig, convert_to_float8_training
from torchao.prototype.quantization.int4 import Int4OpaqueTensor
from torchao.quantization import Int4TilePackedTo4dTensor, Int8Tensor, PerRow
from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs
from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

__all__ = ["Float8LinearConfig", "convert_to_float8_training", "int4_cpu", "int4_cpu_mm", "int4_cpu_pack", "int4_cuda",
           "int4_cuda_pack", "int8_dynamic", "int8_dynamic_parts"]

TILE_INNER_K = 8
"""tinygemm's inner k tiles for the tile-packed CUDA layout (fixed at 8 by torchao)."""


CPU_ROWS = 16
"""The CPU int4 kernel packs output rows in blocks: N is padded to a multiple of this (zero weights)."""


def int4_cpu_pack(q: torch.Tensor) -> torch.Tensor:
    """The CPU kernel's packing of int4 values (N, K) int32, N a multiple of ``CPU_ROWS``."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)  # innerKTiles unused


def int4_cpu(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Int4 values ``q`` (N, K) int32 in 0..15, ``scale``/``zero`` (N, K/group) -> a CPU int4 weight tensor.

    N is padded to a multiple of 16 with zero weights; the tensor's linear cuts its output back to N.
    """
    n, k = q.shape
    pad = -n % CPU_ROWS
    q = torch.nn.functional.pad(q.to(torch.int32), (0, 0, 0, pad), value=8)  # (q - 8) * 1 + 0 = 0
    scale = torch.nn.functional.pad(scale, (0, 0, 0, pad), value=1.0)
    zero = torch.nn.functional.pad(zero, (0, 0, 0, pad), value=0.0)
    return Int4OpaqueTensor(qdata=int4_cpu_pack(q), scale_and_zero=pack_tinygemm_scales_and_zeros(scale, zero,
                                                                                                  scale.dtype),
                            block_size=[1, group_size], shape=torch.Size([n, k]))


def int4_cpu_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` (M, K) bf16 times an ``int4_cpu`` weight: (M, N padded to 16). The kernel ``Int4OpaqueTensor``'s linear
    calls, called directly: its Python dispatch costs about as much as the kernel on a decoding step."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), weight.qdata, weight.block_size[1],
                                                       weight.scale_and_zero)


def int4_cuda_pack(q: torch.Tensor) -> torch.Tensor:
    """tinygemm's tile packing of int4 values (N, K) (K a multiple of 1024, N of 8), as torchao does it."""
    pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # (N, K/2)
    return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), TILE_INNER_K)


def int4_cuda(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Int4 values (N, K), scales and zeros (N, K/group) on a CUDA device -> a tile-packed int4 weight (bf16 only).

    Widths are padded as torchao pads them (K to a multiple of 1024, N to a multiple of 8); the padding is zero
    weights, and the kernel's output is cut back to N.
    """
    n, k = q.shape
    k_pad, n_pad = -k % 1024, -n % 8
    q = torch.nn.functional.pad(q.to(torch.int32), (0, k_pad, 0, n_pad), value=8)  # (q - 8) * s + 0 = 0
    scale = torch.nn.functional.pad(scale, (0, k_pad // group_size, 0, n_pad), value=1.0)
    zero = torch.nn.functional.pad(zero, (0, k_pad // group_size, 0, n_pad), value=0.0)
    return Int4TilePackedTo4dTensor(qdata=int4_cuda_pack(q), block_size=[1, group_size], shape=torch.Size([n, k]),
                                    scale_and_zero=pack_tinygemm_scales_and_zeros(scale.bfloat16(), zero.bfloat16(),
                                                                                  torch.bfloat16))


def int8_dynamic(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Int8 weights (N, K) with per-row scales (N,) -> torchao's W8A8 weight (activations quantized per row)."""
    return Int8Tensor(q.contiguous(), scale.reshape(-1, 1).float(), block_size=[1, q.shape[1]], dtype=dtype,
                      act_quant_kwargs=QuantizeTensorToInt8Kwargs(granularity=PerRow()))


def int8_dynamic_parts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 values (N, K) and per-row scales (N,) inside an ``int8_dynamic`` weight."""
    return weight.qdata, weight.scale.reshape(-1)
