"""Serving throughput: requests/s and latency percentiles for N concurrent clients, batched against one at a time.

Runs the real server (``nvila.workflows.serving``) in this process on 127.0.0.1 and real HTTP clients in threads.
Each client sends its requests one after the other (a closed loop), all clients starting together; every request
asks about its own image and question, greedy, for ``max_tokens`` tokens. The same requests run twice, against a
server that batches up to ``max(clients)`` sequences (continuous batching) and against one that decodes one
request at a time (``max_batch=1``), so the two rows of a client count differ only in batching, and their answers
must be identical (greedy decoding)::

    python -m nvila.workflows.serve_bench --model demo mid --clients 1 4 8 16
    python -m nvila.workflows.serve_bench --ckpt path/to/checkpoint

Rows are plain :class:`ServeBenchRow` dataclasses; :func:`markdown` writes them as a table.
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MODES = ("batched", "one-at-a-time")
QUESTIONS = ("What shape is shown?", "What colour is the shape?", "How many shapes are there?",
             "Where is the shape?", "Is the shape large or small?", "Describe the picture.")
MID_SIZE = ["--model.llm.hidden_size=768", "--model.llm.intermediate_size=2048", "--model.llm.num_layers=12",
            "--model.llm.num_heads=12", "--model.llm.num_kv_heads=4", "--model.llm.vocab_size=32000"]
"""The demo recipe with a mid-size language model (about 100 M parameters, GPT-2-small scale, a 32 k vocabulary):
large enough that decoding one token reads far more weight bytes than it computes with, as real models do."""


@dataclass(frozen=True)
class ServeBenchRow:
    """One client count under one serving mode."""

    model: str
    mode: str
    """"batched" (continuous batching) or "one-at-a-time" (``max_batch=1``)."""
    clients: int
    requests: int
    seconds: float
    """Wall time from the clients' start to the last answer."""
    requests_per_s: float
    p50_ms: float
    """Median latency of a whole request, as the client measures it."""
    p99_ms: float
    ttft_p50_ms: float
    """Median time to first token, as the server measures it (queueing included)."""
    ttft_p99_ms: float
    tokens_per_s: float
    """Generated tokens per second, all clients together."""


def build_model(name: str) -> Any:
    """``demo`` or ``mid``: the demo recipe's model (or its mid-size variant), random-initialised, in eval mode."""
    import torch

    from nvila.core.model import NvilaModel
    from nvila.workflows.cli import model_spec, read_recipe

    overrides = {"demo": [], "mid": MID_SIZE}[name]
    torch.manual_seed(0)
    return NvilaModel(model_spec(read_recipe(["--config", "demo", *overrides])).to_dict()).eval()


