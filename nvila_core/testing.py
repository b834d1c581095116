"""The public test kit: the checks nvila runs on every registered component, for plugin authors too.

In a plugin package's own test suite::

    from nvila.core.testing import check_distribution

    def test_my_plugin_meets_the_contract():
        assert check_distribution("my-nvila-plugin") == ["compressor:my-pool"]

Each component is built from its config defaults, run forward on tiny CPU inputs, checked against
its kind's shape contract and token accounting, and its config and state dict are round-tripped
(the latter through safetensors). Pruners score a tiny batch with tiny models: one float per sample,
finite, deterministic, and the same whatever the batch mates. A failure raises :class:`ContractError`
naming the check, the component and its distribution, for example::

    compressor 'bad-shape' from badplug 0.2 failed the 'token accounting' check: on blocks (2, 6, 6, 8)
    forward gave (2, 35, 8) but output_shape promised (2, 36, 8)

nvila's own ``tests/test_contract.py`` runs :func:`check_component` on every built-in component.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_model, save_model
from torch import nn

from nvila.core.interfaces import (
    TEMPORAL_STAGES,
    Compressor,
    LanguageModel,
    PrecisionBackend,
    PreparedImage,
    Quantizer,
    TemporalCompressor,
    VisionEncoder,
)
from nvila.core.model import ModelSpec
from nvila.core.registry import Component, Registry
from nvila.core.specs import resolve, to_spec

CHECKS: dict[str, str] = {
    "config defaults": "the config dataclass builds with no arguments (every field has a default)",
    "config round-trip": "to_spec -> resolve gives back an equal config",
    "build from defaults": "the factory builds the component from the default config",
    "interface": "the component subclasses its kind's interface in nvila.core.interfaces",
    "forward on tiny CPU inputs": "forward runs on a small CPU input without raising",
    "shape contract": "outputs have the layout the kind's interface states",
    "token accounting": "sizes announced before the run (output_shape, output_frames, processor().plan) match "
                        "the real ones",
    "blocks compressed alone": "a compressor's tokens for one block do not depend on the other blocks in the batch",
    "state-dict round-trip": "weights saved with safetensors load back into the module unchanged",
    "pruner scores": "one finite score per sample, deterministic, independent of the other samples in the batch",
    "kv cache": "a language model's forward_with_cache, prompt then one token at a time, gives the logits of a "
                "full forward, with left padding",
    "quantized output": "a quantizer, given a small MLP and calibration inputs, quantizes some of its layers, and "
                        "its outputs stay within 25% (relative) of full precision",
    "plain state dict": "a quantized part's state dict holds plain tensors only (no subclasses, no quantized "
                        "dtypes), before and after it runs, unchanged by running",
    "quantized round-trip": "a quantized part saved with safetensors loads into a fresh part quantized without "
                            "calibration, and gives the same outputs",
}
"""Every check the kit runs, by the name a failure reports."""


class ContractError(AssertionError):
    """A component that breaks its kind's contract; the message names the check, component and distribution."""

    def __init__(self, message: str, component: Component | None = None, check: str | None = None) -> None:
        self.component, self.check = component, check
        if component is not None:
            message = f"{component.origin} failed the '{check}' check: {message}"
        super().__init__(message)


def _expect(condition: bool, component: Component, check: str, message: str) -> None:
    if not condition:
        raise ContractError(message, component, check)


@contextmanager
def _check(component: Component, check: str) -> Iterator[None]:
    """Anything the component raises inside becomes a ContractError naming ``check``; the cause is chained."""
    try:
        yield
    except ContractError:
        raise
    except Exception as exc:
        raise ContractError(f"{type(exc).__name__}: {exc}", component, check) from exc


def check_config_round_trip(component: Component, registry: Registry) -> object:
    """Defaults build, and ``to_spec`` -> ``resolve`` gives back an equal config."""
    with _check(component, "config defaults"):
        config = component.config()
    with _check(component, "config round-trip"):
        _, again = resolve(component.kind, to_spec(component, config), registry)
    _expect(again == config, component, "config round-trip", f"{config!r} came back as {again!r}")
    return config


