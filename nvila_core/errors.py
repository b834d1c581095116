"""User-facing errors: one paragraph that says what was wrong and what to do."""


class NvilaError(Exception):
    """An error caused by the user's input (spec, data, plugin), shown without a traceback."""


class SpecError(NvilaError):
    """A component spec that does not match its plugin's config; lists every problem at once."""

    def __init__(self, kind: str, name: str | None, problems: list[str], hint: str | None = None):
        self.kind, self.name, self.problems = kind, name, problems
        where = f"{kind} '{name}'" if name else kind
        lines = "\n".join(f"  - {p}" for p in problems)
        hint = hint or f"Run `nvila plugins --describe {name or '<name>'}` to see the valid keys."
        super().__init__(
            f"Invalid {where} spec ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n{lines}\n{hint}"
        )


class PluginLoadError(NvilaError):
    """A plugin failed to load or register (raised by the loader only in strict mode), or a lazily registered
    factory failed to import when its component was first built."""
