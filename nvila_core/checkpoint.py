"""Checkpoints as directories: ``spec.yaml`` (the whole :class:`ModelSpec`), ``model.safetensors``, ``tokenizer/``.

Loading rebuilds the model from its spec through the registry and reads tensors with safetensors;
nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from safetensors.torch import load_model, save_model
from transformers import AutoTokenizer

from nvila.core.errors import NvilaError
from nvila.core.model import ModelSpec, NvilaModel
from nvila.core.registry import Registry

SPEC_FILE, WEIGHTS_FILE, TOKENIZER_DIR = "spec.yaml", "model.safetensors", "tokenizer"


def save_checkpoint(model: NvilaModel, directory: str | Path) -> Path:
    """Write ``model`` as a checkpoint directory and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"model": model.spec.to_dict()}), directory / SPEC_FILE)
    save_model(model, str(directory / WEIGHTS_FILE))  # handles tied embeddings
    model.tokenizer.save_pretrained(directory / TOKENIZER_DIR)
    return directory


def _check_directory(directory: Path) -> None:
    missing = [f for f in (SPEC_FILE, WEIGHTS_FILE, TOKENIZER_DIR) if not (directory / f).exists()]
    if missing:
        raise NvilaError(f"'{directory}' is not an nvila checkpoint directory: missing {', '.join(missing)}. "
                         "Training writes one to <log dir>/checkpoint when it ends.")


def load_tokenizer(directory: str | Path) -> Any:
    """The tokenizer saved in a checkpoint directory."""
    directory = Path(directory)
    _check_directory(directory)
    return AutoTokenizer.from_pretrained(directory / TOKENIZER_DIR, local_files_only=True)


def load_weights(model: NvilaModel, directory: str | Path) -> NvilaModel:
    """Load a checkpoint's weights into an already built model; refuses a different architecture."""
    directory = Path(directory)
    _check_directory(directory)
    try:
        load_model(model, str(directory / WEIGHTS_FILE), strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:600]
        raise NvilaError(f"The weights in '{directory}' do not fit this model's architecture: the checkpoint "
                         f"was made from a different spec (see its spec.yaml). {detail}") from None
    return model


def load_checkpoint(directory: str | Path, registry: Registry | None = None) -> NvilaModel:
    """Rebuild a model from a checkpoint directory written by :func:`save_checkpoint`."""
    directory = Path(directory)
    _check_directory(directory)
    return load_weights(NvilaModel(read_spec(directory), registry, tokenizer=load_tokenizer(directory)),
                        directory).eval()


def read_spec(directory: str | Path) -> ModelSpec:
    """The :class:`ModelSpec` a checkpoint directory was made from (no weights are read)."""
    directory = Path(directory)
    _check_directory(directory)
    saved = OmegaConf.to_container(OmegaConf.load(directory / SPEC_FILE))
    spec = dict(saved["model"])
    if "max_length" in saved:  # checkpoints written before the spec held max_length and precision
        spec.setdefault("max_length", saved["max_length"])
    if "image_end" not in spec:  # written before image end tokens: keep the token layout they were trained with
        spec.update(image_end=None, strip_media_newline=False)
    return ModelSpec.from_dict(spec)
