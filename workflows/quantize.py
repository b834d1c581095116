"""``nvila quantize``: a trained checkpoint -> a quantized checkpoint (W8A8 vision tower, W4A16 language model).

The quantized checkpoint is a checkpoint like any other: ``spec.yaml`` (whose ``quant`` names each part's
quantizer with all its settings), ``model.safetensors`` (integers and scales as plain tensors) and the
tokenizer. ``load_checkpoint``, ``nvila generate`` and ``nvila eval`` take it unchanged; nothing is unpickled.

Quantizers that calibrate (W4A16 with AWQ) see the model run on samples drawn from shards (``--calib``),
through the same decoding as training: shards and samples shuffled with a seed, one sample per forward.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nvila.core.checkpoint import load_checkpoint, save_checkpoint
from nvila.core.errors import NvilaError
from nvila.core.model import MODEL_PARTS, NvilaModel
from nvila.core.plugins import default_registry
from nvila.core.processor import collate
from nvila.core.specs import as_dict, resolve

log = logging.getLogger(__name__)


@dataclass
class PartReport:
    """One part of the model before and after quantization."""

    part: str
    bytes_before: int
    bytes_after: int
    quantizer: dict[str, Any] | None = None
    """The part's full quantizer spec, None for a part left as it was."""
    layers: int = 0
    """Layers quantized."""

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


