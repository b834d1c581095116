"""One benchmark run as it happens: the suite adds each configuration's record the moment it finishes, and
the run prints it at once, compares it with its baseline, and in the end makes the report."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from nvila.core.errors import NvilaError
from nvila.workflows.bench.machine import command_line, describe_machine
from nvila.workflows.bench.record import Record, compare
from nvila.workflows.bench.report import Report, format_line


@dataclass
class BenchOptions:
    """What ``nvila bench SUITE`` was asked for."""

    out: str | Path | None = None
    """Folder for ``SUITE.md`` and ``SUITE.json``; None prints the report only."""
    only: Sequence[str] = ()
    """Run only the configurations whose name contains one of these texts (case-insensitive)."""
    include_slow_bf16: bool = False
    """On a CPU without bf16 hardware, run the bf16 configurations (last) instead of skipping them."""
    threads: int | None = None
    """torch intra-op threads for the measuring processes; None leaves torch's default."""
    rounds: int | None = None
    """Timed rounds of the suites that keep the best round (quant-ttft, quant-decode, quant-peer, attention): more
    on a noisy shared machine, where other tenants only ever add time; None keeps each suite's own."""
    command: str | None = None
    """The command line, as the report records it; None reads ``sys.argv``."""
    ckpt: str | None = None
    """A trained checkpoint to measure instead of random weights (``quant-quality``)."""
    calib: str | None = None
    """Shards to calibrate quantizers on (``quant-quality``)."""
    held_out: str | None = None
    """Held-out shards to compare answers on (``quant-quality``)."""


class BenchRun:
    """Collects one suite's records as they finish, printing each as a line."""

    def __init__(self, suite: str, options: BenchOptions | None = None, compare: Sequence[str] = (),
                 title: str = "", summary: str = "", machine: dict[str, Any] | None = None,
                 device: str | None = None, stream: TextIO | None = None) -> None:
        self.suite, self.options = suite, options or BenchOptions()
        self.compare, self.title, self.summary = tuple(compare), title, summary
        self.machine = machine if machine is not None else describe_machine()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.stream = stream
        self.records: list[Record] = []
        self.notes: list[str] = []
        self.total: int | None = None

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    @property
    def slow_bf16(self) -> bool:
        """bf16 runs emulated here: a CPU run on a CPU without bf16 units (AVX2-only, for example)."""
        return self.device == "cpu" and not self.machine.get("bf16_hardware", False)

    def selected(self, names: Sequence[str]) -> list[str]:
        """The configurations ``--only`` keeps (all when it is empty), in order; refuses a filter that keeps none."""
        wanted = [w.lower() for w in self.options.only]
        kept = [n for n in names if not wanted or any(w in n.lower() for w in wanted)]
        if not kept:
            raise NvilaError(f"--only {' '.join(self.options.only)} matches no configuration of `nvila bench "
                             f"{self.suite}`; its configurations: {'; '.join(names)}.")
        self.total = len(kept)
        return kept

    def rounds(self, default: int) -> int:
        """Timed rounds for this run: ``--rounds`` when given, else the suite's ``default``."""
        return self.options.rounds or default

    def note(self, text: str) -> None:
        """A note for the report, printed at once too."""
        self.notes.append(text)
        self._print(f"note: {text}")

    def add(self, record: Record) -> Record:
        """Record a finished configuration: compare it with its baseline (if that ran already) and print it."""
        self.records.append(record)
        compare(self.records, self.compare)
        self._print(format_line(record, len(self.records), self.total))
        return record

    def order(self, names: Sequence[str]) -> None:
        """Put the records in the suite's order for the report (they may have run in another)."""
        rank = {name: i for i, name in enumerate(names)}
        self.records.sort(key=lambda r: rank.get(r.configuration, len(rank)))

    def report(self) -> Report:
        compare(self.records, self.compare)
        return Report(self.suite, list(self.records), self.machine, self.options.command or command_line(),
                      title=self.title, summary=self.summary, notes=list(self.notes), compare=self.compare)


SuiteFunction = Callable[[BenchRun], None]
