"""``nvila bench``: training memory and speed, measured side by side in one run.

Each configuration runs in a fresh subprocess, so peak memory is its own. On a GPU the figure is
``torch.cuda.max_memory_allocated``. On a CPU it is the CPU's counterpart: the peak of the heap bytes in use
(glibc's ``mallinfo2``, sampled every few milliseconds during the training steps) above the process's
heap before the model was built, so it counts weights, gradients, optimizer state and activations.
Resident memory would also count freed blocks that glibc keeps for reuse (up to 0.5 GB of the last
step's activations here), and forcing glibc to return them (a fixed mmap threshold) slows every step by
page faults; so resident memory is only the fallback where glibc is not the allocator.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from nvila.core.errors import NvilaError

# A mid-size model: Qwen2 at 1024 wide x 12 layers (~150M parameters with the small vocabulary),
# SigLIP at 384 wide x 8 layers on 224 px tiles; large enough that weights and optimizer state dominate.
MID_MODEL = {
    "encoder": {"name": "siglip", "image_size": 224, "patch_size": 16, "hidden_size": 384,
                "intermediate_size": 1536, "num_layers": 8, "num_heads": 6, "feature_layer": -1},
    "compressor": {"name": "stc", "ratio": 2},
    "projector": {"name": "mlp"},
    "llm": {"name": "qwen2", "hidden_size": 1024, "intermediate_size": 2816, "num_layers": 12,
            "num_heads": 16, "num_kv_heads": 4},
}


LARGE_LLM = {"hidden_size": 2048, "intermediate_size": 5632, "num_layers": 12, "num_heads": 16, "num_kv_heads": 4}


@dataclass
class Result:
    name: str
    trainable_params: int
    total_params: int
    peak_memory_mb: float
    step_seconds: float
    tokens_per_second: float
    batch_size: int = 4


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _glibc_mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        function = ctypes.CDLL("libc.so.6").mallinfo2  # glibc 2.33 and later
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


_MALLINFO2 = _glibc_mallinfo2()
MEMORY_GAUGE = "heap in use (glibc mallinfo2)" if _MALLINFO2 else "resident memory"


def _memory_mb() -> float:
    """Heap bytes in use (allocated and not yet freed) by this process; resident memory without glibc."""
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return (info.uordblks + info.hblkhd) / 2**20  # in the heaps' chunks + in mmapped chunks
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _release_freed_memory() -> None:
    """Hand memory freed so far back to the OS (for the resident-memory fallback, which counts it)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: resident memory may then overstate the peak a little
        pass


