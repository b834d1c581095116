"""``nvila bench``: records, gains, the report writer (machine included), rows printed as they finish, bf16
rows put last or skipped on CPUs without bf16 hardware, and each suite's own code run at toy sizes (the real
sizes are benchmarks; nothing here asserts a time)."""

import io
import json
import math

import pytest
import torch

from nvila.core.errors import NvilaError
from nvila.workflows.bench import SUITES, BenchOptions, BenchRun, Metric, Record, Report, compare, run_bench
from nvila.workflows.bench.machine import cpu_flags, describe_machine, has_bf16_hardware, machine_lines
from nvila.workflows.bench.report import format_line, markdown_table, write_report
from nvila.workflows.bench.suites import Suite
from nvila.workflows.bench.training import (
    TRAINING_SUITES,
    largest_fitting,
    order_configurations,
    run_configuration,
    run_training_suite,
)

TOY_SIZES = {
    "encoder_overrides": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                          "num_layers": 1, "num_heads": 2},
    "llm_overrides": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1},
}
AVX2_ONLY = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n"
AMX = "model name\t: Intel(R) Xeon(R) Platinum\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
MEMINFO = "MemTotal:       24683584 kB\nMemFree:         1000000 kB\n"


def machine(cpuinfo: str = AVX2_ONLY) -> dict:
    return describe_machine(cpuinfo=cpuinfo, meminfo=MEMINFO)


def run_of(suite: str, cpuinfo: str = AVX2_ONLY, **options) -> tuple[BenchRun, io.StringIO]:
    stream = io.StringIO()
    definition = SUITES[suite]
    return BenchRun(suite, BenchOptions(**options), definition.compare, machine=machine(cpuinfo), device="cpu",
                    stream=stream), stream


# --- records and gains ---------------------------------------------------------------------------------------------

def test_gains_come_from_side_by_side_records_and_above_one_is_better():
    base = Record("s", "base", {"memory": Metric(400.0, "MB", "lower"), "speed": Metric(100.0, "tokens/s", "higher"),
                                "params": Metric(10)})
    lean = Record("s", "lean", {"memory": Metric(100.0, "MB", "lower"), "speed": Metric(50.0, "tokens/s", "higher"),
                                "params": Metric(3)}, baseline="base")
    compare([base, lean], ["memory", "speed", "params"])
    assert lean.ratios == {"memory": 4.0, "speed": 0.5}  # params has no direction: described, not compared
    assert base.ratios == {}


def test_no_gain_against_a_baseline_that_did_not_run_or_a_value_that_is_missing():
    base = Record("s", "base", {"t": Metric(2.0, "s", "lower")}, status="skipped")
    other = Record("s", "other", {"t": Metric(1.0, "s", "lower")}, baseline="base")
    nan = Record("s", "nan", {"t": Metric(math.nan, "s", "lower")}, baseline="other")
    compare([base, other, nan], ["t"])
    assert other.ratios == {} and nan.ratios == {}


def test_a_record_round_trips_through_json_and_nan_becomes_null():
    record = Record("sweep", "000-a", {"acc": Metric(0.5, "", "higher", "{:.1%}"), "rate": Metric(math.nan)},
                    settings={"model.compressor.name": "stc"}, notes=["x"])
    data = json.loads(json.dumps(record.to_dict(), allow_nan=False))
    assert data["metrics"]["rate"]["value"] is None
    back = Record.from_dict(data)
    assert back.metrics["acc"] == record.metrics["acc"] and back.settings == record.settings


def test_metric_cells():
    assert Metric(6_100_000, format="millions").text() == "6.1M"
    assert Metric(1234.4, "MB", format="{:,.0f}").text() == "1,234"
    assert Metric(math.nan).text() == "n/a" and Metric(None).text() == ""
    assert Metric(0.868, format="{:.1%}").text() == "86.8%"


def test_a_finished_row_prints_as_one_line():
    report = sample_report()
    line = format_line(report.records[1], 2, 3)
    assert line == "[2/3] PEFT | LoRA: peak memory 800 MB; against full: peak memory 3.00×"
    assert format_line(report.records[2]) == "bf16 row: skipped (bf16 without bf16 hardware)"


# --- the machine ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cpuinfo,bf16", [(AVX2_ONLY, False), (AMX, True), (ARM, True), ("", False)])
def test_bf16_hardware_is_read_from_the_cpu_flags(cpuinfo, bf16):
    assert has_bf16_hardware(cpu_flags(cpuinfo)) is bf16


