"""W8A8: int8 weights and int8 activations quantized on the fly, for the vision tower (NVILA's prefill half).

With token compression the vision encoder does most of the work before the first token, and it is
compute-bound: int8 matrix units do it at up to 4x the fp32 rate. Weights are int8 per output channel
(symmetric, scale = max |w| / 127); activations are quantized per call, so no calibration is needed.

The kernel is picked for the device the layer runs on (shared API notes, section 4, and ``nvila bench quant-ttft``):
on CPUs with AMX int8 tiles (Sapphire Rapids and later) ``torch.ao``'s dynamic int8 linear through oneDNN (about
10x fp32 at 256 rows); on other x86 CPUs with AVX512-VNNI nvila's own int8 linear (``avx512_vnni``,
:mod:`nvila.quant.int8_cpu`: one activation scale per row, oneDNN's int8 GEMM, bias and a following GELU applied
in the pass that scales the output); elsewhere ``torch.ao``'s dynamic int8 linear through fbgemm (4.9x fp32 at one
row, 1.6x at 256 rows on AVX2); torchao's ``Int8Tensor`` on CUDA. torchao's path also runs on a CPU, 25x slower
than fp32 at 256 rows, so ``auto`` never picks it there; ``kernel: torchao`` asks for it.

torch.ao's CPU kernels take and return fp32 and round a whole call's activations with one scale. On CPUs with
bf16 units the rest of the tower computes in bf16 (``dtype: auto``), and converting activations around every
linear then costs much of what int8 saves over a bf16 GEMM; nvila's kernel takes and returns bf16 instead
(docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from nvila.core.errors import NvilaError
from nvila.core.interfaces import Calibration, Quantizer
from nvila.quant import int8_cpu
from nvila.quant.configs import W8A8Config
from nvila.quant.packed_linear import PackedLinear, cast_floating, linear_layers, replace_layer

log = logging.getLogger(__name__)
def cpu_has(feature: str) -> bool:
    """Whether this CPU has ``amx`` (AMX tiles), ``vnni`` (int8 dot products) or ``bf16`` (AVX512-BF16), by
    torch's own probes."""
    probe = {"amx": "_is_amx_tile_supported", "vnni": "_is_vnni_supported", "bf16": "_is_avx512_bf16_supported"}[
        feature]
    try:
        return bool(getattr(torch.cpu, probe)())
    except (AttributeError, RuntimeError):
        return False


def bf16_is_fast() -> bool:
    """Whether bf16 is this machine's fast format: a CUDA GPU, or a CPU with bf16 matrix instructions (AVX512-BF16,
    AMX). Without them a bf16 matmul runs several times slower than fp32's (API notes, section 4)."""
    return torch.cuda.is_available() or cpu_has("bf16") or cpu_has("amx")


def is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def pick_kernel(kernel: str, device: torch.device) -> str:
    """The kernel that runs W8A8 on ``device``: ``kernel`` itself unless it is 'auto'; NvilaError if unavailable."""
    if kernel == "auto":
        if device.type == "cuda":
            return "torchao"
        if device.type == "cpu":
            if cpu_has("amx") or not is_x86():
                return "onednn"
            return "avx512_vnni" if cpu_has("vnni") and int8_cpu.available() else "fbgemm"
        raise NvilaError(f"W8A8 has no kernel for {device.type} devices: it runs on CPUs (torch.ao dynamic int8) and "
                         "CUDA GPUs (torchao). Set `kernel: torchao` to try torchao's portable path there, or serve "
                         "the vision tower unquantized (drop quant.encoder).")
    if kernel in ("onednn", "fbgemm"):
        if device.type != "cpu":
            raise NvilaError(f"W8A8 kernel '{kernel}' runs on CPUs only, not on {device}; use kernel 'auto' or "
                             "'torchao' there.")
        if kernel not in torch.backends.quantized.supported_engines:
            raise NvilaError(f"W8A8 kernel '{kernel}' is not built into this torch (quantized engines: "
                             f"{', '.join(torch.backends.quantized.supported_engines)}); use kernel 'auto'.")
        if kernel == "fbgemm" and not is_x86():
            raise NvilaError("W8A8 kernel 'fbgemm' needs an x86 CPU; use 'onednn' (or 'auto') on this one.")
    if kernel == "avx512_vnni":
        if device.type != "cpu":
            raise NvilaError(f"W8A8 kernel 'avx512_vnni' runs on CPUs, not on {device}; use kernel 'auto'.")
        int8_cpu.load()  # NvilaError naming what the machine lacks, and kernel 'auto'
        if not cpu_has("vnni"):
            raise NvilaError("W8A8 kernel 'avx512_vnni' needs a CPU with AVX512-VNNI (its int8 dot products); use "
                             "kernel 'auto'.")
    if kernel == "torchao" and device.type == "cuda" and not torch.cuda.is_available():
        raise NvilaError("W8A8 on CUDA needs a CUDA GPU, and this machine has none; serve on the CPU (kernel 'auto').")
    return kernel