class PeakSampler:
    """Samples :func:`_memory_mb` on a background thread; ``peak`` is the largest value seen."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, _memory_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _memory_mb())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _memory_mb())


def _batch(model: Any, batch_size: int, question_words: int, answer_words: int) -> dict[str, Any]:
    from PIL import Image

    from nvila.core.processor import collate

    question = " ".join(["what color is the shape"] * (question_words // 5))
    samples = [model.processor.encode([{"from": "human", "value": f"<image>\n{question}"},
                                       {"from": "gpt", "value": "red " * answer_words}], [Image.new("RGB", (224, 224))])
               for _ in range(batch_size)]
    return collate(samples, model.tokenizer.pad_token_id)


def largest_fitting(fits: Callable[[int], bool], limit: int = 4096) -> int:
    """The largest batch size up to ``limit`` for which ``fits`` holds (0 if none), assuming that a batch
    that fits means every smaller one fits too: doubling from 1, then bisection."""
    low, high = 0, 1
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)  # low fits; high does not (or lies past the limit)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def run_one(name: str, settings: dict[str, Any]) -> Result:
    """Build a model with ``settings`` (NvilaModule arguments), train a few steps, measure.

    With ``max_batch: true`` (CUDA only) the batch size is first raised until CUDA runs out of memory,
    and the largest that trains is the one measured.
    """
    from nvila.workflows.module import build_module
    from nvila.workflows.objectives import OBJECTIVES

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    baseline = _memory_mb()
    settings.pop("compare_to", None)
    vocab, search = settings.pop("vocab_size", None), settings.pop("max_batch", False)
    steps, batch_size = settings.pop("steps", 3), settings.pop("batch_size", 4)
    question_words, answer_words = settings.pop("question_words", 60), settings.pop("answer_words", 8)
    parts = {part: {**spec, **settings.pop(f"{part}_overrides", {})} for part, spec in MID_MODEL.items()}
    if search and device != "cuda":
        raise NvilaError(f"'{name}' searches the largest batch by running CUDA out of memory: it needs a CUDA GPU.")
    module = build_module(**parts, **settings)
    if vocab:
        module.model.llm.resize_vocab(vocab)
    module.to(device)
    optimizer = torch.optim.AdamW(module.parameter_groups())
    module.train()
    autocast = module.precision_backend.lightning_precision == "bf16-mixed"  # what Lightning's plugin does

    def make_batch(size: int) -> dict[str, Any]:
        batch = _batch(module.model, size, question_words, answer_words)
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def step(batch: dict[str, Any]) -> None:
        with torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = OBJECTIVES[module.settings.loss](module.model, batch, module.settings.loss_chunk_size)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def fits(size: int) -> bool:
        try:
            for _ in range(2):  # the second step also holds the optimizer state the first one created
                step(make_batch(size))
            return True
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError, or cuBLAS failing to allocate its workspace
            if not isinstance(exc, torch.cuda.OutOfMemoryError) and "ALLOC_FAILED" not in str(exc):
                raise
            optimizer.zero_grad(set_to_none=True)
            return False
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    if search:
        batch_size = largest_fitting(fits)
        if batch_size == 0:
            raise NvilaError(f"'{name}': not even a batch of one sample fits in this GPU's memory.")
    batch = make_batch(batch_size)
    tokens = int(batch["attention_mask"].sum())
    _release_freed_memory()  # what model building freed must not count as training memory
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakSampler() as sampler:
        step(batch)  # warm-up: allocates gradients and optimizer state
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(batch)
        _synchronize(device)
        seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else sampler.peak - baseline
    params = list(module.model.parameters())
    return Result(name, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params),
                  round(peak, 1), round(seconds, 3), round(tokens / seconds, 1), batch_size)


def _synchronize(device: str) -> None:
    """Wait for queued GPU work, so that wall-clock time covers it."""
    if device == "cuda":
        torch.cuda.synchronize()


PEFT = {"peft": {"lora": {"r": 16}, "vision": "layernorm"}, "lr_multipliers": {"encoder": 0.1}}
"""NVILA's PEFT: LoRA on the language model, LayerNorm tuning on the encoder at a 10x lower learning rate."""
BF16 = {"precision": {"name": "bf16"}}
BF16_FROZEN = {"precision": {"name": "bf16", "frozen_in_bf16": True}}
CHECKPOINTING = {"gradient_checkpointing": True}
LONG_SFT = {"vocab_size": 151936, "question_words": 800, "answer_words": 200, "steps": 1,
            "lr_multipliers": {"encoder": 0.1},  # the SFT stage's settings
            "llm_overrides": {"hidden_size": 512, "intermediate_size": 1408, "num_layers": 8, "num_heads": 8,
                              "num_kv_heads": 2}}

# On a GPU: NVILA-Lite-2B's shapes (SigLIP so400m on 448 px tiles, a Qwen2-1.5B language model), long SFT
# samples, the chunked loss: the sizes at which FP8's faster matmuls and smaller saved inputs show.
GPU_SFT = {"encoder_overrides": {"image_size": 448, "patch_size": 14, "hidden_size": 1152, "intermediate_size": 4304,
                                 "num_layers": 27, "num_heads": 16, "feature_layer": -2},
           "llm_overrides": {"hidden_size": 1536, "intermediate_size": 8960, "num_layers": 28, "num_heads": 12,
                             "num_kv_heads": 2},
           "vocab_size": 151936, "question_words": 800, "answer_words": 200, "loss": "chunked", "steps": 5}
FP8 = {"precision": {"name": "fp8"}}
GPU_SUITES = {"fp8"}
"""Suites that need an NVIDIA GPU with compute capability 8.9 or higher."""