def test_the_machine_names_cpu_flags_cores_memory_versions_and_gpu():
    found = machine(AVX2_ONLY)
    assert found["cpu"] == "AMD EPYC 7B13" and found["cpu_flags"] == ["avx2", "fma"]
    assert found["bf16_hardware"] is False and found["memory_gib"] == 23.5 and found["cores"] >= 1
    assert all(found["versions"][name] for name in ("torch", "transformers", "lightning", "torchao"))
    text = "\n".join(machine_lines(found))
    assert "AMD EPYC 7B13" in text and "avx2" in text and "bf16 in hardware: no" in text and "23.5 GiB" in text
    assert "GPU: " in text and "transformers " in text and "lightning " in text


# --- the writer ----------------------------------------------------------------------------------------------------

def sample_report() -> Report:
    base = Record("peft", "full", {"peak memory": Metric(2400.0, "MB", "lower", "{:,.0f}")}, settings={"batch": 4})
    peft = Record("peft", "PEFT | LoRA", {"peak memory": Metric(800.0, "MB", "lower", "{:,.0f}")},
                  settings={"batch": 4}, baseline="full")
    skipped = Record("peft", "bf16 row", status="skipped", baseline="full", notes=["bf16 without bf16 hardware"])
    compare([base, peft, skipped], ["peak memory"])
    return Report("peft", [base, peft, skipped], machine(), "nvila bench peft --out docs/bench",
                  summary="What it measures.", notes=["a note"], compare=("peak memory",))


def test_the_markdown_report_has_the_table_the_machine_and_the_command(tmp_path):
    report = sample_report()
    paths = write_report(report, tmp_path)
    assert paths == {"markdown": tmp_path / "peft.md", "json": tmp_path / "peft.json"}
    text = paths["markdown"].read_text()
    assert text.startswith("# nvila bench peft\n\nWhat it measures.")
    assert "| configuration | status | batch | peak memory (MB) | against | peak memory gain | notes |" in text
    assert "| PEFT \\| LoRA | ok | 4 | 800 | full | 3.00× |  |" in text
    assert "| bf16 row | skipped |  |  | full |  | bf16 without bf16 hardware |" in text
    assert "- a note" in text and "A gain is how many times better" in text
    assert "## Measured on" in text and "- command: `nvila bench peft --out docs/bench`" in text
    assert "AMD EPYC 7B13" in text and "bf16 in hardware: no" in text


def test_the_json_report_holds_the_same_records_and_machine(tmp_path):
    report = sample_report()
    data = json.loads(write_report(report, tmp_path)["json"].read_text())
    assert data["suite"] == "peft" and data["command"] == "nvila bench peft --out docs/bench" and data["date"]
    assert data["machine"]["cpu"] == "AMD EPYC 7B13" and data["machine"]["bf16_hardware"] is False
    assert {"cpu_flags", "cores", "memory_gib", "gpus", "versions"} <= set(data["machine"])
    assert [r["configuration"] for r in data["records"]] == ["full", "PEFT | LoRA", "bf16 row"]
    assert data["records"][1]["ratios"] == {"peak memory": 3.0}
    again = Report.from_json(json.dumps(data))
    assert again.markdown() == report.markdown()


def test_a_table_without_a_title_opens_the_page_as_the_sweep_needs():
    report = sample_report()
    text = report.markdown(title=False, first_column="run", units=False, notes_column="error", status=True,
                           notes=True)
    assert text.startswith("| run | status | batch | peak memory | against | peak memory gain | error |")
    assert markdown_table(report.records[:1]).splitlines()[0] == "| configuration | batch | peak memory (MB) |"


# --- reporting as it goes, and bf16 on CPUs without bf16 hardware --------------------------------------------------

@pytest.mark.parametrize("slow,include,expected_run,expected_skip", [
    (False, False, ["a", "b16", "c", "d16"], []),
    (True, False, ["a", "c"], ["b16", "d16"]),
    (True, True, ["a", "c", "b16", "d16"], []),
])
def test_bf16_configurations_run_last_or_are_skipped_where_bf16_is_slow(slow, include, expected_run, expected_skip):
    configurations = {"a": {}, "b16": {"precision": {"name": "bf16"}}, "c": {"precision": {"name": "fp32"}},
                      "d16": {"precision": {"name": "fp8"}}}
    assert order_configurations(list(configurations), configurations, slow, include) == (expected_run, expected_skip)


