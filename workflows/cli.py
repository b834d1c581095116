"""The Lightning CLI behind ``nvila fit``: a fixed module and data module, specs as plain dicts.

Subclass mode stays off and component arguments are dicts resolved through the plugin registry, so a
recipe can only name registered plugins, never an import path. ``parser_mode="omegaconf+"`` resolves
interpolations once, after every source (recipe files and command-line overrides) is merged.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from nvila.core.errors import NvilaError
from nvila.core.model import ModelSpec
from nvila.core.specs import IMPORT_PATH_KEYS
from nvila.workflows.callbacks import (
    DataHealthLogger,
    ExportCheckpoint,
    PlainProgress,
    StepProgressBar,
    TrainingThroughput,
)
from nvila.workflows.datamodule import NvilaDataModule
from nvila.workflows.module import build_module

RECIPES = files("nvila.workflows") / "recipes"


def recipe_path(name_or_path: str) -> str:
    """A recipe file path; a bare name like ``demo`` means a recipe shipped with nvila (even where a folder of that
    name is in the way, as ``nvila demo --out demo`` makes one: a folder is never a recipe)."""
    if Path(name_or_path).is_file():
        return name_or_path
    shipped = RECIPES.joinpath(*f"{name_or_path}.yaml".split("/"))
    if shipped.is_file():
        return str(shipped)
    if Path(name_or_path).is_dir():
        raise NvilaError(f"--config '{name_or_path}' is a folder; give a recipe file (.yaml) or a shipped name.")
    root = Path(str(RECIPES))
    names = sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))
    raise NvilaError(f"Recipe '{name_or_path}' is neither a file nor a shipped recipe ({', '.join(names)}).")


def shipped_recipes() -> list[Path]:
    """Complete recipes (a model and data); the fragments in stages/ and strategies/ layer on top of one."""
    return sorted(Path(str(p)) for p in RECIPES.iterdir() if p.name.endswith(".yaml"))


def recipe_fragments() -> list[Path]:
    """Shipped fragments (training stages, strategies), each meant to follow a complete recipe."""
    return sorted(Path(str(RECIPES)).glob("*/*.yaml"))


def _find_import_paths(node: Any, where: str = "") -> list[str]:
    if isinstance(node, dict):
        found = [f"{where}.{k}".lstrip(".") for k in node if k in IMPORT_PATH_KEYS]
        return found + [p for k, v in node.items() for p in _find_import_paths(v, f"{where}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_import_paths(v, f"{where}[{i}]")]
    return []


def refuse_import_paths(args: list[str]) -> list[str]:
    """Resolve shipped recipe names, and refuse recipes or overrides that name import paths."""
    out, found = [], []
    for i, arg in enumerate(args):
        recipe = None
        if i and args[i - 1] in ("-c", "--config"):
            recipe = arg = recipe_path(arg)
        elif arg.startswith("--config="):
            recipe = recipe_path(arg.split("=", 1)[1])
            arg = f"--config={recipe}"
        if recipe is not None:
            content = load_recipe_file(recipe)
            found += [f"{recipe}: {p}" for p in _find_import_paths(content)]
            check_sections(content, recipe)
        if any(key in arg for key in IMPORT_PATH_KEYS):
            found.append(arg)
        elif arg.startswith("--") and not found:
            _check_override_key(arg)
        out.append(arg)
    if found:
        raise NvilaError("Recipes and overrides may not name import paths (class_path, _target_, init_args): "
                         f"{'; '.join(found)}. Name a registered plugin instead (`nvila plugins` lists them).")
    return out


def load_recipe_file(path: str) -> dict[str, Any]:
    """A recipe file's content, read with YAML's safe loader; one clear line for anything else."""
    try:
        content = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise NvilaError(f"Recipe '{path}' is not UTF-8 text.") from None
    except OSError as exc:
        raise NvilaError(f"Cannot read recipe '{path}': {exc.strerror or exc}.") from None
    except yaml.constructor.ConstructorError as exc:
        named = re.search(r"tag:yaml\.org,2002:([^'\s]+)|'(![^']+)'", exc.problem or "")
        tag = f" ({'!!' + named.group(1) if named.group(1) else named.group(2)})" if named else ""
        raise NvilaError(f"Recipe '{path}' uses a YAML tag{tag} at line {_line(exc)}: recipes are plain YAML "
                         "(mappings, lists, numbers, strings); tags such as !!python/... are refused, nothing "
                         "was executed.") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise NvilaError(f"Recipe '{path}' is not valid YAML: {problem} at line {_line(exc)}.") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise NvilaError(f"Recipe '{path}' holds a YAML {type(content).__name__}; a recipe is a mapping with "
                         "model:, data: and trainer: sections.")
    return content


def _line(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return str(mark.line + 1) if mark is not None else "?"


SECTIONS = ("model", "data", "trainer", "checkpoint")
"""Recipe sections that hold a mapping of settings."""


def _section_keys(section: str) -> list[str] | None:
    import inspect

    if section == "model":
        return list(inspect.signature(build_module).parameters)
    if section == "data":
        return [p for p in inspect.signature(NvilaDataModule.__init__).parameters if p != "self"]
    return None  # trainer and checkpoint: Lightning's own parser names its keys


def check_sections(content: dict[str, Any], where: str) -> None:
    """Refuse a scalar where a section's mapping belongs, and unknown model/data keys, with did-you-mean."""
    from nvila.core.registry import did_you_mean

    for section in SECTIONS:
        value = content.get(section)
        if value is not None and not isinstance(value, dict):
            raise NvilaError(f"{where}: '{section}:' must be a mapping of settings (key: value lines indented "
                             f"under it), got the {type(value).__name__} {value!r}.")
        known = _section_keys(section)
        for key in (value or {}) if known is not None else ():
            if key not in known:
                raise NvilaError(f"{where}: unknown key '{section}.{key}'.{did_you_mean(str(key), known)} "
                                 f"`nvila fit --help` lists the {section} settings.")


