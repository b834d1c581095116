"""``nvila bench``: one module for every measured figure.

- :mod:`~nvila.workflows.bench.measure`: timing (best of N and median, the GPU drained) and peak memory;
- :mod:`~nvila.workflows.bench.record`: the result record (:class:`Record`, :class:`Metric`, gains);
- :mod:`~nvila.workflows.bench.report`: the Markdown and JSON writer, with the machine
  (:mod:`~nvila.workflows.bench.machine`);
- :mod:`~nvila.workflows.bench.runner`: a run that reports each configuration as it finishes;
- :mod:`~nvila.workflows.bench.models`: the one place the suites build modules and models;
- the suites: :mod:`~nvila.workflows.bench.training` (``peft``, ``peft-large``, ``memory-savers``,
  ``memory-savers-long``, ``fp8``), :mod:`~nvila.workflows.bench.data` (``data``) and
  :mod:`~nvila.workflows.bench.prefill` (``prefill``; its function
  ``nvila.workflows.bench.prefill.prefill`` is the one place every benchmark runs a prefill) and
  :mod:`~nvila.workflows.bench.serving` (``serve``: the HTTP server, batched against one request at a time) and
  :mod:`~nvila.workflows.bench.quant` (``quant-ttft``, ``quant-decode``, ``quant-peer``, ``quant-quality``:
  quantized inference; ``qlora``: PEFT over a W4A16 language model) and :mod:`~nvila.workflows.bench.attention`
  (``attention``: nvila's bf16 prefill attention kernel against torch's SDPA), tabled in
  :mod:`~nvila.workflows.bench.suites`.

``nvila sweep`` writes its results table with the same record and writer.
"""

from nvila.workflows.bench.machine import describe_machine
from nvila.workflows.bench.measure import PeakMemory, Stopwatch, Timing, time_call, time_interleaved
from nvila.workflows.bench.prefill import time_prefill
from nvila.workflows.bench.record import Metric, Record, compare
from nvila.workflows.bench.report import Report, markdown_table, write_report
from nvila.workflows.bench.runner import BenchOptions, BenchRun
from nvila.workflows.bench.suites import SUITES, run_bench

__all__ = ["SUITES", "BenchOptions", "BenchRun", "Metric", "PeakMemory", "Record", "Report", "Stopwatch", "Timing",
           "compare", "describe_machine", "markdown_table", "run_bench", "time_call", "time_interleaved",
           "time_prefill", "write_report"]
