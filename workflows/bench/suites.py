"""The table of benchmark suites (``nvila bench SUITE``) and the function that runs one into a report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nvila.core.errors import NvilaError
from nvila.core.registry import did_you_mean
from nvila.workflows.bench import attention, data, prefill, quant, serving, training
from nvila.workflows.bench.measure import torch_threads
from nvila.workflows.bench.report import Report, write_report
from nvila.workflows.bench.runner import BenchOptions, BenchRun, SuiteFunction


@dataclass(frozen=True)
class Suite:
    """One ``nvila bench`` suite."""

    run: SuiteFunction
    summary: str
    compare: tuple[str, ...] = ()
    """Metrics whose gains against each row's baseline are reported."""
    check: Callable[[], None] | None = None
    """Raises NvilaError when this machine cannot run the suite (before anything runs)."""


SUITES: dict[str, Suite] = {
    **{name: Suite(training.run_training_suite, training.SUMMARIES[name], training.COMPARE,
                   training.require_fp8_gpu if name == "fp8" else None)
       for name in training.TRAINING_SUITES if name != "qlora"},
    "data": Suite(data.run_data_suite, data.SUMMARY, data.COMPARE),
    "prefill": Suite(prefill.run_prefill_suite, prefill.SUMMARY, prefill.COMPARE),
    "serve": Suite(serving.run_serving_suite, serving.SUMMARY, serving.COMPARE),
    "quant-ttft": Suite(quant.run_ttft_suite, quant.TTFT_SUMMARY, ("time to first token", "vision tower",
                                                                    "LLM prefill")),
    "quant-decode": Suite(quant.run_decode_suite, quant.DECODE_SUMMARY, ("decode", "LLM weight bytes")),
    "quant-peer": Suite(quant.run_peer_suite, quant.PEER_SUMMARY, ("visual tokens", "time to first token", "decode")),
    "quant-quality": Suite(quant.run_quality_suite, quant.QUALITY_SUMMARY, ("top-1 agreement",
                                                                            "relative logit error")),
    "attention": Suite(attention.run_attention_suite, attention.SUMMARY, attention.COMPARE, attention.require_kernel),
    "qlora": Suite(quant.run_qlora_suite, quant.QLORA_SUMMARY, (*training.COMPARE, "training state")),
}


def run_bench(suite: str, options: BenchOptions | None = None) -> Report:
    """Run a suite, printing each configuration as it finishes; write ``OUT/SUITE.md`` and ``OUT/SUITE.json``
    when ``options.out`` is set. Raises NvilaError (after writing the report) when a configuration failed."""
    options = options or BenchOptions()
    if suite not in SUITES:
        raise NvilaError(f"No benchmark suite '{suite}'.{did_you_mean(suite, list(SUITES))} "
                         f"Suites: {', '.join(SUITES)}.")
    definition = SUITES[suite]
    if definition.check is not None:
        definition.check()
    with torch_threads(options.threads):
        bench = BenchRun(suite, options, definition.compare, summary=definition.summary)
        definition.run(bench)
        report = bench.report()
    # the files first: a closed pipe (nvila bench ... | head) must not lose the report
    paths = write_report(report, Path(options.out)) if options.out else None
    print()
    print(report.markdown(), flush=True)
    if paths:
        print(f"Report: {paths['markdown']}, {paths['json']}", flush=True)
    failed = [r.configuration for r in report.records if r.status == "failed"]
    if failed:
        raise NvilaError(f"{len(failed)} configuration(s) of `nvila bench {suite}` failed: {'; '.join(failed)} "
                         "(see the notes column).")
    return report
