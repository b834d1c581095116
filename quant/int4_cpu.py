"""nvila's own W4A16 kernels for x86 CPUs with AVX512-BF16 (``csrc/int4_cpu.cpp``), built on first use.

Decoding reads every weight once per token. torch's CPU int4 kernel turns each nibble into fp32 and multiplies
in fp32, which leaves it compute-bound well below a core's memory bandwidth (9.6 GB/s of cold int4 weights on a
Zen 4 core that copies at 24.9); this one turns 32 nibbles into bf16 with one table lookup, multiplies them with
one bf16 dot-product instruction and prefetches ahead (15.5 GB/s; 1.4x torch's decoding, ``nvila bench
quant-decode``). It reads the checkpoint's own layout, so loading repacks nothing, and its dequantization (for
prefill-sized calls) is a plain pass over the bytes, about 13x faster than reading torch's packing back.

The two ops, ``torch.ops.nvila_int4.matmul(x, qweight, scales, zeros)`` and ``...dequantize(qweight, scales,
zeros)``, are compiled with torch's C++ extension builder (a C++ compiler and ninja; about 8 s once, then
cached under ``TORCH_EXTENSIONS_DIR``) and registered with fake tensors, so a compiled decoding step calls
them as it calls any aten op.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from pathlib import Path

import torch

from nvila.core.errors import NvilaError

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "int4_cpu.cpp"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]
NAME = "nvila_int4_cpu"


def missing() -> str | None:
    """Why this machine cannot run the kernels (what it lacks, and what runs instead); None if it can."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return (f"torch runs this CPU at {torch.backends.cpu.get_cpu_capability()}, and the kernels need AVX-512 "
                "(with ATEN_CPU_CAPABILITY unset or avx512)")
    try:
        bf16 = bool(torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    if not bf16:
        return "this CPU has no AVX512-BF16 instructions (Cooper Lake, Sapphire Rapids, Zen 4 and later have them)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler to build them: '{compiler}' is not on PATH (install g++, or set $CXX)"
    return None


def available() -> bool:
    """Whether the kernels run here: the CPU has them, and they built (building them now if needed; a failed build
    is tried once per process, and says why once)."""
    return missing() is None and _build() is None


def load() -> None:
    """Make the ops ready (building them if needed); NvilaError saying why they cannot run here."""
    reason = missing()
    if reason is not None:
        raise NvilaError(f"nvila's AVX512-BF16 int4 kernel cannot run: {reason}. Use W4A16's kernel 'cpu' "
                         "(torch's int4 kernel, any CPU) or 'auto'.")
    failure = _build()
    if failure is not None:
        raise NvilaError(failure)


@functools.cache
def _build() -> str | None:
    """Build (once per source version, cached on disk) and register the ops; what went wrong, or None."""
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    log.info("loading nvila's AVX512-BF16 int4 kernel (the first time, building it takes about 8 s)")
    try:
        cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=FLAGS, is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError) as error:
        lines = str(error).splitlines()
        said = "\n".join([line for line in lines if "error" in line.lower()][:5] or lines[-5:])
        failure = (f"building nvila's AVX512-BF16 int4 kernel from {SOURCE} failed; use W4A16's kernel 'cpu' "
                   f"(torch's int4 kernel). The compiler said:\n{said}")
        log.warning("%s\n'auto' uses torch's CPU int4 kernel instead", failure)
        return failure
    _register_fakes()
    return None


def _put_ninja_on_path() -> None:
    """torch's builder runs ``ninja``; the pip package puts it beside the interpreter, which is not always on PATH."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def _register_fakes() -> None:
    """Shapes without running the kernels, for torch.compile's tracing."""
    @torch.library.register_fake("nvila_int4::matmul")
    def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("nvila_int4::dequantize")
    def _(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        return scales.new_empty(qweight.shape[0], qweight.shape[1] * 2)


def matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``x`` (M, K) bf16 times the int4 weight (``qweight`` (N, K/2) uint8 in the checkpoint's layout, ``scales`` and
    ``zeros`` (N, K/group) bf16, group a multiple of 64): (M, N) bf16, accumulated in fp32."""
    return torch.ops.nvila_int4.matmul(x, qweight, scales, zeros)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The int4 weight as a dense (N, K) bf16 matrix, each value computed in fp32 and rounded once."""
    return torch.ops.nvila_int4.dequantize(qweight, scales, zeros)
