"""Compiled decoding: the language model's one-token step through ``torch.compile``.

A decoding step runs every layer of the language model on one token per sequence. On a CPU its matmuls are
small (and with W4A16 weights, fast), so much of a step is Python and many small kernel launches: norms,
rotary embeddings, residual adds, the KV-cache update. Compiling the step fuses those ops and drops the Python;
on the mid-size model of ``nvila bench quant-decode`` (a Qwen2-0.5B shape) it cut a W4A16 step from 36 to 28 ms
on one core (docs/benchmarks.md). The first steps pay the compilation: tens of seconds, once per model and
batch shape (batch 1 and larger batches compile apart; the cache length is dynamic).

Guards on the model's modules are skipped (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``): checking
them costs ~2.5 ms a step on a 24-layer model. The compiled step is therefore only correct while the model does
not change under it, which holds for an engine: nothing quantizes, unpacks or swaps layers while it decodes.
Without those guards nothing would tell two models of one class apart, so each compiled step gets a code object,
and with it a compiled-code cache, of its own (:func:`compile_step`).

What is left of the per-step cost outside the kernels is kept small the same way:
- float attributes (norm epsilons, attention scales) are constants (``specialize_float``), not inputs to turn into
  tensors and guard at every call;
- quantized layers mark their packed weights static (``nvila.quant.packed_linear``), or each of their sizes would
  be a symbol with a Python guard: 1,052 guards for the mid model;
- the compiled code does not re-check the sizes and alignment of every kernel's inputs and outputs
  (``size_asserts``, ``alignment_asserts``), which fake implementations and tests already pin down.
Together with nvila's decoding-attention kernel these took the mid model's W4A16 step from about 20 to 18.5 ms.

Prefill is not compiled: its shapes vary with every prompt, and it is dominated by large matmuls already.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from typing import Any

import torch

from nvila.core.errors import NvilaError

CPU_COMPILERS = ("g++", "c++", "clang++")
"""C++ compilers torch.compile's CPU backend (inductor) can build its kernels with; ``$CXX`` is looked at first."""


def check_compilable(device: torch.device) -> None:
    """NvilaError naming what is missing when ``torch.compile`` cannot build kernels for ``device``."""
    if device.type == "cpu":
        wanted = [os.environ["CXX"]] if os.environ.get("CXX") else list(CPU_COMPILERS)
        if not any(shutil.which(name) for name in wanted):
            raise NvilaError(f"compiled decoding on a CPU needs a C++ compiler for torch.compile's kernels, and none "
                             f"of {', '.join(wanted)} is on PATH. Install one (e.g. `apt install g++`) or decode "
                             "without compiling (drop --compile).")
    elif device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise NvilaError("compiled decoding on a CUDA GPU needs Triton (`pip install triton`, bundled with "
                             "PyTorch's CUDA wheels); or decode without compiling (drop --compile).")
    else:
        raise NvilaError(f"compiled decoding runs on CPUs and CUDA GPUs, not on {device.type}; drop --compile.")


def compile_step(language_model: Any, device: torch.device) -> Callable[..., Any]:
    """``language_model.forward_with_cache`` compiled for decoding (one new token per sequence, a growing cache).

    The step is captured whole (``fullgraph``) in a function of its own: dynamo keeps compiled code per Python
    code object, and with the submodule guards skipped, two models sharing one (the same language-model class)
    could run each other's compiled step. A step that cannot be captured whole is refused, by name.
    """
    check_compilable(device)

    def step(*args: Any, **kwargs: Any) -> Any:
        return language_model.forward_with_cache(*args, **kwargs)

    step.__code__ = step.__code__.replace()  # a code object, and so a compiled-code cache, of this model's own
    compiled = torch.compile(step, dynamic=True, fullgraph=True,
                             options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                      "size_asserts": False, "alignment_asserts": False})

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            # both read when it compiles, at the first steps; no duck sizing: a cache's length or room that happens
            # to equal another size (a width) would be taken as equal to it, and the step compiled again once not
            with torch._dynamo.config.patch(specialize_float=True), \
                    torch.fx.experimental._config.patch(use_duck_shape=False):
                return compiled(*args, **kwargs)
        except torch._dynamo.exc.Unsupported as exc:
            name = type(language_model).__name__
            raise NvilaError(f"{name}'s decoding step cannot be compiled as one graph ({str(exc).splitlines()[0]}); "
                             "decode without compiling (drop --compile).") from exc

    return run
