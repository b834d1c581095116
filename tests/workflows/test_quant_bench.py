"""The quantized-inference suites run end to end at the demo size and report every figure with its target.

These check that the measuring code works, not how fast anything is (the figures are in docs/benchmarks.md)."""

import pytest

from nvila.workflows import quant_bench as qb


@pytest.fixture(scope="module")
def limits():
    return qb.machine_limits(repeats=1, copy_mib=8, matmul=(64, 128, 128))


def test_machine_limits_measure_bandwidth_and_peak_per_dtype(limits):
    found, rows = limits
    assert found.bandwidth > 0 and set(found.peak) == {"fp32", "bf16", "int8"}
    assert [r.metric for r in rows][0] == "memory bandwidth (read + write)"


def test_time_to_first_token_compares_every_configuration(limits):
    rows = qb.time_to_first_token("demo", images=[(96, 64)], repeats=1, limits=limits[0])
    cases = {r.case for r in rows if r.metric == "time to first token"}
    assert cases == {f"demo 96x64 {c}" for c in qb.TTFT_CONFIGS}
    speedups = [r for r in rows if r.metric == "time to first token, speed-up"]
    assert {r.case for r in speedups} >= {"demo 96x64 w8a8 vs fp32", "demo 96x64 deployed vs bf16"}


def test_decode_reports_tokens_per_second_bytes_and_targets(limits):
    rows = qb.decode("demo", tokens=2, repeats=1, limits=limits[0])
    by = {(r.case, r.metric): r for r in rows}
    assert by[("demo w4a16 vs bf16", "weight bytes")].target == "≤ 30 %"
    assert by[("demo w4a16", "decode")].value > 0


def test_the_peer_is_llava_onevision_with_the_same_widths(limits):
    rows = qb.peer("demo", images=[(128, 128)], tokens=2)
    by = {(r.case, r.metric): r for r in rows}
    peer_tokens = by[("demo 128x128 llava-onevision bf16", "visual tokens")].value
    assert by[("demo 128x128 nvila deployed", "visual tokens")].value < peer_tokens
    assert by[("demo 128x128 nvila deployed vs peer", "time to first token, speed-up")].target == "≥ 1.6×"


def test_quality_compares_awq_and_round_to_nearest(synth_data):
    rows = qb.quality(str(synth_data / "train"), str(synth_data / "val"), size="demo",
                      configs=("w4a16 awq", "w4a16 rtn"), calib_samples=4, samples=2)
    metrics = {(r.case, r.metric) for r in rows}
    assert ("demo w4a16 awq", "next-token top-1 agreement") in metrics
    assert ("demo w4a16 awq vs rtn", "top-1 agreement, AWQ minus RTN") in metrics
    assert "| quality |" in qb.markdown(rows)


def test_nvila_8b_peft_over_a_w4a16_language_model_counts_half_the_training_state():
    rows = {r.case: r.value for r in qb.qlora_count()}
    assert 17 < rows["nvila-8b stages/peft, frozen weights bf16"] < 18  # as tests/workflows/test_recipes.py counts
    assert rows["nvila-8b stages/peft, frozen LLM linears W4A16"] < 9