def test_the_cpu_flags_decide_whether_bf16_is_slow():
    assert run_of("peft", AVX2_ONLY)[0].slow_bf16 is True
    assert run_of("peft", AMX)[0].slow_bf16 is False
    gpu_run = BenchRun("peft", machine=machine(AVX2_ONLY), device="cuda")
    assert gpu_run.slow_bf16 is False


def fake_configurations(monkeypatch, stream):
    """Replace each configuration's subprocess with an instant fake that also notes what was printed so far."""
    printed_before = {}

    def fake(suite, name, threads=None):
        printed_before[name] = stream.getvalue()
        return Record(suite, name, {"peak memory": Metric(100.0 + len(name), "MB", "lower")},
                      baseline=None if name == "full fine-tuning" else "full fine-tuning")

    monkeypatch.setattr("nvila.workflows.bench.training.run_in_subprocess", fake)
    return printed_before


def test_each_row_is_printed_when_it_finishes_and_bf16_rows_are_skipped_with_a_note(monkeypatch):
    bench, stream = run_of("peft", AVX2_ONLY)
    printed_before = fake_configurations(monkeypatch, stream)
    run_training_suite(bench)
    names = list(TRAINING_SUITES["peft"])
    fp32 = ["full fine-tuning", "PEFT (LoRA r=16 + LayerNorm tuning)", "full fine-tuning, no checkpointing",
            "PEFT, no checkpointing"]
    assert list(printed_before) == fp32  # only the fp32 rows ran
    for earlier, later in zip(fp32, fp32[1:]):  # a row is on screen before the next configuration starts
        assert f"{earlier}: peak memory" in printed_before[later]
    out = stream.getvalue()
    assert "no bf16 hardware" in out and "--include-slow-bf16" in out
    assert "full fine-tuning, bf16 mixed: skipped" in out
    assert [r.configuration for r in bench.records] == names  # the report keeps the suite's order
    assert {r.configuration for r in bench.records if r.status == "skipped"} == set(names) - set(fp32)
    report = bench.report()
    assert "no bf16 hardware" in " ".join(report.notes)


def test_with_include_slow_bf16_the_bf16_rows_run_last(monkeypatch):
    bench, stream = run_of("peft", AVX2_ONLY, include_slow_bf16=True)
    printed_before = fake_configurations(monkeypatch, stream)
    run_training_suite(bench)
    ran = list(printed_before)
    assert len(ran) == len(TRAINING_SUITES["peft"]) and ran[-3:] == [
        "full fine-tuning, bf16 mixed", "PEFT, bf16 mixed, frozen weights in bf16", "the same without LoRA dropout"]
    assert all(r.status == "ok" for r in bench.records)


def test_with_bf16_hardware_the_suite_runs_in_its_own_order(monkeypatch):
    bench, stream = run_of("peft", AMX)
    printed_before = fake_configurations(monkeypatch, stream)
    run_training_suite(bench)
    assert list(printed_before) == list(TRAINING_SUITES["peft"]) and "no bf16 hardware" not in stream.getvalue()


def test_only_selects_configurations_and_refuses_a_filter_that_selects_none():
    bench, _ = run_of("peft", only=["no checkpointing"])
    assert bench.selected(list(TRAINING_SUITES["peft"])) == ["full fine-tuning, no checkpointing",
                                                              "PEFT, no checkpointing"]
    bench, _ = run_of("peft", only=["nothing like this"])
    with pytest.raises(NvilaError, match="matches no configuration"):
        bench.selected(list(TRAINING_SUITES["peft"]))


def test_run_bench_writes_suite_md_and_json_and_fails_after_writing_when_a_row_failed(monkeypatch, tmp_path, capsys):
    def fake_suite(bench):
        bench.add(Record(bench.suite, "one", {"t": Metric(1.0, "s", "lower")}))
        bench.add(Record(bench.suite, "two", status="failed", notes=["boom"]))

    monkeypatch.setitem(SUITES, "fake", Suite(fake_suite, "A fake suite.", ("t",)))
    with pytest.raises(NvilaError, match="1 configuration.*failed: two"):
        run_bench("fake", BenchOptions(out=tmp_path, command="nvila bench fake --out x"))
    assert (tmp_path / "fake.md").exists() and json.loads((tmp_path / "fake.json").read_text())["records"][1][
        "status"] == "failed"
    out = capsys.readouterr().out
    assert out.index("[1] one") < out.index("[2] two") < out.index("# nvila bench fake")  # rows first, report after