def check_state_dict_round_trip(component: Component, module: nn.Module) -> None:
    """Weights saved with safetensors load back into a fresh build unchanged."""
    with _check(component, "state-dict round-trip"), tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "weights.safetensors")
        save_model(module, path)
        reference = {k: v.clone() for k, v in module.state_dict().items()}
        for p in module.parameters():
            p.data.zero_()
        load_model(module, path, strict=True)
        for key, value in module.state_dict().items():
            _expect(torch.equal(value, reference[key]), component, "state-dict round-trip",
                    f"entry {key} changed")


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_encoder(component: Component, config: object) -> nn.Module:
    with _check(component, "build from defaults"):
        encoder = component.factory(config)
    _expect(isinstance(encoder, VisionEncoder), component, "interface", "an encoder must subclass VisionEncoder")
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("L", (17, 53), 128)]
    with _check(component, "forward on tiny CPU inputs"):
        prepared = [encoder.processor()(image) for image in images]
    for image, p in zip(images, prepared):
        _expect(isinstance(p, PreparedImage) and p.pixels.ndim == 4 and p.pixels.shape[1] == 3, component,
                "shape contract", "processor() must return PreparedImage with (T, 3, S, S) pixels")
        with _check(component, "token accounting"):
            plan = encoder.processor().plan(*image.size)
        _expect((plan.tiles, plan.grid) == (p.pixels.shape[0], p.grid), component, "token accounting",
                f"processor().plan{image.size} says {plan} but preprocessing gave {p.pixels.shape[0]} tiles, "
                f"grid {p.grid}")
    with _check(component, "forward on tiny CPU inputs"), torch.no_grad():
        blocks = encoder(torch.cat([p.pixels for p in prepared]), [p.grid for p in prepared])
    expected = (sum(p.num_blocks for p in prepared), *encoder.block_size, encoder.out_channels)
    _expect(_shape(blocks) == expected, component, "shape contract",
            f"forward returned {_shape(blocks)}, the contract says {expected} (blocks, h, w, C)")
    return encoder


COMPRESSOR_GRIDS = ((6, 6), (5, 7), (7, 4), (9, 9), (4, 11))
"""Feature grids the kit checks compressors on: square, odd and non-square sides."""


def _check_compressor(component: Component, config: object) -> nn.Module:
    channels = 8
    with _check(component, "build from defaults"):
        compressor = component.factory(config, in_channels=channels)
    _expect(isinstance(compressor, Compressor), component, "interface", "a compressor must subclass Compressor")
    compressor.eval()
    for h, w in COMPRESSOR_GRIDS:
        blocks = torch.randn(2, h, w, channels)  # (M, h, w, C)
        with _check(component, "forward on tiny CPU inputs"), torch.no_grad():
            tokens = compressor(blocks)
            first = compressor(blocks[:1])
        _expect(isinstance(tokens, torch.Tensor) and tokens.ndim == 3 and tokens.shape[0] == 2, component,
                "shape contract", f"on blocks {tuple(blocks.shape)} forward gave {_shape(tokens)}; a compressor "
                "returns tokens (M, n, C') for M blocks")
        with _check(component, "token accounting"):
            n, c = compressor.output_shape((h, w), channels)
        _expect(tuple(tokens.shape) == (2, n, c), component, "token accounting",
                f"on blocks {tuple(blocks.shape)} forward gave {tuple(tokens.shape)} but output_shape "
                f"promised {(2, n, c)}")
        _expect(_shape(first) == (1, n, c) and torch.allclose(first, tokens[:1], atol=1e-5), component,
                "blocks compressed alone", "a block's tokens depend on the other blocks in the batch")
    return compressor


def _check_temporal(component: Component, config: object) -> nn.Module:
    with _check(component, "build from defaults"):
        temporal = component.factory(config)
    _expect(isinstance(temporal, TemporalCompressor), component, "interface",
            "a temporal compressor must subclass TemporalCompressor")
    _expect(temporal.where in TEMPORAL_STAGES, component, "interface",
            f"where = {temporal.where!r}, not one of {', '.join(TEMPORAL_STAGES)}")
    for frames in (1, 3, 8, 9, 17):
        video = torch.randn(frames, 2, 3, 4)  # (F, *rest)
        with _check(component, "forward on tiny CPU inputs"), torch.no_grad():
            out = temporal(video)
        with _check(component, "token accounting"):
            expected = (temporal.output_frames(frames), 2, 3, 4)
        _expect(_shape(out) == expected, component, "token accounting",
                f"on {frames} frames forward gave {_shape(out)} but output_frames promised {expected}")
    return temporal


