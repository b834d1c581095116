"""The component registry and the typed registrar that plugins receive."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from nvila.core.errors import NvilaError

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
_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


@dataclass(frozen=True)
class Component:
    """One registered factory: ``factory(config, **context)`` builds the component."""

    kind: str
    name: str
    factory: Callable[..., Any]
    config: type
    distribution: str
    version: str

    @property
    def origin(self) -> str:
        """``compressor 'tome' from nvila-tome 0.1.0``: how errors name a component and who provides it."""
        return f"{self.kind} '{self.name}' from {self.distribution} {self.version}"

    @property
    def summary(self) -> str:
        doc = (self.factory.__doc__ or self.config.__doc__ or "").strip()
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

    def add(self, kind: str, name: str, factory: Callable[..., Any], config: type) -> None:
        """Register ``factory(config_instance, **context)`` as ``kind`` ``name``, configured by ``config``."""
        if kind not in KINDS:
            raise NvilaError(f"cannot register {name!r}: unknown kind {kind!r}.{did_you_mean(kind, list(KINDS))}"
                             f" Kinds: {', '.join(KINDS)}.")
        if not _NAME.match(name):
            raise NvilaError(f"cannot register {kind} {name!r}: names are lower-case kebab-case ('my-compressor').")
        if not dataclasses.is_dataclass(config) or not isinstance(config, type):
            raise NvilaError(f"cannot register {kind} {name!r}: its config must be a dataclass type, got {config!r}.")
        if not callable(factory):
            raise NvilaError(f"cannot register {kind} {name!r}: factory {factory!r} is not callable.")
        existing = self._registry._components.get((kind, name)) or next(
            (c for c in self._staged if (c.kind, c.name) == (kind, name)), None)
        if existing is not None:
            raise NvilaError(
                f"{kind} '{name}' is registered twice: by {existing.distribution} {existing.version} and by "
                f"{self.distribution} {self.version}. Uninstall one, or block one with NVILA_DISABLE_PLUGINS."
            )
        self._staged.append(Component(kind, name, factory, config, self.distribution, self.version))

    def commit(self) -> None:
        self._registry._commit(self._staged)
        self._staged = []
