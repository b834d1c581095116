"""The configs of the built-in precision backends (training) and quantizers (inference).

They live here, apart from the torch and torchao code they configure, so that ``nvila plugins`` lists and
describes every component without importing torch. Each config's docstring opens with the line ``nvila plugins``
shows; each component module re-exports its config (``from nvila.quant.w8a8 import W8A8Config`` works).
"""

from __future__ import annotations

from dataclasses import dataclass, field

FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
W8A8_KERNELS = ("auto", "avx512_vnni", "onednn", "fbgemm", "torchao")
W8A8_DTYPES = ("auto", "fp32", "bf16")
W4A16_GROUP_SIZES = (32, 64, 128)
W4A16_METHODS = ("awq", "rtn")
W4A16_KERNELS = ("auto", "avx512_bf16", "avx512_vnni", "cpu", "cuda", "reference")
W4A16_DTYPES = ("bf16", "fp16")
W16A16_DTYPES = ("auto", "bf16", "fp16")


@dataclass
class FP32Config:
    """Plain float32 everywhere: the fastest choice on CPUs without native bf16 (AVX512-BF16 or AMX)."""


@dataclass
class BF16Config:
    """bfloat16 mixed precision: fp32 master weights, bf16 autocast for matmuls."""

    true_bf16: bool = False
    """Store the weights in bf16 too (halves memory; loses fp32 master weights)."""
    frozen_in_bf16: bool = False
    """Store frozen linear and convolution weights in bf16: they never update and autocast computes with
    them in bf16 anyway, so results are unchanged and their memory halves (how NVILA fits 8B PEFT in
    24 GB). Exported checkpoints then hold those weights rounded to bf16. Not with FSDP, which flattens
    each wrapped block into one tensor of one dtype."""


@dataclass
class FP8Config:
    """Float8 training: eligible ``nn.Linear`` layers become torchao float8 linears (dims divisible by 16)."""

    recipe: str = "tensorwise"
    """torchao scaling recipe: 'tensorwise' (fastest), 'rowwise' or 'rowwise_with_gw_hp' (more accurate)."""
    emulate: bool = False
    """Emulate FP8 in higher precision (any device, no speedup): for tests, not for training runs."""
    lightning_precision: str = "bf16-mixed"
    """Precision of everything that is not a float8 linear layer."""
    skip_output_layer: bool = True
    """Keep the language model's output layer (lm_head) in high precision, as torchao recommends."""

    def __post_init__(self) -> None:
        if self.recipe not in FP8_RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(FP8_RECIPES)}, got '{self.recipe}'")


@dataclass
class W8A8Config:
    """int8 weights (per output channel) and int8 activations (quantized at run time)."""

    kernel: str = "auto"
    """'auto' picks by device (CPU with AMX: onednn; other x86 CPUs: fbgemm; CUDA: torchao), or name one of
    onednn, fbgemm (CPU, torch.ao dynamic int8: fp32 in and out, one activation scale a call), avx512_vnni (CPUs
    with AVX512-VNNI: nvila's int8 linear, bf16 or fp32 in and out, one activation scale a row, oneDNN's int8 GEMM)
    or torchao (any device; slow on CPUs)."""
    dtype: str = "auto"
    """What the part's other layers (attention, norms, embeddings) compute in: 'fp32', 'bf16', or 'auto': bf16
    where this CPU has bf16 matrix instructions (AVX512-BF16, AMX), else fp32 (bf16 is 6.7x slower than fp32
    without them: API notes, section 4)."""
    skip: list[str] = field(default_factory=list)
    """Linear layers left in full precision: fnmatch patterns on the qualified name or its last part."""

    def __post_init__(self) -> None:
        if self.kernel not in W8A8_KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(W8A8_KERNELS)}, got '{self.kernel}'")
        if self.dtype not in W8A8_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(W8A8_DTYPES)}, got '{self.dtype}'")


@dataclass
class W4A16Config:
    """int4 weights in groups (16-bit scale and zero per group), 16-bit activations."""

    group_size: int = 128
    """Input channels sharing one scale and zero (32, 64 or 128); it must divide every quantized layer's width."""
    method: str = "awq"
    """'awq': activation-aware scales and clipping searched on calibration samples; 'rtn': round to nearest."""
    kernel: str = "auto"
    """'auto' (CPU: nvila's AVX512-BF16 int4 kernel where the CPU has those instructions, else torch's CPU int4;
    CUDA: tinygemm's tile-packed int4), 'avx512_bf16', 'cpu', 'cuda', or 'reference' (dequantizes at every call:
    any device, slow). 'avx512_vnni' (asked for by name, never picked by 'auto'): nvila's CPU kernel with int8
    activations, rounded per group of 128 at decoding (llama.cpp's way) and per row at prefill, where the weight is
    widened to int8 per channel for an int8 GEMM; faster, not exact 16-bit activations (groups of 128,
    AVX512-VNNI)."""
    dtype: str = "bf16"
    """16-bit dtype of activations, scales and the part's other weights: 'bf16' or 'fp16' (reference kernel only)."""
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    """Linear layers kept in 16 bits: fnmatch patterns on the qualified name or its last part (AWQ keeps the
    output layer, which small models tie to the input embedding)."""
    dense_rows: int | None = None
    """On CPUs, a call with at least this many rows (a prefill) dequantizes the layer to bf16 and runs one dense
    matmul (``avx512_vnni``: widens it to int8 for an int8 GEMM), which beats an int4 kernel past some rows (int4
    kernels are made for decoding); 0 keeps the int4 kernel for every call. None: each kernel's own crossover,
    measured on one core (32 rows for ``avx512_bf16``, 256 for torch's ``cpu``)."""
    calib_rows: int = 256
    """Input rows per layer that AWQ's search measures the output error on (sampled from all calibration tokens)."""
    awq_grid: int = 20
    """Steps of AWQ's search over the scale exponent in [0, 1)."""

    def __post_init__(self) -> None:
        problems = []
        if self.group_size not in W4A16_GROUP_SIZES:
            problems.append(f"group_size must be one of {', '.join(map(str, W4A16_GROUP_SIZES))} (the int4 kernels' "
                            f"group sizes), got {self.group_size}")
        if self.method not in W4A16_METHODS:
            problems.append(f"method must be one of {', '.join(W4A16_METHODS)}, got '{self.method}'")
        if self.kernel not in W4A16_KERNELS:
            problems.append(f"kernel must be one of {', '.join(W4A16_KERNELS)}, got '{self.kernel}'")
        if self.dtype not in W4A16_DTYPES:
            problems.append(f"dtype must be one of {', '.join(W4A16_DTYPES)}, got '{self.dtype}'")
        if self.calib_rows < 1 or self.awq_grid < 1 or (self.dense_rows or 0) < 0:
            problems.append("calib_rows and awq_grid must be at least 1, dense_rows at least 0")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class W16A16Config:
    """16-bit weights and activations where the machine computes them fast (the small parts of a serving mix)."""

    dtype: str = "auto"
    """'auto': bf16 where this machine has bf16 matrix instructions (AVX512-BF16, AMX) or a CUDA GPU, else the part
    stays as it is (fp32 is faster than bf16 without them: API notes, section 4); or 'bf16', 'fp16' everywhere."""

    def __post_init__(self) -> None:
        if self.dtype not in W16A16_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(W16A16_DTYPES)}, got '{self.dtype}'")
