"""One writer of benchmark reports: a Markdown page and a JSON file with the same content (the results table,
notes, the machine, the date and the exact command), plus the one-line form printed as each row finishes.

docs/benchmarks.md quotes these files; it never retypes their numbers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nvila.workflows.bench.machine import machine_lines
from nvila.workflows.bench.record import Metric, Record

SCHEMA = 1
GAIN_LEGEND = ("A gain is how many times better than the row named under *against*: its value over this row's "
               "where less is better (memory, time, tokens), this row's over its value where more is better "
               "(throughput). Above 1 is better.")


@dataclass
class Report:
    """Everything one benchmark run measured, with where and how."""

    suite: str
    records: list[Record]
    machine: dict[str, Any]
    command: str
    title: str = ""
    summary: str = ""
    """What the suite measures and how, in a paragraph."""
    notes: list[str] = field(default_factory=list)
    """What happened in this run (skipped rows, a gauge that fell back, ...)."""
    compare: tuple[str, ...] = ()
    """Metrics whose gains against the baseline are reported."""
    columns: tuple[str, ...] = ()
    """Metric columns in order; empty: every metric of the records, in order of appearance."""
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %z"))

    def to_json(self) -> str:
        data = {"schema": SCHEMA, "suite": self.suite, "title": self.title, "summary": self.summary,
                "date": self.date, "command": self.command, "machine": self.machine, "notes": self.notes,
                "compare": list(self.compare), "columns": list(self.columns),
                "records": [r.to_dict() for r in self.records]}
        return json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Report:
        data = json.loads(text)
        return cls(suite=data["suite"], records=[Record.from_dict(r) for r in data["records"]],
                   machine=data["machine"], command=data["command"], title=data.get("title", ""),
                   summary=data.get("summary", ""), notes=data.get("notes", []),
                   compare=tuple(data.get("compare", ())), columns=tuple(data.get("columns", ())), date=data["date"])

    def markdown(self, title: bool = True, first_column: str = "configuration", units: bool = True,
                 notes_column: str = "notes", status: bool | None = None, notes: bool | None = None) -> str:
        """The report as Markdown: title, summary, results table (one per group of records), notes, machine and
        command.

        Without ``title`` the page opens with the table (``nvila sweep``'s results.md).
        """
        parts = []
        if title:
            parts.append(f"# {self.title or 'nvila bench ' + self.suite}")
            if self.summary:
                parts.append(self.summary)
        groups = list(dict.fromkeys(r.group for r in self.records)) or [""]
        for group in groups:
            if len(groups) > 1:
                parts.append(f"### {group or 'other'}")
            parts.append(markdown_table([r for r in self.records if r.group == group], self.compare, self.columns,
                                        first_column, units, notes_column, status, notes))
        below = list(self.notes)
        if any(r.ratios for r in self.records):
            below.append(GAIN_LEGEND)
        if not title and self.summary:
            below.insert(0, self.summary)
        if below:
            parts.append("\n".join(f"- {n}" for n in below))
        parts.append("## Measured on\n\n" + "\n".join([f"- date: {self.date}", f"- command: `{self.command}`",
                                                       *machine_lines(self.machine)]))
        return "\n\n".join(parts) + "\n"


def write_report(report: Report, out: str | Path, stem: str | None = None, **markdown_options: Any) -> dict[str, Path]:
    """``OUT/STEM.md`` and ``OUT/STEM.json`` (STEM: the suite's name)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or report.suite
    paths = {"markdown": out / f"{stem}.md", "json": out / f"{stem}.json"}
    paths["markdown"].write_text(report.markdown(**markdown_options))
    paths["json"].write_text(report.to_json())
    return paths


def _cell(value: Any) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _header(name: str, metric: Metric | None, units: bool) -> str:
    return f"{name} ({metric.unit})" if units and metric is not None and metric.unit else name


def markdown_table(records: Sequence[Record], compare: Sequence[str] = (), columns: Sequence[str] = (),
                   first_column: str = "configuration", units: bool = True, notes_column: str = "notes",
                   status: bool | None = None, notes: bool | None = None) -> str:
    """Records as one Markdown table: name, status, settings, metrics, baseline and gains, notes. The status
    and notes columns show when asked (True), or by default (None) when a row did not run or has notes."""
    settings = list(dict.fromkeys(k for r in records for k in r.settings))
    metrics: dict[str, Metric | None] = {name: None for name in columns}
    for record in records:
        for name, metric in record.metrics.items():
            if metrics.get(name) is None:
                metrics[name] = metric
    gains = [name for name in compare if any(name in r.ratios for r in records)]
    against = any(r.baseline for r in records)
    show_status = status if status is not None else any(r.status != "ok" for r in records)
    show_notes = notes if notes is not None else any(r.notes for r in records)
    header = [first_column, *(["status"] if show_status else []), *settings,
              *(_header(n, m, units) for n, m in metrics.items()), *(["against"] if against else []),
              *(f"{name} gain" for name in gains), *([notes_column] if show_notes else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in records:
        cells = [r.configuration, *([r.status] if show_status else []), *(r.settings.get(k) for k in settings),
                 *(r.metrics[n].text() if n in r.metrics else "" for n in metrics),
                 *([r.baseline if r.baseline and r.baseline != r.configuration else ""] if against else []),
                 *(f"{r.ratios[n]:.2f}×" if n in r.ratios else "" for n in gains),
                 *(["; ".join(r.notes)] if show_notes else [])]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def format_line(record: Record, position: int | None = None, total: int | None = None) -> str:
    """One finished configuration as one printed line, for progress as a suite runs."""
    where = f"[{position}/{total}] " if position and total else f"[{position}] " if position else ""
    if record.status != "ok":
        return f"{where}{record.configuration}: {record.status}" + (f" ({'; '.join(record.notes)})"
                                                                    if record.notes else "")
    shown = ", ".join(f"{name} {m.text()}{' ' + m.unit if m.unit else ''}" for name, m in record.metrics.items()
                      if m.value is not None)
    line = f"{where}{record.configuration}: {shown}"
    if record.ratios:
        line += f"; against {record.baseline}: " + ", ".join(f"{n} {g:.2f}×" for n, g in record.ratios.items())
    return line
