"""The hooks a plugin package implements. All hooks carry the ``nvila_`` prefix."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from nvila.core.registry import Registrar

PROJECT = "nvila"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class NvilaHookSpecs:
    """Hook specifications; a plugin module implements them as functions marked ``@hookimpl``."""

    @hookspec
    def nvila_register(self, registry: Registrar) -> None:
        """Register this plugin's components: ``registry.add("compressor", "stc", factory, STCConfig)``, where
        ``factory`` is the callable itself or ``lazy("module", "Name")``, imported on the first build."""
