"""One typed result record for every measured figure: ``nvila bench``'s suites and ``nvila sweep`` alike.

A :class:`Record` is one configuration of one suite: what describes it (``settings``), what was measured
(``metrics``, each a value with its unit), which other configuration of the same run it is compared with
(``baseline``) and the ratios against it, whether it ran (``status``) and notes. Ratios are *gains*: how
many times better than the baseline, so that above 1 is always better (the baseline's value over this one's
where less is better, as for memory, time and tokens; this one's over the baseline's where more is better,
as for throughput).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Better = Literal["lower", "higher"]
Status = Literal["ok", "skipped", "failed"]


@dataclass
class Metric:
    """One measured value with its unit."""

    value: float | int | None
    """The figure; None where it could not be measured; NaN where it does not apply."""
    unit: str = ""
    """``ms``, ``MB``, ``tokens/s``, ...; empty for counts and ratios."""
    better: Better | None = None
    """Which direction is better; None for figures that are described, not compared (parameter counts)."""
    format: str = "{:g}"
    """How the value is written in Markdown: a ``str.format`` pattern, or ``millions`` (``6.1M``)."""

    def text(self) -> str:
        """The value as a table cell: empty when missing, ``n/a`` when NaN."""
        if self.value is None:
            return ""
        if isinstance(self.value, float) and math.isnan(self.value):
            return "n/a"
        if self.format == "millions":
            return f"{self.value / 1e6:.1f}M"
        return self.format.format(self.value)


@dataclass
class Record:
    """One configuration's results."""

    suite: str
    """The suite (``peft``, ``prefill``, ``sweep``...) that measured it."""
    configuration: str
    """Its name, unique within the suite."""
    metrics: dict[str, Metric] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    """What the configuration is (batch size, precision, grid values...), as plain JSON values."""
    baseline: str | None = None
    """The configuration of the same run it is compared with; None for a baseline itself."""
    ratios: dict[str, float] = field(default_factory=dict)
    """Gains against the baseline per metric name (above 1 is better); filled by :func:`compare`."""
    status: Status = "ok"
    notes: list[str] = field(default_factory=list)
    group: str = ""
    """Records of one suite with different metrics go in separate tables, one per group (``pipeline``, ``packing``)."""

    def value(self, metric: str) -> float | int | None:
        found = self.metrics.get(metric)
        return None if found is None else found.value

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (NaN becomes null: JSON has no NaN)."""
        out = asdict(self)
        for metric in out["metrics"].values():
            if isinstance(metric["value"], float) and not math.isfinite(metric["value"]):
                metric["value"] = None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        fields = dict(data)
        fields["metrics"] = {name: Metric(**m) for name, m in fields.get("metrics", {}).items()}
        return cls(**fields)


def gain(metric: Metric, baseline: Metric) -> float | None:
    """How many times better ``metric`` is than ``baseline`` (above 1 is better); None when not comparable."""
    if metric.better is None or metric.value is None or baseline.value is None:
        return None
    value, base = float(metric.value), float(baseline.value)
    if not (math.isfinite(value) and math.isfinite(base)) or value <= 0 or base <= 0:
        return None
    return base / value if metric.better == "lower" else value / base


def compare(records: Iterable[Record], metrics: Sequence[str]) -> None:
    """Fill each record's ``ratios`` for ``metrics`` against its baseline, where both were measured."""
    records = list(records)
    by_name = {r.configuration: r for r in records if r.status == "ok"}
    for record in records:
        base = by_name.get(record.baseline) if record.baseline and record.status == "ok" else None
        if base is None or base is record:
            continue
        for name in metrics:
            if name in record.metrics and name in base.metrics:
                found = gain(record.metrics[name], base.metrics[name])
                if found is not None:
                    record.ratios[name] = round(found, 4)