def test_the_command_names_every_suite_and_refuses_a_misspelt_one(capsys):
    from nvila.workflows.commands import _parser, main

    bench = next(a for a in _parser()._subparsers._group_actions[0].choices["bench"]._actions if a.dest == "suite")
    assert all(name in bench.help for name in SUITES)
    assert main(["bench", "prefil"]) == 2
    assert "No benchmark suite 'prefil'. Did you mean 'prefill'?" in capsys.readouterr().err


def test_the_command_refuses_rounds_below_one(capsys):
    from nvila.workflows.commands import main

    with pytest.raises(SystemExit) as exit:  # argparse's usage error, before anything runs
        main(["bench", "prefill", "--rounds", "0"])
    assert exit.value.code == 2
    assert "--rounds: takes a whole number of at least 1, got '0'" in capsys.readouterr().err


def test_the_command_refuses_an_only_filter_that_matches_nothing(capsys):
    from nvila.workflows.commands import main

    assert main(["bench", "prefill", "--only", "no such size"]) == 2
    assert "matches no configuration" in capsys.readouterr().err


# --- the training suites step through the module's own code --------------------------------------------------------

@pytest.mark.bf16
def test_peft_and_full_fine_tuning_in_bf16_run_side_by_side():
    names = ["full fine-tuning, bf16 mixed", "PEFT, bf16 mixed, frozen weights in bf16"]
    # (PEFT's bf16 frozen weights meet fp32 activations: its steps run only under bf16 autocast, as in Lightning)
    full, peft = [run_configuration("peft", name, {**TRAINING_SUITES["peft"][name], **TOY_SIZES, "steps": 1})
                  for name in names]
    assert full.value("trainable params") == full.value("total params")
    assert 0 < peft.value("trainable params") < 0.5 * peft.value("total params")
    assert full.value("step") > 0 and peft.value("throughput") > 0 and peft.settings["precision"] == "bf16-mixed"
    assert peft.baseline == full.configuration
    compare([full, peft], SUITES["peft"].compare)
    expected = full.value("peak memory") / peft.value("peak memory")
    assert peft.ratios["peak memory"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.bf16
def test_a_training_step_is_the_modules_own_under_lightnings_autocast(monkeypatch):
    from nvila.workflows.module import NvilaModule

    seen = []
    original = NvilaModule.training_step

    def spy(self, batch, batch_idx):
        seen.append((batch_idx, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(NvilaModule, "training_step", spy)
    run_configuration("peft", "full fine-tuning, bf16 mixed",
                      {**TRAINING_SUITES["peft"]["full fine-tuning, bf16 mixed"], **TOY_SIZES, "steps": 2})
    assert [s[0] for s in seen] == [0, 1, 2] and all(s[1] and s[2] == torch.bfloat16 for s in seen)
    seen.clear()
    run_configuration("peft", "full fine-tuning", {**TOY_SIZES, "steps": 1})
    assert seen and not any(s[1] for s in seen)  # fp32: no autocast


def test_largest_fitting_batch_is_found_by_doubling_then_bisection():
    tried = []

    def fits_up_to(limit):
        return lambda size: tried.append(size) or size <= limit

    assert largest_fitting(fits_up_to(13)) == 13
    assert tried == [1, 2, 4, 8, 16, 12, 14, 13]
    assert largest_fitting(fits_up_to(0)) == 0
    assert largest_fitting(fits_up_to(10_000), limit=100) == 100


def test_the_fp8_configurations_train_in_emulation_on_the_cpu():
    """The `fp8` suite's own settings, at toy sizes and in torchao's emulation (the real one needs sm >= 8.9)."""
    settings = {**TRAINING_SUITES["fp8"]["fp8 (tensorwise scaling)"], **TOY_SIZES, "steps": 1, "question_words": 20,
                "answer_words": 5, "precision": {"name": "fp8", "emulate": True}}
    record = run_configuration("fp8", "fp8 (tensorwise scaling)", settings)
    assert record.value("trainable params") == record.value("total params") and record.value("throughput") > 0
    assert record.baseline == "bf16 mixed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these run for real")
def test_gpu_only_benchmarks_say_what_they_need(capsys):
    from nvila.workflows.commands import main

    assert main(["bench", "fp8"]) == 2
    assert "needs an NVIDIA GPU with compute capability 8.9" in capsys.readouterr().err
    with pytest.raises(NvilaError, match="needs a CUDA GPU"):
        run_configuration("fp8", "largest", {**TRAINING_SUITES["fp8"]["bf16 mixed, largest batch"], **TOY_SIZES})


@pytest.mark.slow  # over 5 s on an AVX2 core: the default run stays under 5 minutes; CI runs it
def test_a_configuration_that_fails_in_its_process_becomes_a_failed_record():
    """The subprocess path: a configuration that fails in its process becomes a failed record with its error."""
    from nvila.workflows.bench.training import run_in_subprocess

    record = run_in_subprocess("peft", "no such configuration")
    assert record.status == "failed" and record.notes and "no such configuration" in record.notes[0]


# --- the data and prefill suites, at toy sizes ---------------------------------------------------------------------

TOY_PREFILL = {"toy": {
    "encoder": {"name": "siglip", "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                "num_layers": 1, "num_heads": 2, "feature_layer": -1},
    "llm": {"name": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
            "num_kv_heads": 1}}}


def test_the_prefill_suite_compares_stc_with_identity_side_by_side():
    from nvila.workflows.bench.prefill import run_prefill_suite

    bench, stream = run_of("prefill")
    run_prefill_suite(bench, TOY_PREFILL, repeats=1)
    identity, stc = bench.records
    assert (identity.configuration, stc.configuration) == ("toy, identity", "toy, STC 2x2")
    assert identity.value("visual tokens") == 16 and stc.value("visual tokens") == 4
    assert stc.baseline == "toy, identity" and stc.ratios["visual tokens"] == 4.0
    assert stc.ratios["LLM prefill"] == pytest.approx(identity.value("LLM prefill") / stc.value("LLM prefill"),
                                                      rel=1e-3)
    assert "[2/2] toy, STC 2x2" in stream.getvalue()


def test_sweep_and_prefill_suite_time_the_same_prefill(monkeypatch):
    """``nvila.workflows.bench.prefill.prefill`` is the one place a benchmark prefills: swapping it reaches both."""
    import nvila.workflows.bench.prefill as prefill_module
    from nvila.workflows.bench.prefill import prompt_batch, size_model, time_prefill

    calls = []
    monkeypatch.setattr(prefill_module, "prefill", lambda model, batch: calls.append(model) or model(**batch))
    model = size_model(TOY_PREFILL["toy"], {"name": "stc", "ratio": 2})
    from PIL import Image

    batch = prompt_batch(model, [{"from": "human", "value": "<image>\nWhat?"}], [Image.new("RGB", (40, 40))])
    timing = time_prefill(model, batch, repeats=2, warmup=1)
    assert len(timing.samples) == 2 and len(calls) == 3


def test_the_data_suite_measures_one_worker_and_packing_against_padding():
    from nvila.workflows.bench.data import DataSizes, run_data_suite

    bench, stream = run_of("data", only=["demo", "packing"])
    run_data_suite(bench, DataSizes(images=8, videos=1, samples=24, pack_tokens=512, steps=1, demo_steps=1))
    step, demo, padded, packed = bench.records
    assert demo.settings["samples"] == 8 and demo.value("rate") > 0
    assert demo.baseline == step.configuration == "pipeline: demo training step (batch 32)"
    assert demo.ratios["rate"] == pytest.approx(demo.value("rate") / step.value("rate"), rel=1e-3)
    assert padded.configuration == "packing: padded (batch 16)" and packed.baseline == padded.configuration
    assert packed.value("non-padding share") > padded.value("non-padding share")
    assert packed.ratios["non-padding share"] > 1 and "throughput" in packed.ratios
    assert [line[:4] for line in stream.getvalue().splitlines() if line.startswith("[")] == ["[1/4", "[2/4", "[3/4",
                                                                                             "[4/4"]
    text = bench.report().markdown()  # the two kinds of rows, each in its own table
    assert text.index("### pipeline\n\n| configuration | samples |") < text.index("### packing\n\n| configuration |")
