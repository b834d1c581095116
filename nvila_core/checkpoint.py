"""Checkpoints as directories: ``spec.yaml`` (resolved model spec), ``model.safetensors``, ``tokenizer/``.

Loading rebuilds the model from its spec through the registry and reads tensors with safetensors;
nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import load_model, save_model
from transformers import AutoTokenizer

from nvila_core.errors import NvilaError
from nvila_core.model import NvilaModel
from nvila_core.registry import Registry

SPEC_FILE, WEIGHTS_FILE, TOKENIZER_DIR = "spec.yaml", "model.safetensors", "tokenizer"


def save_checkpoint(model: NvilaModel, directory: str | Path) -> Path:
    """Write ``model`` as a checkpoint directory and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = {"model": model.spec.to_dict(), "max_length": model.processor.max_length}
    OmegaConf.save(OmegaConf.create(spec), directory / SPEC_FILE)
    save_model(model, str(directory / WEIGHTS_FILE))  # handles tied embeddings
    model.tokenizer.save_pretrained(directory / TOKENIZER_DIR)
    return directory


def load_checkpoint(directory: str | Path, registry: Registry | None = None) -> NvilaModel:
    """Rebuild a model from a checkpoint directory written by :func:`save_checkpoint`."""
    directory = Path(directory)
    missing = [f for f in (SPEC_FILE, WEIGHTS_FILE, TOKENIZER_DIR) if not (directory / f).exists()]
    if missing:
        raise NvilaError(f"'{directory}' is not an nvila checkpoint directory: missing {', '.join(missing)}. "
                         "Training writes one to <log dir>/checkpoint when it ends.")
    spec = OmegaConf.to_container(OmegaConf.load(directory / SPEC_FILE))
    tokenizer = AutoTokenizer.from_pretrained(directory / TOKENIZER_DIR, local_files_only=True)
    model = NvilaModel(spec["model"], registry, tokenizer=tokenizer, max_length=spec.get("max_length", 2048))
    try:
        load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    except RuntimeError as exc:
        raise NvilaError(f"The weights in '{directory}' do not fit the architecture its spec.yaml describes "
                         f"(was the spec edited, or a plugin upgraded?): {str(exc).splitlines()[0][:500]}") from None
    return model.eval()
