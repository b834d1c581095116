"""The component registry and the typed registrar that plugins receive."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.util
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from nvila.core.errors import NvilaError, PluginLoadError

KINDS: dict[str, str] = {
    "encoder": "pixels -> feature grids; owns its preprocessing",
    "compressor": "feature grid -> fewer visual tokens",
    "temporal": "video frames -> fewer frames (temporal compression)",
    "projector": "vision width -> language-model width",
    "llm": "the language backbone",
    "pruner": "scores training samples and keeps a fraction",
    "precision": "how weights and activations are stored and computed",
    "quantizer": "inference-time quantization of one part of a trained model",
}
TEMPORAL_STAGES = ("after-encoder", "after-compressor", "after-projector")
"""Where a temporal compressor can act on a video's frames: on the encoder's feature blocks, on the
spatially compressed tokens, or on the projected tokens in language-model width (NVILA). Kept here, beside
the kinds, rather than in ``interfaces`` (which imports torch), so that configs can check it torch-free."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(frozen=True)
class LazyFactory:
    """A factory named by its module and attribute, imported on the first build, not at registration.

    A plugin registers ``lazy("nvila.encoders.siglip", "SiglipEncoder")`` so that listing and describing
    components (``nvila plugins``) reads configs only and never imports torch or transformers. This is
    Python written in a plugin's own code; specs and recipes still never name import paths.
    """

    module: str
    attribute: str

    def __post_init__(self) -> None:
        for part in (self.module, self.attribute):
            if not isinstance(part, str) or not _DOTTED.match(part):
                raise NvilaError(f"lazy({self.module!r}, {self.attribute!r}): give a module's dotted import name "
                                 "and an attribute name, e.g. lazy('my_plugin.pool', 'AveragePool').")

    def load(self) -> Callable[..., Any]:
        """Import the module and return the attribute (Python caches the module after the first time)."""
        return getattr(importlib.import_module(self.module), self.attribute)

    def __str__(self) -> str:
        return f"{self.module}.{self.attribute}"


def lazy(module: str, attribute: str) -> LazyFactory:
    """A factory imported on first use: ``registry.add(kind, name, lazy("pkg.mod", "Factory"), Config)``."""
    return LazyFactory(module, attribute)


@dataclass(frozen=True)
class Component:
    """One registered factory: ``factory(config, **context)`` builds the component.

    ``source`` is what the plugin registered: the factory itself, or a :class:`LazyFactory` that
    :attr:`factory` imports on first use (and then keeps).
    """

    kind: str
    name: str
    source: Callable[..., Any] | LazyFactory
    config: type
    distribution: str
    version: str
    given_summary: str | None = None
    """The one-line summary passed to ``registry.add(..., summary=...)``, if any."""

    @property
    def origin(self) -> str:
        """``compressor 'tome' from nvila-tome 0.1.0``: how errors name a component and who provides it."""
        return f"{self.kind} '{self.name}' from {self.distribution} {self.version}"

    @property
    def is_lazy(self) -> bool:
        return isinstance(self.source, LazyFactory)

    @functools.cached_property
    def factory(self) -> Callable[..., Any]:
        """The callable that builds the component; a lazy one is imported here, once."""
        if not isinstance(self.source, LazyFactory):
            return self.source
        try:
            factory = self.source.load()
        except Exception as exc:  # ImportError, AttributeError, or whatever the module raises on import
            raise PluginLoadError(
                f"{self.origin} could not be built: importing its factory {self.source} failed with "
                f"{type(exc).__name__}: {exc}. Reinstall {self.distribution}, or check that its dependencies "
                "are installed."
            ) from exc
        if not callable(factory):
            raise PluginLoadError(f"{self.origin} could not be built: its factory {self.source} is {factory!r}, "
                                  f"which is not callable. Report this to the authors of {self.distribution}.")
        return factory

    @property
    def summary(self) -> str:
        """One line for ``nvila plugins``: the summary given at registration, else the first line of the
        factory's docstring (when it was registered as the object itself), else of the config's docstring.
        A lazy factory is never imported for its summary."""
        if self.given_summary:
            doc = self.given_summary
        elif self.is_lazy:
            doc = self.config.__doc__ or ""
        else:
            doc = self.source.__doc__ or self.config.__doc__ or ""
        doc = doc.strip()
        return doc.splitlines()[0] if doc else ""


