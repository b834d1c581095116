"""`nvila bench serve` drives the real server with concurrent clients, batched and one at a time, in one run."""

from nvila.workflows.bench import BenchOptions, BenchRun
from nvila.workflows.bench.serving import COMPARE, percentile, run_serving_suite
from nvila.workflows.bench.suites import SUITES

TOY = {"toy": {
    "encoder": {"name": "siglip", "image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                "num_layers": 1, "num_heads": 2, "feature_layer": -1},
    "llm": {"name": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
            "num_kv_heads": 1}}}


def test_each_client_count_runs_batched_against_one_at_a_time_with_the_same_answers():
    import io

    stream = io.StringIO()
    bench = BenchRun("serve", BenchOptions(), COMPARE, device="cpu", stream=stream)
    run_serving_suite(bench, TOY, clients=(1, 3), max_tokens=3, requests=3)
    assert [r.configuration for r in bench.records] == [
        "toy, 1 client, one-at-a-time", "toy, 1 client, batched", "toy, 3 clients, one-at-a-time",
        "toy, 3 clients, batched"]
    one, batched = bench.records[2:]
    assert batched.baseline == one.configuration and one.baseline is None
    assert batched.ratios["requests/s"] == round(batched.value("requests/s") / one.value("requests/s"), 4)
    assert all(r.value("requests") == 3 and r.value("requests/s") > 0 for r in bench.records)
    assert all(0 < r.value("p50 TTFT") <= r.value("p99 TTFT") for r in bench.records)
    assert any("toy: every request got the same answer batched and one at a time" in n for n in bench.notes)
    markdown = bench.report().markdown()
    assert "toy, 3 clients, batched" in markdown and "requests/s" in markdown
    assert SUITES["serve"].run is run_serving_suite


def test_the_99th_percentile_is_the_nearest_rank():
    assert percentile(list(range(1, 101)), 99) == 99 and percentile([5.0], 99) == 5.0
    assert percentile([1, 2, 3, 4], 50) == 2
