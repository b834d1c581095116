"""Finds plugins through the ``nvila`` entry-point group and loads each one safely.

pluggy's own ``load_setuptools_entrypoints`` stops at the first plugin that fails to import; this
loader names the failing distribution in one log line and goes on with the rest.
``NVILA_STRICT_PLUGINS=1`` re-raises instead (for plugin authors and CI); ``NVILA_DISABLE_PLUGINS=a,b``
skips plugins by entry-point or distribution name.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

import pluggy

from nvila.core.errors import PluginLoadError
from nvila.core.hookspecs import PROJECT, NvilaHookSpecs
from nvila.core.registry import Registry

log = logging.getLogger(__name__)
GROUP = "nvila"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin distribution that could not be loaded, and why."""

    distribution: str
    version: str
    entry_point: str
    error: str

    def __str__(self) -> str:
        return (f"plugin '{self.entry_point}' from {self.distribution} {self.version} was not loaded: "
                f"{self.error}")


@dataclass
class LoadedPlugins:
    """The outcome of loading: the registry of components, and the plugins that failed."""

    registry: Registry
    failures: list[PluginFailure] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)


def _env_list(name: str) -> list[str]:
    return [p.strip() for p in os.environ.get(name, "").split(",") if p.strip()]


def _unique(eps: Iterable[EntryPoint]) -> list[EntryPoint]:
    """Entry points once each (an editable install can list its distribution twice)."""
    seen, out = set(), []
    for ep in eps:
        key = (ep.dist.name if ep.dist else "", ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            out.append(ep)
    # nvila's own built-ins first: a third-party package can add names, never shadow a built-in one
    return sorted(out, key=lambda ep: (ep.dist is None or ep.dist.name != "nvila", ep.name))


def load_plugins(strict: bool | None = None, disabled: Iterable[str] | None = None) -> LoadedPlugins:
    """Load every ``nvila`` entry point into a fresh registry; failures are recorded, not fatal."""
    strict = os.environ.get("NVILA_STRICT_PLUGINS", "") not in ("", "0") if strict is None else strict
    blocked = set(_env_list("NVILA_DISABLE_PLUGINS") if disabled is None else disabled)
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(NvilaHookSpecs)
    loaded = LoadedPlugins(Registry())

    for ep in _unique(entry_points(group=GROUP)):
        dist = ep.dist.name if ep.dist else "(unknown distribution)"
        version = ep.dist.version if ep.dist else "?"
        if ep.name in blocked or dist in blocked:
            pm.set_blocked(ep.name)
            loaded.blocked.append(ep.name)
            continue
        try:
            _load_one(pm, ep, loaded.registry, dist, version)
        except Exception as exc:  # a broken third-party plugin must not take nvila down
            failure = PluginFailure(dist, version, ep.name, f"{type(exc).__name__}: {_one_line(exc)}")
            if strict:
                raise PluginLoadError(f"{failure} (NVILA_STRICT_PLUGINS is set, so this is fatal)") from exc
            log.warning("%s. Set NVILA_DISABLE_PLUGINS=%s to silence this, or NVILA_STRICT_PLUGINS=1 to "
                        "make it fatal.", str(failure).rstrip("."), ep.name)
            loaded.failures.append(failure)
    return loaded


def _load_one(pm: pluggy.PluginManager, ep: EntryPoint, registry: Registry, dist: str, version: str) -> None:
    """Import, validate and register one plugin; on any failure the manager and registry are unchanged."""
    module = ep.load()
    pm.register(module, name=ep.name)
    try:
        pm.check_pending()  # turns a mistyped hook name into an error
        caller = pm.subset_hook_caller(
            "nvila_register", remove_plugins=[p for p in pm.get_plugins() if p is not module])
        registrar = registry.registrar(dist, version)
        caller(registry=registrar)
        registrar.commit()
    except Exception:
        pm.unregister(name=ep.name)
        raise


def _one_line(exc: Exception) -> str:
    """An error on one line, so `nvila plugins` and the log show one line per failed plugin."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


@functools.cache
def default_plugins() -> LoadedPlugins:
    """The process-wide plugin set, loaded once on first use."""
    return load_plugins()


def default_registry() -> Registry:
    return default_plugins().registry