def _check_projector(component: Component, config: object) -> nn.Module:
    with _check(component, "build from defaults"):
        projector = component.factory(config, in_dim=12, out_dim=16)
    with _check(component, "forward on tiny CPU inputs"), torch.no_grad():
        out = projector(torch.randn(2, 3, 12))
    _expect(_shape(out) == (2, 3, 16), component, "shape contract",
            f"mapped (2, 3, 12) to {_shape(out)}, not (2, 3, 16)")
    return projector


def _check_llm(component: Component, config: object) -> nn.Module:
    with _check(component, "build from defaults"):
        llm = component.factory(config)
    _expect(isinstance(llm, LanguageModel), component, "interface", "an llm must subclass LanguageModel")
    with _check(component, "build from defaults"):
        tokenizer = llm.load_tokenizer()
    _expect(getattr(tokenizer, "chat_template", None) is not None, component, "build from defaults",
            "its tokenizer has no chat template")
    with _check(component, "forward on tiny CPU inputs"), torch.no_grad():
        ids = torch.tensor([tokenizer("a b c", add_special_tokens=False).input_ids])
        embeds = llm.embed(ids)
        logits = llm(embeds, attention_mask=torch.ones_like(ids))
    _expect(_shape(embeds) == (*ids.shape, llm.hidden_size), component, "shape contract",
            f"embed() gave {_shape(embeds)} for ids {tuple(ids.shape)}, not {(*ids.shape, llm.hidden_size)}")
    _expect(_shape(logits)[:2] == tuple(ids.shape), component, "shape contract",
            f"logits shape {_shape(logits)} for ids {tuple(ids.shape)}")
    with _check(component, "forward on tiny CPU inputs"), torch.no_grad():
        hidden = llm.hidden_states(embeds, attention_mask=torch.ones_like(ids))
        head = llm.output_layer()
    _expect(_shape(hidden) == (*ids.shape, llm.hidden_size), component, "shape contract",
            f"hidden_states() gave {_shape(hidden)} for ids {tuple(ids.shape)}, not {(*ids.shape, llm.hidden_size)}")
    _expect(isinstance(head, nn.Linear) and head.in_features == llm.hidden_size, component, "interface",
            f"output_layer() must be an nn.Linear from hidden_size {llm.hidden_size}, got {head!r}")
    _check_kv_cache(component, llm, tokenizer)
    return llm


def _check_kv_cache(component: Component, llm: LanguageModel, tokenizer: object) -> None:
    """Prefill 3 tokens, then feed 2 more one at a time: each step's logits equal a full forward's, and a
    left-padded row (one token shorter) gets the logits it gets alone."""
    ids = torch.tensor(tokenizer("a b c d e f", add_special_tokens=False).input_ids).repeat(5)[:5]  # (5,)
    batch = torch.stack([ids, torch.cat([ids[:1], ids[:1], ids[2:]])])  # (2, 5): row 1 is 4 other tokens ...
    mask = torch.ones_like(batch)
    mask[1, 0] = 0  # ... after one padding token
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (2, 5)
    llm.eval()
    with _check(component, "kv cache"), torch.no_grad():
        embeds = llm.embed(batch)  # (2, 5, D)
        full = llm(embeds, attention_mask=mask, position_ids=positions)  # (2, 5, V)
        alone = llm(embeds[1:, 1:], attention_mask=mask[1:, 1:])  # (1, 4, V)
        logits, cache = llm.forward_with_cache(embeds[:, :3], mask[:, :3], positions[:, :3])
        steps = [logits[:, -1]]
        for t in (3, 4):
            logits, cache = llm.forward_with_cache(embeds[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1], cache)
            steps.append(logits[:, -1])
    cached = torch.stack(steps, dim=1)  # (2, 3, V)
    _expect(_shape(cached) == (2, 3, full.shape[-1]), component, "kv cache",
            f"forward_with_cache gave logits {_shape(logits)} per step; the contract says (B, 1, V)")
    _expect(torch.allclose(cached, full[:, 2:], atol=1e-4, rtol=1e-4), component, "kv cache",
            "logits with the cache differ from a full forward's by "
            f"{(cached - full[:, 2:]).abs().max().item():.2e}")
    _expect(torch.allclose(full[1, 1:], alone[0], atol=1e-4, rtol=1e-4), component, "kv cache",
            "a left-padded row's logits differ from the same tokens alone: padding is attended to, or the "
            "position ids are ignored")