# A configuration compares against the one named by "compare_to", else against its suite's first.
SUITES: dict[str, dict[str, dict[str, Any]]] = {
    # Gradient checkpointing on both sides first (how NVILA fine-tunes: activations stay small beside
    # weights and optimizer state); in fp32, then in bf16 mixed precision, where PEFT also stores its frozen
    # weights in bf16 (as NVILA does to fit 8B in 24 GB); then both without checkpointing.
    "peft": {
        "full fine-tuning": {**CHECKPOINTING},
        "PEFT (LoRA r=16 + LayerNorm tuning)": {**PEFT, **CHECKPOINTING},
        "full fine-tuning, bf16 mixed": {**BF16, **CHECKPOINTING},
        "PEFT, bf16 mixed, frozen weights in bf16": {**PEFT, **BF16_FROZEN, **CHECKPOINTING,
                                                     "compare_to": "full fine-tuning, bf16 mixed"},
        "the same without LoRA dropout": {**PEFT, "peft": {"lora": {"r": 16, "dropout": 0.0}, "vision": "layernorm"},
                                          **BF16_FROZEN, **CHECKPOINTING, "compare_to": "full fine-tuning, bf16 mixed"},
        "full fine-tuning, no checkpointing": {},
        "PEFT, no checkpointing": {**PEFT, "compare_to": "full fine-tuning, no checkpointing"},
    },
    # The same comparison with a 4x wider language model (~560M parameters): weights and optimizer state
    # dominate more, as they do at NVILA-8B scale.
    "peft-large": {
        "full fine-tuning": {**CHECKPOINTING, "steps": 1, "llm_overrides": LARGE_LLM},
        "PEFT (LoRA r=16 + LayerNorm tuning)": {**PEFT, **CHECKPOINTING, "steps": 1, "llm_overrides": LARGE_LLM},
        "full fine-tuning, bf16 mixed": {**BF16, **CHECKPOINTING, "steps": 1, "llm_overrides": LARGE_LLM},
        "PEFT, bf16 mixed, frozen weights in bf16": {**PEFT, **BF16_FROZEN, **CHECKPOINTING, "steps": 1,
                                                     "llm_overrides": LARGE_LLM,
                                                     "compare_to": "full fine-tuning, bf16 mixed"},
    },
    # SFT with long samples (4 x ~1,000 tokens, a fifth of them answer tokens, which the loss supervises) on a
    # narrower language model (512 x 8 layers) with Qwen2's vocabulary: the logits (B, L, 152k) and layer
    # activations now outweigh weights and optimizer state.
    "memory-savers-long": {
        "standard loss": {**LONG_SFT},
        "chunked loss": {**LONG_SFT, "loss": "chunked"},
        "gradient checkpointing": {**LONG_SFT, **CHECKPOINTING},
        "chunked loss + gradient checkpointing": {**LONG_SFT, **CHECKPOINTING, "loss": "chunked"},
    },
    # FP8 training against bf16 (the paper: about 2x faster, batch 4 -> 16): at one batch size, then at the
    # largest batch each trains without running out of GPU memory.
    "fp8": {
        "bf16 mixed": {**GPU_SFT, **BF16},
        "fp8 (tensorwise scaling)": {**GPU_SFT, **FP8, "compare_to": "bf16 mixed"},
        "fp8 (rowwise scaling)": {**GPU_SFT, "precision": {"name": "fp8", "recipe": "rowwise"},
                                  "compare_to": "bf16 mixed"},
        "bf16 mixed, largest batch": {**GPU_SFT, **BF16, "max_batch": True},
        "fp8 (tensorwise), largest batch": {**GPU_SFT, **FP8, "max_batch": True,
                                            "compare_to": "bf16 mixed, largest batch"},
    },
    "memory-savers": {
        "standard loss": {"vocab_size": 151936},
        "chunked loss": {"vocab_size": 151936, "loss": "chunked"},
        "gradient checkpointing": {"vocab_size": 151936, "gradient_checkpointing": True},
        "chunked loss + gradient checkpointing": {"vocab_size": 151936, "loss": "chunked",
                                                  "gradient_checkpointing": True},
    },
}


def run_suite(suite: str) -> list[Result]:
    """Every configuration of a suite, each in its own process."""
    from nvila.quant.fp8 import fp8_capable_gpu

    if suite in GPU_SUITES and fp8_capable_gpu() is None:
        found = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
        raise NvilaError(f"nvila bench {suite} compares FP8 with bf16 training and needs an NVIDIA GPU with compute "
                         f"capability 8.9 or higher (L4, L40, H100, H200, B200); this machine has {found}.")
    results = []
    for name in SUITES[suite]:
        out = subprocess.run([sys.executable, "-m", "nvila.workflows.bench", suite, name], capture_output=True,
                             text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"benchmark '{name}' failed:\n{out.stderr[-2000:]}")
        results.append(Result(**json.loads(out.stdout.strip().splitlines()[-1])))
    return results


def markdown(suite: str, results: list[Result]) -> str:
    """A Markdown table; each configuration's memory and speed as ratios against its baseline."""
    by_name = {r.name: r for r in results}
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    gauge = "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else MEMORY_GAUGE
    lines = [f"`nvila bench {suite}` on {machine}, torch {torch.__version__}; peak memory: {gauge}", "",
             "| configuration | trainable params | batch | peak memory (MB) | step (s) | tokens/s | against | memory "
             "| speed |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        base = by_name[SUITES[suite][r.name].get("compare_to", results[0].name)]
        against = "" if base is r else f"{base.name} | {base.peak_memory_mb / r.peak_memory_mb:.2f}x less | " \
            f"{base.step_seconds / r.step_seconds:.2f}x"
        lines.append(f"| {r.name} | {r.trainable_params / 1e6:.1f}M of {r.total_params / 1e6:.1f}M | {r.batch_size} | "
                     f"{r.peak_memory_mb:.0f} | {r.step_seconds:.2f} | {r.tokens_per_second:.0f} | "
                     f"{against or ' | | '} |")
    return "\n".join(lines)


if __name__ == "__main__":  # one configuration, in its own process
    suite_name, config_name = sys.argv[1], sys.argv[2]
    print(json.dumps(asdict(run_one(config_name, dict(SUITES[suite_name][config_name])))))
