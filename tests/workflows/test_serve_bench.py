"""The serving benchmark drives the real server with concurrent clients, batched and one at a time, in one run."""

from nvila.workflows.serve_bench import ServeBenchRow, _percentile, markdown, measure


def test_rows_for_each_mode_and_client_count_with_the_same_answers_under_both(varied_model):
    rows, same = measure(varied_model, "tiny", clients=(1, 3), max_tokens=3, requests=3)
    assert same
    assert [(r.mode, r.clients) for r in rows] == [("batched", 1), ("one-at-a-time", 1), ("batched", 3),
                                                   ("one-at-a-time", 3)]
    assert all(isinstance(r, ServeBenchRow) and r.requests == 3 and r.requests_per_s > 0 for r in rows)
    assert all(0 < r.ttft_p50_ms <= r.ttft_p99_ms and 0 < r.p50_ms <= r.p99_ms for r in rows)
    table = markdown(rows)
    assert table.count("\n") == 5 and "| tiny | one-at-a-time | 3 | 3 |" in table and "1.00×" in table


def test_the_99th_percentile_is_the_nearest_rank():
    assert _percentile(list(range(1, 101)), 99) == 99 and _percentile([5.0], 99) == 5.0
    assert _percentile([1, 2, 3, 4], 50) == 2
