"""The training suites (``peft``, ``peft-large``, ``memory-savers``, ``memory-savers-long``, ``fp8``): memory
and step time of training configurations, side by side.

Each configuration runs in a fresh subprocess, so that its peak memory is its own. A step is the module's
own: :class:`TrainingSteps` calls ``NvilaModule.training_step`` under the Lightning precision plugin that
``nvila fit`` would pick for the module's precision backend (``bf16-mixed``: ``torch.autocast`` to bf16),
then the module's ``backward`` hook and AdamW over the module's parameter groups.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from nvila.core.errors import NvilaError
from nvila.workflows.bench.measure import PeakMemory, cpu_memory_mb, memory_gauge, release_freed_memory, time_call
from nvila.workflows.bench.models import build_module
from nvila.workflows.bench.record import Metric, Record
from nvila.workflows.bench.runner import BenchRun

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
W4A16_LLM = {"quant": {"llm": {"name": "w4a16", "method": "rtn"}}}
"""QLoRA-style: the language model's linear layers int4 (round to nearest, groups of 128), frozen under LoRA."""
DEMO_SIZES = {"encoder_overrides": {"image_size": 64, "patch_size": 8, "hidden_size": 128, "intermediate_size": 256,
                                    "num_layers": 3, "num_heads": 4},
              "llm_overrides": {"hidden_size": 128, "intermediate_size": 384, "num_layers": 3, "num_heads": 4,
                                "num_kv_heads": 2}}
"""The demo recipe's model, for a quick run of a suite (``--only demo``)."""
QLORA_PEFT = "PEFT, bf16 mixed, frozen weights in bf16"
QLORA = "QLoRA: PEFT over a W4A16 language model, bf16 mixed"

BENCH_KEYS = ("compare_to", "vocab_size", "max_batch", "steps", "batch_size", "question_words", "answer_words")
"""Configuration keys that shape the measurement rather than the module (besides ``PART_overrides``)."""
BF16_PRECISIONS = ("bf16", "fp8")
"""Precision backends whose matmuls run in bf16 (FP8 training keeps bf16 autocast around its fp8 layers)."""