def _image_url(seed: int, size: int = 64) -> str:
    from PIL import Image

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    image = Image.new("RGB", (size, size), colours[seed % 4])
    image.paste(Image.new("RGB", (size // 2, size // 2), colours[(seed + 1) % 4]), (seed % 3 * 8, seed % 5 * 4))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _body(model: str, index: int, max_tokens: int) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": _image_url(index)}},
               {"type": "text", "text": QUESTIONS[index % len(QUESTIONS)]}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]  # nearest rank


def _drive(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> tuple[float, list[dict]]:
    """``clients`` threads, each sending ``per_client`` requests in turn; (seconds, one record per request)."""
    import httpx

    records: list[dict] = []
    lock, barrier = threading.Lock(), threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            barrier.wait()
            for r in range(per_client):
                index = c * per_client + r
                start = time.perf_counter()
                try:
                    response = http.post(url + "/v1/chat/completions", json=_body(model, index, max_tokens))
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


def measure(model: Any, name: str = "model", clients: Sequence[int] = (1, 4, 8, 16), max_tokens: int = 16,
            requests: int | None = None, modes: Sequence[str] = MODES) -> tuple[list[ServeBenchRow], bool]:
    """Serve ``model`` once per mode and drive it with each client count; the rows, and whether every request got
    the same answer under every mode.

    ``requests`` per client count defaults to ``max(8, clients)`` (rounded up to a multiple of ``clients``).
    """
    import contextlib

    from nvila.workflows.serving.app import create_app, running
    from nvila.workflows.serving.settings import ServeSettings

    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"modes {unknown} are not among {MODES}")
    rows, answers = [], {}
    with contextlib.ExitStack() as servers:
        urls = {}
        for mode in modes:  # both servers up at once (the idle one waits without using the CPU), so that each
            # client count runs its modes back to back and drifting load on a shared machine hits both alike
            settings = ServeSettings(model_name=name, max_batch=max(clients) if mode == "batched" else 1,
                                     max_queue=max(64, 2 * max(clients)), request_timeout_s=3600)
            urls[mode] = servers.enter_context(running(create_app(model, settings)))
            _drive(urls[mode], name, 1, 2, max_tokens)  # warm up: first calls allocate and pick kernels
        for n in clients:
            per_client = -(-(requests or max(8, n)) // n)
            for mode in modes:
                seconds, records = _drive(urls[mode], name, n, per_client, max_tokens)
                latencies, ttfts = [r["latency_ms"] for r in records], [r["ttft_ms"] for r in records]
                rows.append(ServeBenchRow(
                    model=name, mode=mode, clients=n, requests=len(records), seconds=round(seconds, 3),
                    requests_per_s=round(len(records) / seconds, 3), p50_ms=round(statistics.median(latencies), 1),
                    p99_ms=round(_percentile(latencies, 99), 1), ttft_p50_ms=round(statistics.median(ttfts), 1),
                    ttft_p99_ms=round(_percentile(ttfts, 99), 1),
                    tokens_per_s=round(sum(r["tokens"] for r in records) / seconds, 1)))
                for r in records:
                    answers.setdefault((n, r["index"]), set()).add(r["text"])
    return rows, all(len(texts) == 1 for texts in answers.values())


def markdown(rows: Sequence[ServeBenchRow]) -> str:
    """The rows as a table, with the batched/one-at-a-time throughput ratio of each client count."""
    one = {(r.model, r.clients): r.requests_per_s for r in rows if r.mode == "one-at-a-time"}
    lines = ["| model | mode | clients | requests | req/s | vs one-at-a-time | p50 latency (ms) | p99 latency (ms) | "
             "p50 TTFT (ms) | p99 TTFT (ms) | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        base = one.get((r.model, r.clients))
        ratio = f"{r.requests_per_s / base:.2f}×" if base and r.mode == "batched" else "1.00×" if base else "-"
        lines.append(f"| {r.model} | {r.mode} | {r.clients} | {r.requests} | {r.requests_per_s:.2f} | {ratio} | "
                     f"{r.p50_ms:,.0f} | {r.p99_ms:,.0f} | {r.ttft_p50_ms:,.0f} | {r.ttft_p99_ms:,.0f} | "
                     f"{r.tokens_per_s:,.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nvila.workflows.serve_bench", description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", choices=["demo", "mid"], nargs="+", default=["demo"],
                       help="random-initialised model(s) to serve: the demo recipe's, and/or its mid-size variant")
    which.add_argument("--ckpt", help="serve this checkpoint instead")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per client count (default: max(8, clients))")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("nvila.serve").setLevel(logging.WARNING)
    if args.ckpt:
        from pathlib import Path

        from nvila.core.checkpoint import load_checkpoint

        models = [(Path(args.ckpt).name, load_checkpoint(args.ckpt))]
    else:
        models = [(name, build_model(name)) for name in args.model]
    all_rows = []
    for name, model in models:
        rows, same = measure(model, name, args.clients, args.max_tokens, args.requests)
        all_rows += rows
        print(f"{name}: every request got the same answer batched and one at a time: {same}", flush=True)
    print(markdown(all_rows))


if __name__ == "__main__":
    main()
