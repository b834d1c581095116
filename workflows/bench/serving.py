"""Serving throughput (``nvila bench serve``): requests/s and latency percentiles for N concurrent clients, the
server batching (continuous batching) against the same server decoding one request at a time.

Runs the real server (``nvila.workflows.serving``) in this process on 127.0.0.1, and real HTTP clients in
threads. Each client sends its requests one after the other (a closed loop), all clients starting together;
every request asks about its own 64 px image and question, greedily, for ``max_tokens`` tokens. Two servers of
the same model run side by side, one batching up to ``max(clients)`` sequences and one with ``max_batch=1``, and
each client count runs against both back to back, so that the drifting load of a shared machine hits both alike.
Under greedy decoding every request must get the same answer from both; the run notes whether it did.
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

from nvila.workflows.bench.models import build_model, demo_parts
from nvila.workflows.bench.record import Metric, Record
from nvila.workflows.bench.runner import BenchRun

MODES = ("one-at-a-time", "batched")
BASELINE = "one-at-a-time"
CLIENTS = (1, 4, 8, 16)
MAX_TOKENS = 32
QUESTIONS = ("What shape is shown?", "What colour is the shape?", "How many shapes are there?",
             "Where is the shape?", "Is the shape large or small?", "Describe the picture.")
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "demo": {},  # the demo recipe's model as it is (a 0.7 M-parameter language model)
    # its language model made mid-size (about 100 M parameters, GPT-2-small scale, a 32 k vocabulary): decoding a
    # token reads far more weight bytes than it computes with, as real models do
    "mid": {"llm": {"name": "qwen2", "hidden_size": 768, "intermediate_size": 2048, "num_layers": 12,
                    "num_heads": 12, "num_kv_heads": 4, "vocab_size": 32000}},
}
COMPARE = ("requests/s", "p50 latency", "p99 latency", "p50 TTFT", "p99 TTFT")
SUMMARY = ("The real server (in this process, on 127.0.0.1) driven by N concurrent HTTP clients, each sending its "
           "requests one after the other; every request asks about its own 64 px image and answers greedily with "
           f"{MAX_TOKENS} tokens. Each client count runs against a server that batches (continuous batching, up to the "
           "largest client count) and, back to back, one that decodes one request at a time (`max_batch=1`), the "
           "baseline of its gains. Latencies are the clients' (whole request); time to first token (TTFT) is the "
           "server's, from the request's arrival, queueing included; p99 is the nearest rank. Sizes: *demo* is the "
           "demo recipe's model, random-initialised; *mid* the same with a 12-layer, 768-wide Qwen2 and a 32 k "
           "vocabulary (about 100 M parameters).")


def configuration_name(size: str, clients: int, mode: str) -> str:
    return f"{size}, {clients} client{'s' if clients > 1 else ''}, {mode}"


def size_model(size: str, parts: dict[str, dict[str, Any]] | None = None) -> Any:
    """A size's model: the demo recipe's parts with ``parts`` replaced, random-initialised from seed 0, eval mode."""
    import torch

    torch.manual_seed(0)
    return build_model({**demo_parts(), **(SIZES[size] if parts is None else parts)}, max_length=2048).eval()


def image_url(seed: int, size: int = 64) -> str:
    """A small PNG as a data URL: a square of one colour on another, placed by ``seed``."""
    from PIL import Image

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    image = Image.new("RGB", (size, size), colours[seed % 4])
    image.paste(Image.new("RGB", (size // 2, size // 2), colours[(seed + 1) % 4]), (seed % 3 * 8, seed % 5 * 4))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_body(model: str, index: int, max_tokens: int) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": image_url(index)}},
               {"type": "text", "text": QUESTIONS[index % len(QUESTIONS)]}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (with 8 values, p99 is the largest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def drive(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> tuple[float, list[dict]]:
    """``clients`` threads, each sending ``per_client`` requests in turn; (seconds, one record per request)."""
    import httpx

    records: list[dict] = []
    lock, barrier = threading.Lock(), threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def client(c: int) -> None:
        with httpx.Client(timeout=3600) as http:
            barrier.wait()
            for r in range(per_client):
                index = c * per_client + r
                start = time.perf_counter()
                try:
                    response = http.post(url + "/v1/chat/completions", json=request_body(model, index, max_tokens))
                    response.raise_for_status()
                except BaseException as exc:  # noqa: BLE001 - reported after the threads have ended
                    errors.append(exc)
                    return
                answer = response.json()
                with lock:
                    records.append({"index": index, "latency_ms": (time.perf_counter() - start) * 1000,
                                    "ttft_ms": float(response.headers["x-time-to-first-token-ms"]),
                                    "tokens": answer["usage"]["completion_tokens"],
                                    "text": answer["choices"][0]["message"]["content"]})

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed; the first: {errors[0]!r}")
    return time.perf_counter() - start, records


def record(bench: BenchRun, size: str, clients: int, mode: str, max_batch: int, seconds: float,
           records: list[dict], max_tokens: int) -> Record:
    latencies, ttfts = [r["latency_ms"] for r in records], [r["ttft_ms"] for r in records]

    def ms(value: float, better: str | None = "lower") -> Metric:
        return Metric(round(value, 1), "ms", better, "{:,.0f}")

    return Record(
        bench.suite, configuration_name(size, clients, mode),
        metrics={"requests": Metric(len(records)),
                 "requests/s": Metric(round(len(records) / seconds, 3), "", "higher", "{:.2f}"),
                 "p50 latency": ms(statistics.median(latencies)), "p99 latency": ms(percentile(latencies, 99)),
                 "p50 TTFT": ms(statistics.median(ttfts)), "p99 TTFT": ms(percentile(ttfts, 99)),
                 "tokens/s": Metric(round(sum(r["tokens"] for r in records) / seconds, 1), "", "higher", "{:,.1f}")},
        settings={"size": size, "clients": clients, "mode": mode, "max_batch": max_batch, "max_tokens": max_tokens},
        baseline=None if mode == BASELINE else configuration_name(size, clients, BASELINE))


def run_serving_suite(bench: BenchRun, sizes: dict[str, dict[str, dict[str, Any]]] | None = None,
                      clients: Sequence[int] = CLIENTS, max_tokens: int = MAX_TOKENS,
                      requests: int | None = None) -> None:
    """Every selected (size, clients, mode); ``requests`` per client count defaults to ``max(8, clients)``."""
    from nvila.workflows.serving.app import create_app, running
    from nvila.workflows.serving.settings import ServeSettings

    sizes = SIZES if sizes is None else sizes
    names = bench.selected([configuration_name(s, n, m) for s in sizes for n in clients for m in MODES])
    bench.note(f"{max_tokens} tokens per answer; requests per client count: {requests or 'max(8, clients)'}.")
    for size, parts in sizes.items():
        runs = [(n, m) for n in clients for m in MODES if configuration_name(size, n, m) in names]
        if not runs:
            continue
        model = size_model(size, parts).to(bench.device)
        answers: dict[int, set[str]] = {}
        with contextlib.ExitStack() as servers:
            urls, batch = {}, {"batched": max(clients), BASELINE: 1}
            for mode in sorted({m for _, m in runs}):
                settings = ServeSettings(model_name=size, max_batch=batch[mode], max_queue=max(64, 2 * max(clients)),
                                         request_timeout_s=3600)
                urls[mode] = servers.enter_context(running(create_app(model, settings)))
                drive(urls[mode], size, 1, 2, max_tokens)  # warm up: first calls allocate and pick kernels
            for n, mode in runs:
                per_client = -(-(requests or max(8, n)) // n)
                seconds, done = drive(urls[mode], size, n, per_client, max_tokens)
                bench.add(record(bench, size, n, mode, batch[mode], seconds, done, max_tokens))
                for r in done:
                    answers.setdefault(r["index"], set()).add(r["text"])
        same = all(len(texts) == 1 for texts in answers.values())
        bench.note(f"{size}: every request got {'the same answer' if same else 'DIFFERENT answers'} batched and one "
                   "at a time (greedy decoding).")
