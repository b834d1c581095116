"""``nvila bench attention`` measures both kernels at each shape and refuses to run where nvila's cannot.

These check that the measuring code works, not how fast anything is (the figures are in docs/benchmarks.md)."""

import io

import pytest

from nvila.core.errors import NvilaError
from nvila.plugins import attention
from nvila.workflows.bench import SUITES, BenchOptions, BenchRun
from nvila.workflows.bench import attention as ba
from nvila.workflows.bench import quant as bq
from nvila.workflows.bench.machine import describe_machine


def run_of(**options) -> BenchRun:
    return BenchRun("attention", BenchOptions(**options), SUITES["attention"].compare, machine=describe_machine(),
                    device="cpu", stream=io.StringIO())


@pytest.mark.skipif(attention.PREFILL_KERNEL.missing() is not None, reason="nvila's prefill attention kernel")
def test_the_suite_times_both_kernels_side_by_side_with_their_error():
    SUITES["attention"].check()
    bench = run_of()
    shapes = {"tiny tile": ba.Shape(2, 2, 40, 72, causal=False), "tiny prompt": ba.Shape(4, 2, 40, 64, causal=True)}
    ba.run_attention_suite(bench, shapes, repeats=1, limits=bq.machine_limits(1, copy_mib=8, matmul=(64, 128, 128)))
    rows = {r.configuration: r for r in bench.records}
    assert list(rows) == ["machine limits", "tiny tile, torch sdpa", "tiny tile, nvila", "tiny prompt, torch sdpa",
                          "tiny prompt, nvila"]
    for name in ("tiny tile, nvila", "tiny prompt, nvila"):
        record = rows[name]
        assert record.baseline == name.replace("nvila", "torch sdpa")
        assert record.metrics["attention"].value > 0 and record.metrics["throughput"].value > 0
        assert 0 <= record.metrics["max error"].value < 0.05  # bf16 rounding, not a wrong answer
    assert "attention" in bench.report().markdown()
    assert "1 timed rounds" in " ".join(bench.notes)


@pytest.mark.skipif(attention.PREFILL_KERNEL.missing() is not None, reason="nvila's prefill attention kernel")
def test_rounds_asked_for_replace_the_suites_own():
    bench = run_of(rounds=2)
    shapes = {"tiny tile": ba.Shape(1, 1, 20, 8, causal=False)}
    ba.run_attention_suite(bench, shapes, repeats=5, limits=bq.machine_limits(1, copy_mib=8, matmul=(64, 128, 128)))
    assert "2 timed rounds" in " ".join(bench.notes)


def test_the_suite_refuses_a_machine_without_the_kernel_saying_what_it_lacks(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(NvilaError, match="the kernel cannot run here: .*(no C\\+\\+ compiler|AVX)"):
        SUITES["attention"].check()