def did_you_mean(word: str, choices: list[str]) -> str:
    """' Did you mean 'x'?' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry:
    """All components by (kind, name), with the distribution that provides each."""

    def __init__(self) -> None:
        self._components: dict[tuple[str, str], Component] = {}

    def get(self, kind: str, name: str) -> Component:
        """The component ``name`` of ``kind``; a clear error lists the valid names otherwise."""
        if kind not in KINDS:
            raise NvilaError(f"Unknown component kind '{kind}'.{did_you_mean(kind, list(KINDS))} "
                             f"Kinds: {', '.join(KINDS)}.")
        try:
            return self._components[(kind, name)]
        except KeyError:
            names = self.names(kind)
            raise NvilaError(
                f"Unknown {kind} '{name}'.{did_you_mean(name, names)} "
                f"Registered {kind}s: {', '.join(names) or '(none)'}. "
                "Run `nvila plugins` to list every component, or install the package that provides it."
            ) from None

    def find(self, name: str) -> list[Component]:
        """Every component called ``name``, whatever its kind."""
        return [c for (_, n), c in self._components.items() if n == name]

    def names(self, kind: str) -> list[str]:
        return sorted(n for (k, n) in self._components if k == kind)

    def __iter__(self) -> Iterator[Component]:
        return iter(sorted(self._components.values(), key=lambda c: (c.kind, c.name)))

    def __len__(self) -> int:
        return len(self._components)

    def registrar(self, distribution: str, version: str) -> Registrar:
        return Registrar(self, distribution, version)

    def _commit(self, components: list[Component]) -> None:
        for c in components:
            self._components[(c.kind, c.name)] = c


class Registrar:
    """What a plugin's ``nvila_register`` hook receives: it adds that plugin's components.

    Additions are staged and committed together, so a plugin whose hook fails half-way
    leaves nothing behind.
    """

    def __init__(self, registry: Registry, distribution: str, version: str) -> None:
        self._registry, self.distribution, self.version = registry, distribution, version
        self._staged: list[Component] = []

    def add(self, kind: str, name: str, factory: Callable[..., Any] | LazyFactory, config: type,
            summary: str | None = None) -> None:
        """Register ``factory(config_instance, **context)`` as ``kind`` ``name``, configured by ``config``.

        ``factory`` is the callable itself, or ``lazy("module", "Attribute")`` to import it only when the
        component is first built. ``summary`` is the line ``nvila plugins`` shows (default: the factory's
        docstring for a callable, the config's for a lazy factory).
        """
        if kind not in KINDS:
            raise NvilaError(f"cannot register {name!r}: unknown kind {kind!r}.{did_you_mean(kind, list(KINDS))}"
                             f" Kinds: {', '.join(KINDS)}.")
        if not _NAME.match(name):
            raise NvilaError(f"cannot register {kind} {name!r}: names are lower-case kebab-case ('my-compressor').")
        if not dataclasses.is_dataclass(config) or not isinstance(config, type):
            raise NvilaError(f"cannot register {kind} {name!r}: its config must be a dataclass type, got {config!r}.")
        if isinstance(factory, LazyFactory):
            if not _module_exists(factory.module):
                raise NvilaError(f"cannot register {kind} {name!r}: the module of its lazy factory {factory} "
                                 "is not installed.")
        elif not callable(factory):
            raise NvilaError(f"cannot register {kind} {name!r}: factory {factory!r} is not callable.")
        existing = self._registry._components.get((kind, name)) or next(
            (c for c in self._staged if (c.kind, c.name) == (kind, name)), None)
        if existing is not None:
            raise NvilaError(
                f"{kind} '{name}' is registered twice: by {existing.distribution} {existing.version} and by "
                f"{self.distribution} {self.version}. Uninstall one, or block one with NVILA_DISABLE_PLUGINS."
            )
        self._staged.append(Component(kind, name, factory, config, self.distribution, self.version, summary))

    def commit(self) -> None:
        self._registry._commit(self._staged)
        self._staged = []


def _module_exists(module: str) -> bool:
    """Whether ``module`` can be imported, found without running it (its parent packages do get imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
