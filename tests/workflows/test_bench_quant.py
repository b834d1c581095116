"""The quantization suites of ``nvila bench`` (``quant-ttft``, ``quant-decode``, ``quant-peer``, ``quant-quality``,
``qlora``) run end to end at the demo size and report every figure, with each target of issue 13 in its row's notes.

These check that the measuring code works, not how fast anything is (the figures are in docs/benchmarks.md)."""

import io

import pytest

from nvila.quant import int4_cpu
from nvila.workflows.bench import SUITES, BenchOptions, BenchRun
from nvila.workflows.bench import quant as bq
from nvila.workflows.bench.machine import describe_machine
from nvila.workflows.bench.training import TRAINING_SUITES, run_configuration

TOY_SIZES = {
    "encoder_overrides": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                          "num_layers": 1, "num_heads": 2},
    "llm_overrides": {"hidden_size": 128, "intermediate_size": 256, "num_layers": 1, "num_heads": 2,
                      "num_kv_heads": 1},
}


def run_of(suite: str, **options) -> BenchRun:
    return BenchRun(suite, BenchOptions(**options), SUITES[suite].compare, machine=describe_machine(), device="cpu",
                    stream=io.StringIO())


@pytest.fixture(scope="module")
def limits():
    return bq.machine_limits(repeats=1, copy_mib=8, matmul=(64, 128, 128))


def records(bench):
    return {r.configuration: r for r in bench.records}


def test_machine_limits_measure_bandwidth_and_peak_per_dtype(limits):
    assert limits.bandwidth > 0 and set(limits.peak) == {"fp32", "bf16", "int8"}


@pytest.mark.bf16
def test_time_to_first_token_compares_every_configuration(limits):
    bench = run_of("quant-ttft")
    bq.run_ttft_suite(bench, sizes=("demo",), images=[(96, 64)], repeats=1, limits=limits)
    found = records(bench)
    assert set(found) == {"machine limits", *(f"demo 96x64 {c}" for c in bq.TTFT_CONFIGS)}
    assert found["machine limits"].group == bq.LIMITS_GROUP
    w8a8 = found["demo 96x64 w8a8"]
    assert w8a8.baseline == "demo 96x64 fp32" and w8a8.ratios["time to first token"] > 0
    assert found["demo 96x64 deployed"].baseline == "demo 96x64 bf16"
    assert any(n.startswith("against fp32") for n in found["demo 96x64 deployed"].notes)
    if bq.A8_RUNS:  # the whole prefill in int8: its LLM prefill against the int8 limit, beside the target
        a8 = found[f"demo 96x64 {bq.DEPLOYED_A8}"]
        assert a8.baseline == "demo 96x64 bf16" and bq.DEPLOYED_A8_NOTE in a8.notes
        assert a8.value("LLM prefill, share of the int8 limit") > 0
    assert "# nvila bench quant-ttft" in bench.report().markdown()


def test_decode_reports_tokens_per_second_bytes_and_targets(limits):
    bench = run_of("quant-decode")
    bq.run_decode_suite(bench, sizes=("demo",), tokens=2, repeats=1, limits=limits,
                        configs=("fp32", "bf16", "w4a16", "w4a16-torch"), contexts=(bq.TEXT, (96, 64)))
    found = records(bench)
    after_image = found["demo 96x64 w4a16"]
    assert after_image.baseline in ("demo 96x64 fp32", "demo 96x64 bf16") and after_image.value("decode") > 0
    assert after_image.settings["context tokens"] > found["demo w4a16"].settings["context tokens"]
    w4a16, torch_int4 = found["demo w4a16"], found["demo w4a16-torch"]
    assert w4a16.value("decode") > 0 and w4a16.baseline in ("demo fp32", "demo bf16")
    assert any(n.startswith("target: weight bytes, % of bf16 ≤ 30 %") for n in w4a16.notes)
    assert w4a16.value("LLM weight bytes") < found["demo bf16"].value("LLM weight bytes")
    auto = "avx512_bf16" if int4_cpu.missing() is None else "cpu"
    assert w4a16.settings["kernel"] == auto and torch_int4.settings["kernel"] == "cpu"
    against_torch = [n for n in w4a16.notes if "kernel against torch's (w4a16-torch)" in n]
    assert len(against_torch) == (auto != "cpu") and torch_int4.baseline == w4a16.baseline


@pytest.mark.skipif(not bq.A8_RUNS, reason=f"int8 activations: {int4_cpu.int8_missing()}")
def test_int8_activation_rows_stand_beside_the_targets_with_their_ratio_to_16_bit_activations(limits, synth_data):
    bench = run_of("quant-decode")
    bq.run_decode_suite(bench, sizes=("demo",), tokens=2, repeats=1, limits=limits,
                        configs=("bf16", "w4a16", bq.INT8_ACTIVATIONS), contexts=(bq.TEXT,))
    a8 = records(bench)["demo w4a16-a8"]
    assert a8.settings["kernel"] == "avx512_vnni" and a8.value("decode") > 0 and bq.A8_NOTE in a8.notes
    assert any(n.startswith("against w4a16 (16-bit activations): ") for n in a8.notes)
    bench = run_of("quant-quality", calib=str(synth_data / "train"), held_out=str(synth_data / "val"))
    bq.run_quality_suite(bench, sizes={"demo": ("demo", ("w4a16 rtn", bq.A8_QUALITY, "w8a8 + w4a16 rtn",
                                                         bq.DEPLOYED_A8_QUALITY))},
                         runs={"demo": {"calib_samples": 2, "samples": 2, "eval_limit": 2}})
    found = records(bench)
    quality, deployed = found[f"demo {bq.A8_QUALITY}"], found[f"demo {bq.DEPLOYED_A8_QUALITY}"]
    assert quality.baseline == "demo w4a16 rtn" and 0 < quality.value("top-1 agreement") <= 100
    assert deployed.baseline == "demo w8a8 + w4a16 rtn" and 0 < deployed.value("top-1 agreement") <= 100


