"""Component specs: ``{name: stc, ratio: 2}`` merged onto the plugin's typed config.

OmegaConf does the coercion and type checks; this module collects every problem of a spec and
reports them at once, each naming the key, the plugin and the valid choices.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from collections.abc import Mapping
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nvila.core.errors import NvilaError, SpecError
from nvila.core.registry import Component, Registry, did_you_mean

IMPORT_PATH_KEYS = ("_target_", "class_path", "init_args", "_partial_")


def as_dict(spec: Any) -> dict[str, Any]:
    """A plain dict from a spec given as a name, a mapping or a DictConfig."""
    if isinstance(spec, str):
        return {"name": spec}
    if isinstance(spec, DictConfig):
        return OmegaConf.to_container(spec, resolve=True)  # type: ignore[return-value]
    if isinstance(spec, Mapping):
        return dict(spec)
    raise SpecError("component", None, [f"a spec is a mapping like {{name: stc, ratio: 2}}, got {spec!r}"])


def parse_inline(text: str) -> dict[str, Any]:
    """A spec typed on a command line: a plugin name (``deltaloss``) or inline YAML (``{name: random, seed: 3}``).

    YAML is read with the safe loader, so tags such as ``!!python/object`` are refused, never run.
    """
    if not text.strip().startswith("{"):
        return as_dict(text.strip())
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError("component", None, [f"the inline spec {text!r} is not valid YAML ({exc.problem or exc}); "
                                            "write it like {name: w4a16, method: rtn}"]) from None
    return as_dict(parsed)


def resolve(kind: str, spec: Any, registry: Registry) -> tuple[Component, Any]:
    """The component a spec names, and its validated config instance."""
    spec = as_dict(spec)
    forbidden = [k for k in IMPORT_PATH_KEYS if k in spec]
    if forbidden:
        raise SpecError(kind, spec.get("name"), [
            f"key '{k}': specs never name import paths; use `name:` with a registered plugin "
            f"({', '.join(registry.names(kind))})" for k in forbidden])
    if "name" not in spec:
        raise SpecError(kind, None, [f"key 'name' is missing; choose one of: {', '.join(registry.names(kind))}"])
    name = str(spec.pop("name"))
    component = registry.get(kind, name)  # unknown names get their own, clearer error
    return component, make_config(component, spec)


def validate_all(specs: Mapping[str, tuple[str, Any]], registry: Registry | None = None) -> None:
    """Check several specs (``{slot: (kind, spec)}``) and report every problem of every one at once."""
    registry = registry or _default_registry()
    problems = []
    for slot, (kind, spec) in specs.items():
        try:
            resolve(kind, spec, registry)
        except NvilaError as exc:
            problems.append(f"{slot}: {exc}")
    if problems:
        raise NvilaError("\n".join(problems))


def make_config(component: Component, overrides: Mapping[str, Any]) -> Any:
    """Merge ``overrides`` onto the component's config dataclass; every problem is reported at once."""
    return merge_config(component.config, overrides, component.kind, component.name)


def merge_config(config_cls: type, overrides: Mapping[str, Any], kind: str, name: str | None = None,
                 hint: str | None = None) -> Any:
    """Merge ``overrides`` onto ``config_cls`` (a dataclass) with type coercion; all problems at once."""
    base = OmegaConf.structured(config_cls)
    fields = [f.name for f in dataclasses.fields(config_cls)]
    where = f"{kind} '{name}'" if name else kind
    problems = []
    for key, value in overrides.items():
        if key not in fields:
            problems.append(f"key '{key}' is not a field of {where}.{did_you_mean(key, fields)} "
                            f"Valid keys: {', '.join(fields) or '(none)'}")
            continue
        try:
            base = OmegaConf.merge(base, {key: value})
        except OmegaConfBaseException as exc:
            expected = _type_name(config_cls, key)
            problems.append(f"key '{key}': {value!r} is not a valid {expected} ({str(exc).splitlines()[0]})")
    for key in fields:
        if key not in overrides and OmegaConf.is_missing(base, key):
            problems.append(f"key '{key}' is required and has no default ({field_docs(config_cls).get(key, '')})")
    if problems:
        raise SpecError(kind, name, problems, hint)
    try:
        return OmegaConf.to_object(base)  # runs the dataclass's own __post_init__ checks
    except (ValueError, TypeError, OmegaConfBaseException) as exc:
        raise SpecError(kind, name, [str(exc).splitlines()[0]], hint) from None


def build(kind: str, spec: Any, registry: Registry | None = None, **context: Any) -> Any:
    """Build the component a spec names: ``factory(config, **context)``."""
    component, config = resolve(kind, spec, registry or _default_registry())
    return component.factory(config, **context)


def _default_registry() -> Registry:
    from nvila.core.plugins import default_registry

    return default_registry()


def to_spec(component: Component, config: Any) -> dict[str, Any]:
    """The spec that rebuilds ``config``: its name plus every field (round-trips through ``resolve``)."""
    return {"name": component.name, **OmegaConf.to_container(OmegaConf.structured(config))}


def _type_name(config: type, key: str) -> str:
    hints = inspect.get_annotations(config, eval_str=False)
    return str(hints.get(key, "value")).replace("typing.", "")


@functools.cache
def field_docs(config: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(config.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(component: Component) -> str:
    """A readable description of a component and its config fields (``nvila plugins --describe``)."""
    docs = field_docs(component.config)
    lines = [f"{component.kind} '{component.name}' from {component.distribution} {component.version}"]
    if component.summary:
        lines.append(f"  {component.summary}")
    lines.append("  fields:")
    for f in dataclasses.fields(component.config):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        if default == repr(MISSING):
            default = "(required)"
        type_name = _type_name(component.config, f.name)
        lines.append(f"    {f.name}: {type_name} = {default}")
        if docs.get(f.name):
            lines.append(f"        {docs[f.name]}")
    return "\n".join(lines)