def _check_precision(component: Component, config: object) -> None:
    with _check(component, "build from defaults"):
        backend = component.factory(config)
    _expect(isinstance(backend, PrecisionBackend), component, "interface", "must subclass PrecisionBackend")
    _expect(isinstance(backend.lightning_precision, str), component, "interface",
            "lightning_precision must be a string")


def _check_quantizer(component: Component, config: object) -> None:
    import copy

    from nvila.core.errors import NvilaError

    with _check(component, "build from defaults"):
        quantizer = component.factory(config)
    _expect(isinstance(quantizer, Quantizer), component, "interface", "a quantizer must subclass Quantizer")
    try:
        quantizer.check_available(torch.device("cpu"))
    except NvilaError as exc:
        warnings.warn(f"{component.origin} does not run on this CPU, so only its config and build were checked: {exc}",
                      UserWarning, stacklevel=3)
        return

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256)).eval()

    torch.manual_seed(0)
    original, inputs, calibration = mlp(), torch.randn(4, 256), [torch.randn(16, 256) for _ in range(2)]
    part = copy.deepcopy(original)
    with torch.no_grad(), _check(component, "forward on tiny CPU inputs"):
        reference = original(inputs)  # (4, 256)
        layers = quantizer.quantize(part, lambda: [part(x) for x in calibration])
    with _check(component, "plain state dict"):
        before = part.state_dict()
    _plain_state(component, before)
    before = {k: v.clone() for k, v in before.items()}
    with torch.no_grad(), _check(component, "forward on tiny CPU inputs"):
        out = part(inputs)
    names = {name for name, _ in original.named_modules()}
    _expect(isinstance(layers, list) and bool(layers) and set(layers) <= names, component, "quantized output",
            f"quantize() must return the names of the layers it quantized (some of {sorted(names - {''})}), "
            f"got {layers!r}")
    _expect(_shape(out) == (4, 256) and bool(torch.isfinite(out).all()), component, "quantized output",
            f"the quantized part gave {_shape(out)} (or non-finite values) for (4, 256) inputs")
    error = float((out.float() - reference).norm() / reference.norm())
    _expect(error < 0.25, component, "quantized output", f"relative error {error:.3f} against full precision")
    with _check(component, "plain state dict"):
        after = part.state_dict()
    _plain_state(component, after)
    _expect(before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), component,
            "plain state dict", "the state dict changed when the part ran (packing must be exactly reversible)")
    with _check(component, "quantized round-trip"), tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = str(Path(tmp) / "part.safetensors")
        save_model(part, path)
        fresh = mlp()
        component.factory(config).quantize(fresh, None)
        load_model(fresh, path, strict=True)
        again = fresh(inputs)
    _expect(torch.equal(again, out), component, "quantized round-trip",
            f"outputs differ by {(again.float() - out.float()).abs().max().item():.2e} after save and load")


def _plain_state(component: Component, state: dict) -> None:
    odd = [k for k, v in state.items() if type(v) is not torch.Tensor or v.is_quantized]
    _expect(not odd, component, "plain state dict", f"entries {odd} are not plain tensors: safetensors cannot hold "
            "them, and loading them would need unpickling")


KIND_CHECKS: dict[str, Callable[[Component, object], object]] = {
    "encoder": _check_encoder,
    "compressor": _check_compressor,
    "temporal": _check_temporal,
    "projector": _check_projector,
    "llm": _check_llm,
    "precision": _check_precision,
    "quantizer": _check_quantizer,
}
"""The kind-specific checks (pruners have their own, below); other kinds get the config checks and a warning."""


TINY_MODEL = ModelSpec(
    encoder={"name": "siglip", "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
             "num_layers": 1, "num_heads": 2, "feature_layer": -1},
    compressor={"name": "stc", "ratio": 2},
    projector={"name": "mlp"},
    llm={"name": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
         "num_kv_heads": 1},
)
"""A tiny model built from nvila's own components, for checks that need one (pruners score with models)."""