# A configuration compares against the one named by "compare_to", else against its suite's first.
TRAINING_SUITES: dict[str, dict[str, dict[str, Any]]] = {
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
    "memory-savers": {
        "standard loss": {"vocab_size": 151936},
        "chunked loss": {"vocab_size": 151936, "loss": "chunked"},
        "gradient checkpointing": {"vocab_size": 151936, "gradient_checkpointing": True},
        "chunked loss + gradient checkpointing": {"vocab_size": 151936, "loss": "chunked",
                                                  "gradient_checkpointing": True},
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
    # PEFT over a W4A16 language model against PEFT with frozen weights in bf16 (nvila.workflows.bench.quant runs
    # these, then NVILA-8B's counts): on peft-large's model, whose language model (~560M parameters) dominates
    # memory, and on the demo model for a quick check.
    "qlora": {
        f"large, {QLORA_PEFT}": {**PEFT, **BF16_FROZEN, **CHECKPOINTING, "steps": 1, "llm_overrides": LARGE_LLM,
                                 "compare_to": f"large, {QLORA_PEFT}"},
        f"large, {QLORA}": {**PEFT, **BF16, **W4A16_LLM, **CHECKPOINTING, "steps": 1, "llm_overrides": LARGE_LLM,
                            "compare_to": f"large, {QLORA_PEFT}"},
        f"demo, {QLORA_PEFT}": {**PEFT, **BF16_FROZEN, **CHECKPOINTING, **DEMO_SIZES, "steps": 1,
                                "compare_to": f"demo, {QLORA_PEFT}"},
        f"demo, {QLORA}": {**PEFT, **BF16, **W4A16_LLM, **CHECKPOINTING, **DEMO_SIZES, "steps": 1,
                           "compare_to": f"demo, {QLORA_PEFT}"},
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
}
COMPARE = ("peak memory", "throughput")
SUMMARIES = {
    "peft": "Full fine-tuning against PEFT (LoRA r=16 on the language model, LayerNorm tuning on the encoder) on a "
            "mid-size model (Qwen2 1024 wide x 12 layers, SigLIP 384 wide x 8 layers at 224 px, STC 2x2), batch 4 "
            "x ~138 tokens, AdamW; one warm-up step, then the timed steps. Each row against full fine-tuning of "
            "the same precision and checkpointing.",
    "peft-large": "The `peft` comparison with the language model 4x wider (2048 x 12 layers), one timed step.",
    "memory-savers": "The chunked loss and gradient checkpointing on the mid-size model with Qwen2's 151,936-token "
                     "vocabulary, fp32, batch 4 x ~138 tokens.",
    "memory-savers-long": "The chunked loss and gradient checkpointing on long SFT samples (4 x ~1,080 tokens, a "
                          "fifth of them answer tokens), the language model narrowed to 512 x 8 layers with Qwen2's "
                          "vocabulary, fp32, one timed step.",
    "fp8": "FP8 training (torchao) against bf16 mixed precision at NVILA-Lite-2B's shapes, 4 long SFT samples, the "
           "chunked loss; then each at the largest batch that trains (doubling until CUDA runs out of memory, "
           "then bisection).",
}
STEP_NOTE = ("Each step is `NvilaModule.training_step` under the Lightning precision plugin of the module's "
             "precision backend (as `nvila fit` runs it), the module's backward and AdamW over its parameter groups; "
             "each configuration in its own process. Step time is the median of the timed steps.")


def computes_in_bf16(settings: dict[str, Any]) -> bool:
    """Whether a configuration's matmuls run in bf16 (slow on a CPU without bf16 hardware)."""
    return (settings.get("precision") or {}).get("name") in BF16_PRECISIONS


def order_configurations(names: Sequence[str], configurations: dict[str, dict[str, Any]], slow_bf16: bool,
                         include_slow_bf16: bool) -> tuple[list[str], list[str]]:
    """(configurations to run, in order; configurations to skip). Where bf16 is slow (a CPU without bf16
    hardware) the bf16 ones run last with ``include_slow_bf16``, and are skipped without it."""
    if not slow_bf16:
        return list(names), []
    bf16 = [n for n in names if computes_in_bf16(configurations[n])]
    rest = [n for n in names if n not in bf16]
    return (rest + bf16, []) if include_slow_bf16 else (rest, bf16)


def baseline_of(suite: str, name: str, settings: dict[str, Any] | None = None) -> str | None:
    """The configuration ``name`` is compared with: its ``compare_to``, else the suite's first (None for that one)."""
    settings = TRAINING_SUITES[suite].get(name, {}) if settings is None else settings
    first = next(iter(TRAINING_SUITES[suite]))
    base = settings.get("compare_to") or first
    return None if base == name else base


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide the Trainer's INFO lines ("GPU available: ...") while it only picks a precision plugin."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def precision_plugin(flag: str, device: str) -> Any:
    """The Lightning precision plugin a ``Trainer(precision=flag)`` on ``device`` uses, taken from a Trainer
    so that the choice (``bf16-mixed`` -> ``MixedPrecision``, autocast settings included) is Lightning's own."""
    import lightning as L

    with _quiet_lightning(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=flag,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
    return trainer.precision_plugin


class TrainingSteps:
    """Steps a ``NvilaModule`` as ``nvila fit`` does, without a Trainer's loop around it: ``training_step`` in
    the precision plugin's ``train_step_context`` (autocast for ``bf16-mixed``), the module's ``backward``,
    then AdamW (with the module's weight decay) over ``module.parameter_groups()``."""

    def __init__(self, module: Any, device: str) -> None:
        self.plugin = precision_plugin(module.precision_backend.lightning_precision, device)
        self.module = self.plugin.convert_module(module.to(device))
        self.module.train()
        self.optimizer = torch.optim.AdamW(self.module.parameter_groups(),
                                           weight_decay=self.module.hparams.weight_decay)
        self.index = 0

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        batch = self.plugin.convert_input(batch)
        with warnings.catch_warnings():  # self.log() without a Trainer only warns; the loss is what we need
            warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
            with self.plugin.train_step_context():
                loss = self.module.training_step(batch, self.index)
        self.module.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.index += 1
        return loss.detach()

    def clear(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def configuration_module(settings: dict[str, Any]) -> Any:
    """A configuration's Lightning module: :data:`MID_MODEL`'s parts with the configuration's ``PART_overrides``,
    and its other keys (precision, peft, loss, gradient_checkpointing, lr_multipliers, ...) as module settings.
    Keys of :data:`BENCH_KEYS` are left out."""
    settings = {k: v for k, v in settings.items() if k not in BENCH_KEYS}
    parts = {part: {**spec, **settings.pop(f"{part}_overrides", {})} for part, spec in MID_MODEL.items()}
    return build_module({**parts, **settings})


def training_batch(model: Any, batch_size: int, question_words: int, answer_words: int) -> dict[str, Any]:
    """``batch_size`` copies of one image question with a ``question_words``-word prompt and an
    ``answer_words``-word answer (which the loss supervises)."""
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


def run_configuration(suite: str, name: str, settings: dict[str, Any] | None = None) -> Record:
    """Build one configuration's module, train a few steps in this process, measure.

    ``settings`` default to the suite's own; tests pass smaller ones. With ``max_batch: true`` (CUDA only) the
    batch size is first raised until CUDA runs out of memory, and the largest that trains is the one measured.
    """
    # imported before the baseline reading: import-time allocations are not training memory
    import lightning  # noqa: F401

    import nvila.workflows.module  # noqa: F401

    if settings is None and name not in TRAINING_SUITES.get(suite, {}):
        raise NvilaError(f"`nvila bench {suite}` has no configuration '{name}'.")
    settings = dict(TRAINING_SUITES[suite][name] if settings is None else settings)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    since = cpu_memory_mb()
    steps, batch_size = settings.get("steps", 3), settings.get("batch_size", 4)
    words = settings.get("question_words", 60), settings.get("answer_words", 8)
    if settings.get("max_batch") and device != "cuda":
        raise NvilaError(f"'{name}' searches the largest batch by running CUDA out of memory: it needs a CUDA GPU.")
    module = configuration_module(settings)
    if settings.get("vocab_size"):
        module.model.llm.resize_vocab(settings["vocab_size"])
    step = TrainingSteps(module, device)

    def make_batch(size: int) -> dict[str, Any]:
        batch = training_batch(module.model, size, *words)
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def fits(size: int) -> bool:
        try:
            for _ in range(2):  # the second step also holds the optimizer state the first one created
                step(make_batch(size))
            return True
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError, or cuBLAS failing to allocate its workspace
            if not isinstance(exc, torch.cuda.OutOfMemoryError) and "ALLOC_FAILED" not in str(exc):
                raise
            step.clear()
            return False
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    if settings.get("max_batch"):
        batch_size = largest_fitting(fits)
        if batch_size == 0:
            raise NvilaError(f"'{name}': not even a batch of one sample fits in this GPU's memory.")
    batch = make_batch(batch_size)
    tokens = int(batch["attention_mask"].sum())
    release_freed_memory()  # what model building freed must not count as training memory
    with PeakMemory(device, since=since) as peak:
        step(batch)  # warm-up: allocates gradients and optimizer state
        timing = time_call(lambda: step(batch), repeats=steps, warmup=0, device=device)
    params = list(module.model.parameters())
    seconds = timing.median
    return Record(
        suite, name,
        metrics={"trainable params": Metric(sum(p.numel() for p in params if p.requires_grad), format="millions"),
                 "total params": Metric(sum(p.numel() for p in params), format="millions"),
                 "peak memory": Metric(round(peak.peak_mb, 1), "MB", "lower", "{:,.0f}"),
                 "step": Metric(round(seconds, 3), "s", "lower", "{:.2f}"),
                 "throughput": Metric(round(tokens / seconds, 1), "tokens/s", "higher", "{:,.0f}")},
        settings={"precision": step.plugin.precision, "batch": batch_size, "tokens": tokens, "timed steps": steps},
        baseline=baseline_of(suite, name, settings))


def run_in_subprocess(suite: str, name: str, threads: int | None = None) -> Record:
    """One configuration in a fresh Python process (its peak memory its own); a failure becomes a failed record."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    done = subprocess.run([sys.executable, "-m", "nvila.workflows.bench", suite, name], capture_output=True,
                          text=True, check=False, env=env)
    if done.returncode == 0:
        return Record.from_dict(json.loads(done.stdout.strip().splitlines()[-1]))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    print(done.stderr[-3000:], file=sys.stderr, flush=True)
    return Record(suite, name, status="failed", baseline=baseline_of(suite, name),
                  notes=[lines[-1][:300] if lines else f"exit status {done.returncode}"])


def require_fp8_gpu() -> None:
    from nvila.quant.fp8 import fp8_capable_gpu

    if fp8_capable_gpu() is None:
        found = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
        raise NvilaError("nvila bench fp8 compares FP8 with bf16 training and needs an NVIDIA GPU with compute "
                         f"capability 8.9 or higher (L4, L40, H100, H200, B200); this machine has {found}.")


def run_training_suite(bench: BenchRun) -> None:
    """Every selected configuration of ``bench.suite``, each in its own process, reported as it finishes."""
    configurations = TRAINING_SUITES[bench.suite]
    names = bench.selected(list(configurations))
    to_run, to_skip = order_configurations(names, configurations, bench.slow_bf16, bench.options.include_slow_bf16)
    slow = [n for n in names if bench.slow_bf16 and computes_in_bf16(configurations[n])]
    if slow:
        action = ("they run last, as asked (--include-slow-bf16)" if bench.options.include_slow_bf16 else
                  "they are skipped; --include-slow-bf16 runs them, last")
        bench.note(f"This CPU has no bf16 hardware (no avx512_bf16 or amx_bf16 flag), so "
                   f"bf16 matmuls are emulated and far slower than fp32 (one such row ran over 8 minutes on an AVX2 "
                   f"CPU): {len(slow)} bf16 configuration(s) {action}.")
    bench.note(f"Peak memory: {memory_gauge(bench.device)}"
               + (" above the process's heap before the model was built." if bench.device == "cpu" else "."))
    bench.note(STEP_NOTE)
    for name in to_run:
        bench.add(run_in_subprocess(bench.suite, name, bench.options.threads))
    for name in to_skip:
        bench.add(Record(bench.suite, name, status="skipped", baseline=baseline_of(bench.suite, name),
                         notes=["bf16 without bf16 hardware: skipped (--include-slow-bf16 runs it)"]))
    bench.order(names)
