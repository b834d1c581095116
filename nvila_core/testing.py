"""The public test kit: the checks nvila runs on every registered component, for plugin authors too.

In a plugin package's own test suite::

    from nvila_core.testing import check_distribution

    def test_my_plugin_meets_the_contract():
        check_distribution("my-nvila-plugin")

Each component is built from its config defaults, run forward on tiny CPU inputs, checked against
its kind's shape contract and token accounting, and its config and state dict are round-tripped
(the latter through safetensors). Pruners score a tiny batch with tiny models: one float per sample,
finite, deterministic, and the same whatever the batch mates.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_model, save_model
from torch import nn

from nvila_core.interfaces import Compressor, LanguageModel, PrecisionBackend, PreparedImage, VisionEncoder
from nvila_core.registry import Component, Registry
from nvila_core.specs import resolve, to_spec


class ContractError(AssertionError):
    """A component that breaks its kind's contract."""


def _expect(condition: bool, component: Component, message: str) -> None:
    if not condition:
        raise ContractError(f"{component.kind} '{component.name}' ({component.distribution}): {message}")


def check_config_round_trip(component: Component, registry: Registry) -> object:
    """Defaults build, and ``to_spec`` -> ``resolve`` gives back an equal config."""
    config = component.config()
    _, again = resolve(component.kind, to_spec(component, config), registry)
    _expect(again == config, component, f"config does not round-trip: {config!r} != {again!r}")
    return config


def check_state_dict_round_trip(component: Component, module: nn.Module) -> None:
    """Weights saved with safetensors load back into a fresh build unchanged."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "weights.safetensors")
        save_model(module, path)
        reference = {k: v.clone() for k, v in module.state_dict().items()}
        for p in module.parameters():
            p.data.zero_()
        load_model(module, path, strict=True)
        for key, value in module.state_dict().items():
            _expect(torch.equal(value, reference[key]), component, f"state dict entry {key} did not round-trip")


def _check_encoder(component: Component, encoder: nn.Module) -> None:
    _expect(isinstance(encoder, VisionEncoder), component, "an encoder must subclass VisionEncoder")
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("L", (17, 53), 128)]
    prepared = [encoder.processor()(image) for image in images]
    for image, p in zip(images, prepared):
        _expect(isinstance(p, PreparedImage) and p.pixels.ndim == 4 and p.pixels.shape[1] == 3, component,
                "processor() must return PreparedImage with (T, 3, S, S) pixels")
        plan = encoder.processor().plan(*image.size)
        _expect((plan.tiles, plan.grid) == (p.pixels.shape[0], p.grid), component,
                f"processor().plan{image.size} says {plan} but preprocessing gave {p.pixels.shape[0]} tiles, "
                f"grid {p.grid}")
    with torch.no_grad():
        blocks = encoder(torch.cat([p.pixels for p in prepared]), [p.grid for p in prepared])
    expected = (sum(p.num_blocks for p in prepared), *encoder.block_size, encoder.out_channels)
    _expect(tuple(blocks.shape) == expected, component,
            f"forward returned {tuple(blocks.shape)}, the contract says {expected} (blocks, h, w, C)")


def _check_compressor(component: Component, config: object) -> nn.Module:
    channels = 8
    compressor = component.factory(config, in_channels=channels)
    _expect(isinstance(compressor, Compressor), component, "a compressor must subclass Compressor")
    for h, w in ((6, 6), (5, 7)):
        blocks = torch.randn(2, h, w, channels)
        with torch.no_grad():
            tokens = compressor(blocks)
        n, c = compressor.output_shape((h, w), channels)
        _expect(tuple(tokens.shape) == (2, n, c), component,
                f"on blocks {tuple(blocks.shape)} forward gave {tuple(tokens.shape)} but output_shape "
                f"promised {(2, n, c)}")
    return compressor


def _check_projector(component: Component, config: object) -> nn.Module:
    projector = component.factory(config, in_dim=12, out_dim=16)
    with torch.no_grad():
        out = projector(torch.randn(2, 3, 12))
    _expect(tuple(out.shape) == (2, 3, 16), component, f"mapped (2, 3, 12) to {tuple(out.shape)}, not (2, 3, 16)")
    return projector


def _check_llm(component: Component, llm: nn.Module) -> None:
    _expect(isinstance(llm, LanguageModel), component, "an llm must subclass LanguageModel")
    tokenizer = llm.load_tokenizer()
    _expect(getattr(tokenizer, "chat_template", None) is not None, component, "its tokenizer has no chat template")
    ids = torch.tensor([tokenizer("a b c", add_special_tokens=False).input_ids])
    with torch.no_grad():
        embeds = llm.embed(ids)
        logits = llm(embeds, attention_mask=torch.ones_like(ids))
    _expect(tuple(embeds.shape) == (*ids.shape, llm.hidden_size), component, "embed() has the wrong shape")
    _expect(logits.shape[:2] == ids.shape, component, f"logits shape {tuple(logits.shape)} for ids {tuple(ids.shape)}")


TINY_MODEL = {
    "encoder": {"name": "siglip", "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                "num_layers": 1, "num_heads": 2, "feature_layer": -1},
    "compressor": {"name": "stc", "ratio": 2},
    "projector": {"name": "mlp"},
    "llm": {"name": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
            "num_kv_heads": 1},
}
"""A tiny model built from nvila's own components, for checks that need one (pruners score with models)."""