def _check_pruner(component: Component, config: object, registry: Registry) -> None:
    from nvila.core.model import NvilaModel
    from nvila.core.processor import collate
    from nvila.core.pruning import Pruner, ScoringBatch

    with _check(component, "build from defaults"):
        pruner = component.factory(config)
    _expect(isinstance(pruner, Pruner), component, "interface", "a pruner must subclass nvila.core.pruning.Pruner")
    _expect(isinstance(pruner.models, tuple) and all(isinstance(r, str) for r in pruner.models), component,
            "interface", "models must be a tuple of role names, e.g. ('small', 'large')")
    torch.manual_seed(0)
    models = {role: NvilaModel(TINY_MODEL, registry).eval() for role in pruner.models}
    image = Image.new("RGB", (32, 32), (30, 200, 30))
    conversations = [
        ([{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "green"}], [image]),
        ([{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello there, friend"}], []),
        ([{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "one"}], [image]),
    ]

    def batch(indices: list[int]) -> ScoringBatch:
        inputs = {role: collate([m.processor.encode(*conversations[i]) for i in indices], m.tokenizer.pad_token_id)
                  for role, m in models.items()}
        return ScoringBatch([f"check.tar:{i}" for i in indices], ["check"] * len(indices), inputs)

    with torch.no_grad(), _check(component, "forward on tiny CPU inputs"):
        scores = pruner.score(batch([0, 1, 2]), models)
        again = pruner.score(batch([0, 1, 2]), models)
        alone = torch.cat([pruner.score(batch([i]), models) for i in range(3)])
    _expect(isinstance(scores, torch.Tensor) and tuple(scores.shape) == (3,) and scores.is_floating_point(),
            component, "shape contract",
            f"score() must return a (B,) float tensor, got {getattr(scores, 'shape', scores)!r}")
    _expect(bool(torch.isfinite(scores).all()), component, "pruner scores",
            f"scores of samples with answers must be finite: {scores}")
    _expect(torch.equal(scores, again), component, "pruner scores", "scores must be deterministic")
    _expect(torch.allclose(scores.double(), alone.double(), atol=1e-4), component, "pruner scores",
            f"a sample's score must not depend on its batch mates: {scores.tolist()} vs alone {alone.tolist()}")


def check_component(component: Component, registry: Registry) -> None:
    """Every contract check for one registered component; raises ContractError on the first failure."""
    config = check_config_round_trip(component, registry)
    if component.kind == "pruner":  # pruners score with models, so their check needs the registry
        _check_pruner(component, config, registry)
        return
    kind_check = KIND_CHECKS.get(component.kind)
    if kind_check is None:
        warnings.warn(f"the nvila test kit has no checks for kind '{component.kind}' yet; only the config "
                      f"checks ran for {component.origin}", UserWarning, stacklevel=2)
        return
    module = kind_check(component, config)
    if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
        check_state_dict_round_trip(component, module)


def check_distribution(distribution: str, registry: Registry | None = None) -> list[str]:
    """Run :func:`check_component` on every component ``distribution`` registers; returns ``kind:name`` of each.

    Raises ContractError if the distribution failed to load, registers nothing, or has a component that
    breaks its contract (every failing component is listed). Other installed plugins that fail to load
    do not fail this check: they are not the distribution under test.
    """
    if registry is None:
        from nvila.core.plugins import load_plugins

        loaded = load_plugins(strict=False)
        registry = loaded.registry
        for failure in loaded.failures:
            if failure.distribution == distribution:
                raise ContractError(str(failure))
        if any(ep in loaded.blocked for ep in _entry_points_of(distribution)):
            raise ContractError(f"{distribution} is disabled by NVILA_DISABLE_PLUGINS; unset it to test it.")
    components = [c for c in registry if c.distribution == distribution]
    if not components:
        raise ContractError(f"no components registered by distribution '{distribution}'; is it installed, "
                            "with an entry point in the 'nvila' group?")
    errors: list[ContractError] = []
    for component in components:
        try:
            check_component(component, registry)
        except ContractError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ContractError(f"{len(errors)} of {len(components)} components from {distribution} broke their "
                            "contracts:\n" + "\n".join(f"  - {e}" for e in errors)) from errors[0]
    return [f"{c.kind}:{c.name}" for c in components]


def _entry_points_of(distribution: str) -> list[str]:
    from importlib.metadata import entry_points

    return [ep.name for ep in entry_points(group="nvila") if ep.dist and ep.dist.name == distribution]


__all__ = ["CHECKS", "KIND_CHECKS", "ContractError", "check_component", "check_distribution",
           "check_config_round_trip", "check_state_dict_round_trip"]