@dataclass
class QuantizeReport:
    """What ``nvila quantize`` did."""

    source: str
    out: str
    parts: list[PartReport] = field(default_factory=list)
    calibration_samples: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        total_before = sum(p.bytes_before for p in self.parts)
        total_after = sum(p.bytes_after for p in self.parts)
        lines = [f"Quantized {self.source} -> {self.out} in {self.seconds:.1f} s"
                 + (f" ({self.calibration_samples} calibration samples)" if self.calibration_samples else ""),
                 "", "| part | quantizer | layers | weight bytes before | after | after / before |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for p in self.parts:
            name = p.quantizer["name"] if p.quantizer else "-"
            lines.append(f"| {p.part} | {name} | {p.layers} | {_mb(p.bytes_before)} | {_mb(p.bytes_after)} | "
                         f"{p.ratio:.1%} |")
        lines.append(f"| all | | {sum(p.layers for p in self.parts)} | {_mb(total_before)} | {_mb(total_after)} | "
                     f"{total_after / max(total_before, 1):.1%} |")
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def part_bytes(model: NvilaModel) -> dict[str, int]:
    """Bytes of each part's weights as its state dict holds them (a tensor shared by two parts counts once)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for part in MODEL_PARTS:
        total = 0
        for tensor in getattr(model, part).state_dict().values():
            key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
            if key in seen and key[0] != 0:
                continue
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        out[part] = total
    return out


def calibration_batches(model: NvilaModel, shards: str | Path, samples: int, seed: int = 0) -> list[dict[str, Any]]:
    """``samples`` samples drawn from the shards (shuffled with ``seed``), each as a one-sample batch."""
    from nvila.core.data.shards import find_shards, sample_stream

    stream = iter(sample_stream(find_shards(shards), model.processor, shuffle=max(4 * samples, 100), seed=seed))
    batches = []
    for encoded in stream:
        batch = collate([encoded], model.tokenizer.pad_token_id)
        batch.pop("labels", None)
        batches.append(batch)
        if len(batches) == samples:
            break
    if not batches:
        raise NvilaError(f"No usable calibration samples in '{shards}'.")
    if len(batches) < samples:
        log.warning("only %d calibration samples in %s (asked for %d)", len(batches), shards, samples)
    return batches


def calibrator(model: NvilaModel, batches: list[dict[str, Any]]) -> Any:
    """A ``Calibration`` that runs ``model`` on each batch (see ``nvila.core.interfaces.Quantizer``)."""
    def run() -> None:
        with torch.no_grad():
            for batch in batches:
                model(**batch)

    return run


DEFAULT_PROJECTOR = {"name": "w16a16"}
"""The projector's quantizer in ``nvila quantize``'s serving mix when the vision tower is quantized and the command
names none for the projector: a W8A8 tower computes in bf16 where the machine has bf16 hardware, and a W4A16 language
model takes bf16 activations, so the projector between them computes in bf16 too (``nvila.quant.w16a16``)."""


def serving_mix(quant: Mapping[str, Any]) -> dict[str, Any]:
    """The parts ``nvila quantize`` quantizes: those named (a part named ``None`` stays as trained), and the projector
    in :data:`DEFAULT_PROJECTOR` when the vision tower is quantized and the projector is not named. A checkpoint with
    only its language model in W4A16 stays one that QLoRA-style PEFT can train from (its projector trains)."""
    mix = dict(quant)
    if "projector" not in mix and mix.get("encoder") is not None:
        mix["projector"] = dict(DEFAULT_PROJECTOR)
    return {part: spec for part, spec in mix.items() if spec is not None}


def quantizers_calibrate(quant: Mapping[str, Any]) -> list[str]:
    """The parts whose quantizer calibrates (needs samples), as ``quant`` specifies them."""
    registry = default_registry()
    out = []
    for part, spec in quant.items():
        component, config = resolve("quantizer", spec, registry)
        if component.factory(config).calibrates:
            out.append(part)
    return out


def quantize_model(model: NvilaModel, quant: Mapping[str, Any], calib: str | Path | None = None,
                   samples: int = 128, seed: int = 0, device: str = "cpu") -> tuple[dict[str, list[str]], int]:
    """Quantize ``model`` in place as ``quant`` says, calibrating on shards where a quantizer needs it.

    Returns the layers quantized per part and the number of calibration samples used.
    """
    quant = {part: as_dict(spec) for part, spec in quant.items() if spec is not None}
    if not quant:
        raise NvilaError("Nothing to quantize: name at least one part (--vision w8a8, --llm w4a16).")
    registry = default_registry()
    for part, spec in quant.items():
        if part in MODEL_PARTS:
            component, config = resolve("quantizer", spec, registry)
            try:
                component.factory(config).check_available(torch.device(device))
            except NvilaError as exc:
                raise NvilaError(f"model.quant.{part}: {exc}") from None
    batches: list[dict[str, Any]] = []
    needs = quantizers_calibrate({p: s for p, s in quant.items() if p in MODEL_PARTS})
    if needs and calib is None:
        raise NvilaError(f"The quantizer of {', '.join(needs)} calibrates on samples (AWQ): give --calib SHARDS (a "
                         "directory of training or held-out shards), or choose round-to-nearest, e.g. "
                         "--llm \"{name: w4a16, method: rtn}\".")
    if needs:
        batches = calibration_batches(model, calib, samples, seed)
    done = model.quantize(quant, calibrator(model, batches) if batches else None)
    return done, len(batches)


def quantize_checkpoint(ckpt: str | Path, out: str | Path, quant: Mapping[str, Any], calib: str | Path | None = None,
                        samples: int = 128, seed: int = 0) -> QuantizeReport:
    """Load ``ckpt``, quantize it as ``quant`` says (``{part: spec}``), write the quantized checkpoint to ``out``."""
    start = time.perf_counter()
    if Path(out).resolve() == Path(ckpt).resolve():
        raise NvilaError("--out must differ from --ckpt: the full-precision checkpoint is the one to quantize again.")
    model = load_checkpoint(ckpt)
    before = part_bytes(model)
    done, used = quantize_model(model, quant, calib, samples, seed)
    after = part_bytes(model)  # measured before the layers first run, from the plain tensors the checkpoint holds
    save_checkpoint(model, out)
    parts = [PartReport(part, before[part], after[part], model.spec.quant.get(part), len(done.get(part, [])))
             for part in MODEL_PARTS if before[part] or after[part]]
    return QuantizeReport(str(ckpt), str(out), parts, used, time.perf_counter() - start)