def _check_override_key(arg: str) -> None:
    """``--model.lrr=3`` -> did you mean 'lr'? (the Lightning parser only says "unrecognized arguments")."""
    from nvila.core.registry import did_you_mean

    dotted = arg[2:].split("=", 1)[0]
    section, _, key = dotted.partition(".")
    known = _section_keys(section) if section in SECTIONS else None
    key = key.split(".", 1)[0]
    if known is not None and key and key not in known:
        raise NvilaError(f"unknown key '{section}.{key}' in {arg}.{did_you_mean(key, known)} "
                         f"`nvila fit --help` lists the {section} settings.")


class NvilaCLI(LightningCLI):
    """LightningCLI with nvila's module, data module, loggers and checkpoint export."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        self.export = ExportCheckpoint()
        super().__init__(
            build_module, NvilaDataModule, subclass_mode_model=False, subclass_mode_data=False,
            parser_kwargs={"parser_mode": "omegaconf+"}, save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        # Periodic checkpoints for resuming (`--ckpt_path last`), configured as `checkpoint.*` without
        # naming a class in the recipe.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        if config.get("checkpoint") is not None and config["checkpoint"].get("dirpath") is None:
            # a fixed folder (not one per logger version), so that `--ckpt_path last` finds the previous run's
            root = config["trainer"].get("default_root_dir") or "runs"
            config["checkpoint"]["dirpath"] = str(Path(root) / "checkpoints")
        if "weights_only" in config and config["weights_only"] is None:
            config["weights_only"] = True  # resuming never unpickles arbitrary objects
        _check_group_fits_frames(config)
        _check_resume_file(config)

    def instantiate_trainer(self, **kwargs: Any):
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):
            root = config.get("default_root_dir") or "runs"
            csv = CSVLogger(root, name="")
            kwargs["logger"] = [csv, TensorBoardLogger(root, name="", version=csv.version)]
        wanted = self.model.precision_backend.lightning_precision
        if config.get("precision") not in (None, wanted):
            raise NvilaError(f"trainer.precision={config.get('precision')} conflicts with the model's precision "
                             f"backend ({wanted}); set `model.precision` instead.")
        kwargs["precision"] = wanted
        if config.get("strategy") == "fsdp":
            from lightning.pytorch.strategies import FSDPStrategy

            dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in self.model.parameters()})
            if len(dtypes) > 1:
                raise NvilaError(f"strategy fsdp flattens each wrapped layer into one tensor of one dtype, but the "
                                 f"model's parameters are {' and '.join(dtypes)} (model.precision.frozen_in_bf16 "
                                 "stores frozen weights in bf16): set model.precision.frozen_in_bf16=false.")
            # shard per transformer layer, using the layer classes each component names
            layers = self.model.model.fsdp_wrap_modules()
            checkpointed = layers if self.model.settings.gradient_checkpointing else None
            kwargs["strategy"] = FSDPStrategy(auto_wrap_policy=layers, activation_checkpointing_policy=checkpointed)
        callbacks = list(config.get("callbacks") or []) + [self.export, DataHealthLogger(), TrainingThroughput()]
        if config.get("enable_progress_bar") is not False:  # by steps: a bar on a terminal, plain lines elsewhere
            if sys.stderr.isatty():
                callbacks.append(StepProgressBar())
            else:
                kwargs["enable_progress_bar"] = False
                callbacks.append(PlainProgress())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def _check_group_fits_frames(config: Any) -> None:
    """Refuse, before anything is built, a temporal group larger than the frames each video is sampled to."""
    from nvila.core.plugins import default_registry
    from nvila.core.specs import resolve

    frames = (config.get("data") or {}).get("video_frames")
    spec = (config.get("model") or {}).get("temporal") or ModelSpec().temporal
    try:
        _, temporal = resolve("temporal", spec, default_registry())
    except NvilaError:
        return  # the model reports a bad temporal spec itself, with every other spec problem
    group = getattr(temporal, "group", None)
    if frames is not None and group is not None and group > frames:
        raise NvilaError(f"model.temporal.group = {group} is larger than data.video_frames = {frames}: every "
                         f"video would pool into one partial group. Valid range: 1..{frames}; lower the group "
                         "or sample more frames.")


def _check_resume_file(config: Any) -> None:
    """Refuse a truncated or foreign ``--ckpt_path`` file in one line (torch's own error suggests unpickling it)."""
    import zipfile

    wanted = config.get("ckpt_path")
    if not wanted:
        return
    if wanted == "last":
        folder = (config.get("checkpoint") or {}).get("dirpath")
        path = Path(folder) / "last.ckpt" if folder else None
    else:
        path = Path(wanted)
    if path is None or not path.is_file():
        return  # Lightning reports a missing checkpoint (and `last` with none yet) itself
    if not zipfile.is_zipfile(path):
        raise NvilaError(f"Cannot resume from '{path}': it is truncated or not a checkpoint written by nvila fit "
                         f"(not a complete torch archive; {path.stat().st_size:,} bytes). The run that wrote it "
                         "probably stopped while saving: resume from another .ckpt in that folder with "
                         "--ckpt_path=FILE, or start again without --ckpt_path.")


class _ParseOnly(NvilaCLI):
    def instantiate_classes(self) -> None:  # parse, merge and validate; build nothing
        pass


def read_recipe(args: Sequence[str]) -> dict[str, Any]:
    """A recipe exactly as ``nvila fit`` reads it, without building anything: stacked ``--config`` files
    (shipped names or paths), dotted overrides (``--model.compressor.ratio=3``) and interpolations resolved.

    ``plan``, ``sweep`` and ``bench`` read recipes here, so they see what ``fit`` would train.
    """
    stderr = io.StringIO()
    logging.disable(logging.INFO)  # Lightning's "Seed set to 0": nothing is run here
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(stderr):
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            warnings.filterwarnings("ignore", message="No seed found")
            return _ParseOnly(args=refuse_import_paths(list(args)), run=False, seed_everything_default=False,
                              ).config.as_dict()
    except SystemExit:
        errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error:")]
        raise NvilaError(f"the recipe and overrides are refused: "
                         f"{errors[-1] if errors else stderr.getvalue()[-500:]} (see `nvila fit --help`).") from None
    finally:
        logging.disable(logging.NOTSET)


def model_spec(config: Mapping[str, Any]) -> ModelSpec:
    """The :class:`ModelSpec` in a recipe read by :func:`read_recipe` (its ``model:`` section's spec fields)."""
    return ModelSpec.pick(config.get("model") or {})


def run_cli(args: list[str]) -> NvilaCLI:
    """Run ``nvila fit/validate ...`` arguments through the Lightning CLI."""
    with warnings.catch_warnings():
        # `nvila fit ...` hands its own arguments over explicitly; that is the intended use here.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return NvilaCLI(args=refuse_import_paths(args))
