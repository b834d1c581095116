"""nvila's own CPU kernels: C++ sources of torch ops that ship with the package and are built where they run.

Some hot paths of CPU inference have no fast torch kernel: the int4 product of W4A16 decoding
(:mod:`nvila.quant.int4_cpu`) and single-query attention (:mod:`nvila.plugins.attention`). Their sources are
compiled with torch's C++ extension builder on the machine that runs them, the first time they are needed (seconds,
once; cached on disk under ``TORCH_EXTENSIONS_DIR``). Each library registers fake implementations of its ops, so a
compiled decoding step calls them as it calls any aten op. Where a machine cannot build or run one, callers take
their torch path instead, and a request for the kernel by name is refused with what is missing.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from nvila.core.errors import NvilaError

log = logging.getLogger(__name__)
HEADERS = Path(__file__).parent / "csrc"
"""Headers shared by the kernels' sources (``avx512_math.h``), on each build's include path."""
AVX512_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma")
"""What torch's own AVX512 capability implies (it runs AVX512 kernels only on CPUs with F, BW, VL, DQ and FMA)."""


def openmp_flags() -> list[str]:
    """Compile and link flags that make ``at::parallel_for`` in a kernel run on torch's intra-op threads.

    With torch's OpenMP backend, ``at::parallel_for`` is an OpenMP pragma compiled into the kernel itself: built
    without ``-fopenmp`` it runs on the calling thread alone, whatever ``torch.set_num_threads`` says (the int4
    kernel did, until measured: 11.7 ms for a mid-model token's products on one thread or two). Linked with it,
    the kernel shares torch's own ``libgomp.so.1`` (the loader finds that name already loaded) and its thread count.
    """
    return ["-fopenmp"] if torch.backends.openmp.is_available() else []


class NativeOps:
    """One C++ source of torch ops for x86 CPUs with AVX-512, built on first use.

    ``what`` names the kernel in messages; ``instead`` says what to use where it cannot run. ``needs_bf16`` asks
    for AVX512-BF16 as well. ``fakes`` registers the ops' fake implementations once the library is loaded.
    """

    def __init__(self, name: str, source: Path, what: str, instead: str, flags: Sequence[str] = AVX512_FLAGS,
                 needs_bf16: bool = False, fakes: Callable[[], None] | None = None) -> None:
        self.name, self.source, self.what, self.instead = name, source, what, instead
        self.flags, self.needs_bf16, self.fakes = list(flags), needs_bf16, fakes
        self._failure: str | None = None
        self._built = False

    def missing(self) -> str | None:
        """Why this machine cannot run the kernel (what it lacks); None if it can."""
        capability = torch.backends.cpu.get_cpu_capability()
        if capability != "AVX512":
            return (f"torch runs this CPU at {capability}, and the kernel needs AVX-512 (with ATEN_CPU_CAPABILITY "
                    "unset or avx512)")
        if self.needs_bf16:
            try:
                bf16 = bool(torch.cpu._is_avx512_bf16_supported())
            except (AttributeError, RuntimeError):
                bf16 = False
            if not bf16:
                return ("this CPU has no AVX512-BF16 instructions (Cooper Lake, Sapphire Rapids, Zen 4 and later have "
                        "them)")
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            return f"no C++ compiler to build it: '{compiler}' is not on PATH (install g++, or set $CXX)"
        return None

    def available(self) -> bool:
        """Whether the kernel runs here: the CPU has what it needs, and it built (building it now if needed; a failed
        build is tried once per process, and says why once)."""
        return self.missing() is None and self._build() is None

    def load(self) -> None:
        """Make the ops ready (building them if needed); NvilaError saying why they cannot run here."""
        reason = self.missing()
        if reason is not None:
            raise NvilaError(f"{self.what} cannot run: {reason}. {self.instead}")
        failure = self._build()
        if failure is not None:
            raise NvilaError(failure)

    def _build(self) -> str | None:
        """Build (once per source version, cached on disk) and register the ops; what went wrong, or None."""
        if self._built:
            return self._failure
        self._built = True
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        log.info("loading %s (the first time, building it takes several seconds)", self.what)
        try:
            threads = openmp_flags()
            cpp_extension.load(self.name, [str(self.source)], extra_cflags=[*self.flags, *threads],
                               extra_ldflags=threads, extra_include_paths=[str(HEADERS)], is_python_module=False,
                               verbose=False)
        except (RuntimeError, OSError, ImportError) as error:
            lines = str(error).splitlines()
            said = "\n".join([line for line in lines if "error" in line.lower()][:5] or lines[-5:])
            self._failure = f"building {self.what} from {self.source} failed. {self.instead} The compiler said:\n{said}"
            log.warning("%s", self._failure)
            return self._failure
        if self.fakes is not None:
            self.fakes()
        return None


def _put_ninja_on_path() -> None:
    """torch's builder runs ``ninja``; the pip package puts it beside the interpreter, which is not always on PATH."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