def _check_pruner(component: Component, config: object, registry: Registry) -> None:
    from nvila_core.model import NvilaModel
    from nvila_core.processor import collate
    from nvila_core.pruning import Pruner, ScoringBatch

    pruner = component.factory(config)
    _expect(isinstance(pruner, Pruner), component, "a pruner must subclass nvila_core.pruning.Pruner")
    _expect(isinstance(pruner.models, tuple) and all(isinstance(r, str) for r in pruner.models), component,
            "models must be a tuple of role names, e.g. ('small', 'large')")
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

    with torch.no_grad():
        scores = pruner.score(batch([0, 1, 2]), models)
        again = pruner.score(batch([0, 1, 2]), models)
        alone = torch.cat([pruner.score(batch([i]), models) for i in range(3)])
    _expect(isinstance(scores, torch.Tensor) and tuple(scores.shape) == (3,) and scores.is_floating_point(),
            component, f"score() must return a (B,) float tensor, got {getattr(scores, 'shape', scores)!r}")
    _expect(bool(torch.isfinite(scores).all()), component, f"scores of samples with answers must be finite: {scores}")
    _expect(torch.equal(scores, again), component, "scores must be deterministic")
    _expect(torch.allclose(scores.double(), alone.double(), atol=1e-4), component,
            f"a sample's score must not depend on its batch mates: {scores.tolist()} vs alone {alone.tolist()}")


def check_component(component: Component, registry: Registry) -> None:
    """Every contract check for one registered component; raises ContractError on the first failure."""
    config = check_config_round_trip(component, registry)
    if component.kind == "encoder":
        module = component.factory(config)
        _check_encoder(component, module)
    elif component.kind == "compressor":
        module = _check_compressor(component, config)
    elif component.kind == "projector":
        module = _check_projector(component, config)
    elif component.kind == "llm":
        module = component.factory(config)
        _check_llm(component, module)
    elif component.kind == "precision":
        backend = component.factory(config)
        _expect(isinstance(backend, PrecisionBackend), component, "must subclass PrecisionBackend")
        _expect(isinstance(backend.lightning_precision, str), component, "lightning_precision must be a string")
        return
    elif component.kind == "pruner":
        _check_pruner(component, config, registry)
        return
    else:
        raise ContractError(f"the test kit has no checks for kind '{component.kind}' yet")
    if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
        check_state_dict_round_trip(component, module)


def check_distribution(distribution: str, registry: Registry | None = None) -> list[str]:
    """Run :func:`check_component` on every component a distribution registers; returns their names."""
    if registry is None:
        from nvila_core.plugins import load_plugins

        loaded = load_plugins(strict=True)
        registry = loaded.registry
    components = [c for c in registry if c.distribution == distribution]
    if not components:
        raise ContractError(f"no components registered by distribution '{distribution}'; is it installed, "
                            "with an entry point in the 'nvila' group?")
    for component in components:
        check_component(component, registry)
    return [f"{c.kind}:{c.name}" for c in components]


__all__ = ["ContractError", "check_component", "check_distribution", "check_config_round_trip",
           "check_state_dict_round_trip"]