@pytest.mark.slow
def test_compiled_decode_rows_compare_with_compiled_baselines_and_report_compile_time(limits):
    bench = run_of("quant-decode")
    a8 = (bq.INT8_ACTIVATIONS + bq.COMPILED,) if bq.A8_RUNS else ()  # its int8 op compiled too
    bq.run_decode_suite(bench, sizes=("demo",), tokens=2, repeats=1, limits=limits,
                        configs=("bf16", "bf16 compiled", "w4a16 compiled", *a8), contexts=(bq.TEXT,))
    found = records(bench)
    w4a16 = found["demo w4a16 compiled"]
    assert w4a16.baseline == "demo bf16 compiled" and w4a16.value("compile (first steps)") > 0
    assert any(n.startswith("target: bandwidth share ≥ 50 %") for n in w4a16.notes)
    assert found["demo bf16 compiled"].baseline == "demo bf16"
    if a8:
        assert any(n.startswith("against w4a16 compiled (16-bit activations)") for n in found[f"demo {a8[0]}"].notes)


@pytest.mark.bf16
def test_the_peer_is_llava_onevision_with_the_same_widths():
    bench = run_of("quant-peer")
    bq.run_peer_suite(bench, sizes=("demo",), images=[(128, 128)], tokens=2, repeats=1)
    found = records(bench)
    peer = found["demo 128x128 llava-onevision bf16"]
    ours = found["demo 128x128 nvila deployed"]
    assert ours.value("visual tokens") < peer.value("visual tokens") and ours.baseline == peer.configuration
    assert any(n.startswith("target: time to first token against the peer ≥ 1.6×") for n in ours.notes)


@pytest.mark.slow  # over 5 s on an AVX2 core: the default run stays under 5 minutes; CI runs it
def test_quality_compares_awq_with_round_to_nearest(synth_data):
    bench = run_of("quant-quality", calib=str(synth_data / "train"), held_out=str(synth_data / "val"))
    bq.run_quality_suite(bench, sizes={"demo": ("demo", ("w4a16 awq", "w4a16 rtn"))},
                         runs={"demo": {"calib_samples": 4, "samples": 2, "eval_limit": 2}})
    found = records(bench)
    awq = found["demo w4a16 awq"]
    assert 0 <= awq.value("top-1 agreement") <= 100 and awq.baseline == "demo w4a16 rtn"
    assert any(n.startswith("AWQ minus round to nearest") for n in awq.notes)
    assert "relative logit error" in awq.ratios or awq.value("relative logit error") == 0


@pytest.mark.bf16
def test_quality_writes_its_own_shards_when_none_are_given():
    bench = run_of("quant-quality")
    bq.run_quality_suite(bench, sizes={"demo": ("demo", ("w8a8 vision",))},
                         runs={"demo": {"calib_samples": 2, "samples": 1, "eval_limit": 1}})
    assert records(bench)["demo w8a8 vision"].value("top-1 agreement") > 0
    assert any("synthetic shapes task" in n for n in bench.notes)


def test_nvila_8b_peft_over_a_w4a16_language_model_holds_under_half_the_training_state():
    peft, peft_trainable, _ = bq.training_state_gib(["stages/peft"])
    qlora, qlora_trainable, _ = bq.training_state_gib(["stages/peft", "stages/qlora"])
    assert 17 < peft < 18  # as tests/workflows/test_recipes.py counts it
    assert qlora < 8 and qlora_trainable == peft_trainable  # the same adapters, norms and projector train


@pytest.mark.bf16
def test_qlora_and_bf16_frozen_peft_train_side_by_side():
    names = list(TRAINING_SUITES["qlora"])
    peft, qlora = [run_configuration("qlora", name, {**TRAINING_SUITES["qlora"][name], **TOY_SIZES})
                   for name in names[:2]]
    assert qlora.baseline == peft.configuration and peft.baseline is None
    assert qlora.value("trainable params") == peft.value("trainable params")
    assert qlora.value("total params") < peft.value("total params")  # the int4 weights are buffers
    assert qlora.value("peak memory") > 0 and qlora.settings["precision"] == "bf16-mixed"


def test_an_only_filter_that_matches_nothing_is_refused(capsys):
    from nvila.workflows.commands import main

    assert main(["bench", "qlora", "--only", "no such configuration"]) == 2
    assert "matches no configuration" in capsys.readouterr().err


def test_a_value_just_short_of_its_target_shows_the_digits_that_tell_them_apart():
    assert bq.target_note("bandwidth share", 49.96, 50, " %", False).endswith("MISSED (49.96 %)")
    assert bq.target_note("decode", 2.4412, 2, "×", True).endswith("met (2.44×)")
    third = bq.target_note("visual tokens", 0.198, -1 / 3, "", True, shown="1/3")
    assert third == "target: visual tokens ≤ 1/3: met (0.198)"