@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """torch's quantized engine set to ``engine`` while weights are packed for it (packed weights keep their engine)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


class Int8DynamicLinear(PackedLinear):
    """``y = act(quant(x) @ W_int8^T * scales + b)``, activations quantized to int8 per call (or per row).

    ``activation`` ('none' or 'gelu_tanh') is the activation that followed the layer in the model, taken into it
    (:func:`fuse_activations`): the ``avx512_vnni`` kernel applies it in the pass that scales the output.
    """

    PACKED = ("weight", "weight_scale")

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 kernel: str = "auto", activation: str = "none") -> None:
        super().__init__(weight.shape[1], weight.shape[0])
        self.register_buffer("weight", weight)  # (N, K) int8
        self.register_buffer("weight_scale", weight_scale)  # (N,) float32
        self.register_buffer("bias", bias)  # (N,) or None
        self.kernel, self.activation = kernel, activation
        self._running: str | None = None  # the kernel the packed form is for

    def pack(self, plain: dict[str, torch.Tensor]) -> Any:
        q, scale = plain["weight"], plain["weight_scale"].float()
        kernel = pick_kernel(self.kernel, q.device)
        self._running = kernel
        if kernel == "avx512_vnni":  # nvila's int8 linear reads the plain layout
            return {"weight": q.contiguous(), "weight_scale": scale.contiguous()}
        if kernel == "torchao":
            from nvila.quant._torchao import int8_dynamic

            dtype = self.bias.dtype if self.bias is not None else torch.float32
            return int8_dynamic(q, scale, dtype)
        bias = self.bias.float() if self.bias is not None else None
        with quantized_engine(kernel), warnings.catch_warnings():
            # torch deprecates its quantized tensors (pytorch#184982) in favour of torchao, whose CPU int8 is 25x
            # slower than fp32 (API notes, section 4): keep the fast kernel while torch 2.14 ships it.
            warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel")
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(),
                                                               torch.zeros_like(scale, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qweight, bias)

    def unpack(self, packed: Any) -> dict[str, torch.Tensor]:
        if self._running == "avx512_vnni":
            return dict(packed)
        if self._running == "torchao":
            from nvila.quant._torchao import int8_dynamic_parts

            q, scale = int8_dynamic_parts(packed)
            return {"weight": q.contiguous(), "weight_scale": scale.float().contiguous()}
        qweight, _ = torch.ops.quantized.linear_unpack(packed)
        return {"weight": qweight.int_repr().contiguous(), "weight_scale": qweight.q_per_channel_scales().float()}

    def matmul(self, x: torch.Tensor, packed: Any) -> torch.Tensor:
        if self._running == "avx512_vnni":  # bf16 or fp32 in and out, activations rounded per row; one output pass
            rows = x.reshape(-1, x.shape[-1])
            rows = rows if rows.dtype in (torch.bfloat16, torch.float32) else rows.float()
            bias = self.bias.float() if self.bias is not None else None
            y = int8_cpu.linear(rows, **packed, bias=bias, activation=self.activation)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        if self._running == "torchao":
            y = nn.functional.linear(x, packed, self.bias.to(x.dtype) if self.bias is not None else None)
            return self._activate(y)
        rows = x.reshape(-1, x.shape[-1]).float().contiguous()  # (M, K): the dynamic kernels take fp32
        # fbgemm without VNNI saturates 8-bit products in 16 bits: quantize activations to 7 bits there
        reduce_range = self._running == "fbgemm" and not cpu_has("vnni")
        y = torch.ops.quantized.linear_dynamic(rows, packed, reduce_range)  # (M, N)
        return self._activate(y.reshape(*x.shape[:-1], self.out_features).to(x.dtype))

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(y, approximate="tanh") if self.activation == "gelu_tanh" else y


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight`` (N, K) -> values (N, K) int8 and scales (N,) float32."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return q, scale


def is_gelu_tanh(module: nn.Module) -> bool:
    """Whether ``module`` computes GELU with tanh's approximation, by probing it (transformers names the class
    differently across versions): within fp32 rounding of torch's on values from -8 to 8."""
    if next(module.parameters(), None) is not None:
        return False
    probe = torch.linspace(-8, 8, 257)
    try:
        out = module(probe)
    except Exception:  # not an elementwise activation
        return False
    return isinstance(out, torch.Tensor) and out.shape == probe.shape and \
        torch.allclose(out, nn.functional.gelu(probe, approximate="tanh"), rtol=1e-5, atol=1e-6)


def fuse_activations(part: nn.Module) -> list[str]:
    """Take a GELU-tanh that follows a quantized layer into it (modules with ``fc1``, ``activation_fn`` and ``fc2``, as
    SigLIP's MLP): ``fc1`` then applies it in the pass that scales its output, and ``activation_fn`` becomes an
    identity. Returns the modules changed. It saves a pass over the widest activations of the tower."""
    fused = []
    for name, module in part.named_modules():
        first, act = getattr(module, "fc1", None), getattr(module, "activation_fn", None)
        if isinstance(first, Int8DynamicLinear) and first.activation == "none" and isinstance(act, nn.Module) and \
                hasattr(module, "fc2") and is_gelu_tanh(act):
            first.activation, module.activation_fn = "gelu_tanh", nn.Identity()
            fused.append(name)
    return fused


class W8A8(Quantizer):
    """int8 weights and dynamically quantized int8 activations for every linear layer of a part (the vision tower)."""

    def __init__(self, config: W8A8Config) -> None:
        self.config = config

    def check_available(self, device: torch.device) -> None:
        pick_kernel(self.config.kernel, torch.device(device))

    def quantize(self, part: nn.Module, calibrate: Calibration | None = None) -> list[str]:
        layers = linear_layers(part, self.config.skip)
        for name, layer in layers.items():
            q, scale = quantize_int8(layer.weight)
            bias = layer.bias.detach().float().clone() if layer.bias is not None else None
            replace_layer(part, name, Int8DynamicLinear(q, scale, bias, self.config.kernel))
        fuse_activations(part)
        dtype = self.config.dtype
        if dtype == "bf16" or (dtype == "auto" and bf16_is_fast()):
            cast_floating(part, torch.bfloat16)  # the rest of the tower: bf16 matrix units do attention too
        return list(layers)
