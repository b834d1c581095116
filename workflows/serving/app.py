"""``nvila serve``: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the inference engine.

Endpoints: ``POST /v1/chat/completions`` (whole answers, or server-sent events with ``stream: true``),
``GET /v1/models``, ``GET /health``. One request goes:

1. body read (at most ``max_body_bytes``: 413), JSON parsed, fields validated (:mod:`.protocol`: 400);
2. media counted, fetched (remote URLs only where allowed), decoded within limits (:mod:`.media`: 400);
3. the conversation encoded by the model's own processor in a worker thread (too long for the context: 400);
4. queued for the decoding thread (:mod:`.worker`: 429 when the queue is full), which batches it with the other
   requests in flight (continuous batching, ``nvila.core.scheduler``);
5. tokens read back until the answer ends, the client goes away (its sequence is cancelled and its place in the
   batch freed), or ``request_timeout_s`` passes (504).

Every answer carries ``X-Request-Id`` and ``X-Time-To-First-Token-Ms`` headers, whole answers also
``X-Decode-Tokens-Per-Second``; ``usage`` has ``visual_tokens`` besides OpenAI's counts. Each request writes one
log line (logger ``nvila.serve``): id, status, tokens, timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from nvila.core.engine import ChatRequest, DecodingConfig, Engine, PromptTooLong
from nvila.core.errors import NvilaError
from nvila.workflows.serving.media import count_media, engine_messages, fetch_media
from nvila.workflows.serving.protocol import APIError, chunk, completion, parse_request, usage
from nvila.workflows.serving.settings import MediaLimits, ServeSettings
from nvila.workflows.serving.worker import DecodeLoop, Delivery, QueueFull

log = logging.getLogger("nvila.serve")
POLL_S = 0.1
"""How often a request waiting for tokens checks whether its client is still there."""


class Timeout(Exception):
    pass


class Disconnected(Exception):
    pass


class Subscription:
    """One request's tokens, from the decoding thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()
        self._get: asyncio.Future | None = None
        self._checked = time.perf_counter()

    def __call__(self, delivery: Delivery) -> None:  # in the decoding thread
        with contextlib.suppress(RuntimeError):  # the event loop has closed: the server is stopping
            self.loop.call_soon_threadsafe(self.queue.put_nowait, delivery)

    async def next(self, deadline: float, request: Request | None = None) -> Delivery:
        """The next delivery; :class:`Timeout` past ``deadline``, :class:`Disconnected` if ``request``'s client left."""
        if self._get is None:
            self._get = asyncio.ensure_future(self.queue.get())
        while True:
            now = time.perf_counter()
            if request is not None and now - self._checked >= POLL_S:  # every POLL_S, even while tokens flow
                self._checked = now
                if await request.is_disconnected():
                    raise Disconnected
            remaining = deadline - now
            if remaining <= 0:
                raise Timeout
            done, _ = await asyncio.wait({self._get}, timeout=min(POLL_S, remaining))
            if done:
                delivery, self._get = self._get.result(), None
                return delivery

    def close(self) -> None:
        if self._get is not None:
            self._get.cancel()


@dataclass
class Record:
    """What the log line and the headers of one request say."""

    rid: str
    arrived: float = field(default_factory=time.perf_counter)
    stream: bool = False
    prompt: int = 0
    visual: int = 0
    completion: int = 0
    finish: str = "-"
    first: float | None = None
    last: float | None = None

    @property
    def ttft_ms(self) -> float:
        return (self.first - self.arrived) * 1000 if self.first is not None else math.nan

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second after the first (nan for a single token)."""
        span = (self.last - self.first) if self.first is not None and self.last is not None else 0.0
        return (self.completion - 1) / span if self.completion > 1 and span > 0 else math.nan

    def timings(self) -> dict[str, float]:
        return {"time_to_first_token_ms": round(self.ttft_ms, 2),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2)}

    def headers(self, decode: bool = True) -> dict[str, str]:
        headers = {"X-Request-Id": self.rid, "X-Time-To-First-Token-Ms": f"{self.ttft_ms:.2f}"}
        if decode:
            headers["X-Decode-Tokens-Per-Second"] = f"{self.decode_tokens_per_s:.2f}"
        return headers

    def log(self, status: int, detail: str = "") -> None:
        total_ms = (time.perf_counter() - self.arrived) * 1000
        log.info("%s status=%d stream=%s prompt=%d visual=%d completion=%d finish=%s ttft_ms=%.1f total_ms=%.1f "
                 "decode_tok_s=%.1f%s", self.rid, status, "yes" if self.stream else "no", self.prompt, self.visual,
                 self.completion, self.finish, self.ttft_ms, total_ms, self.decode_tokens_per_s,
                 f" error={detail!r}" if detail else "")


def create_app(model: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The server's ASGI app for a loaded model (anything ``load_checkpoint`` returns: ours or a released
    checkpoint, full precision or quantized); its decoding thread runs while the app is up (lifespan)."""
    settings = settings or ServeSettings()
    engine = Engine(model, compile_decode=settings.compile_decode)
    worker = DecodeLoop(engine, settings.max_batch, settings.prefill_batch, settings.max_queue, settings.prefill_tokens)
    context = int(model.spec.max_length)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.compile_decode:
            started = time.perf_counter()
            engine.warm_up(range(1, min(2, settings.max_batch) + 1))
            log.info("compiled the decoding step in %.1f s", time.perf_counter() - started)
        worker.start()
        log.info("serving %s: batch of %d, queue of %d, context of %d tokens", settings.model_name,
                 settings.max_batch, settings.max_queue, context)
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="nvila", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker, app.state.settings, app.state.engine = worker, settings, engine

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        record = getattr(request.state, "record", None) or Record(f"req-{uuid.uuid4().hex[:12]}")
        record.log(exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers={"X-Request-Id": record.rid})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                         code="not_found" if exc.status_code == 404 else None)
        return await api_error(request, error)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return await api_error(request, APIError(500, f"Internal error: {type(exc).__name__}: {exc}"))

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = worker.alive
        body = {"status": "ok" if ok else "error", "model": settings.model_name,
                "running": worker.scheduler.running, "waiting": worker.scheduler.waiting,
                "max_batch": settings.max_batch, "max_queue": settings.max_queue}
        if not ok:
            body["error"] = repr(worker.failure) if worker.failure else "the decoding thread is not running"
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created,
                                            "owned_by": "nvila", "max_model_len": context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):  # noqa: ANN202 - a JSON or an event-stream response
        record = request.state.record = Record(f"chatcmpl-{uuid.uuid4().hex[:24]}")
        body = await _read_body(request, settings.max_body_bytes)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
        req = parse_request(payload)
        record.stream = req.stream
        if req.model != settings.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves "
                                f"'{settings.model_name}'.", param="model", code="model_not_found")
        count_media(req.messages, settings.media)
        fetched = await fetch_media(req.messages, settings.media) if settings.media.allow_remote else {}
        encoded = await run_in_threadpool(_encode, engine, req.messages, settings.media, fetched)
        record.prompt = len(encoded.input_ids)
        record.visual = int(engine.visual_mask(encoded.input_ids).sum())
        room = context - record.prompt
        max_new = req.max_new_tokens
        if max_new is None:
            max_new = min(settings.default_max_tokens, room)
        if max_new > room or max_new < 1:
            raise APIError(400, f"This model's context is {context} tokens; the request has {record.prompt} in its "
                                f"messages ({record.visual} visual) and asks for {max_new} in the answer, "
                                f"{record.prompt + max_new} in all.", param="max_tokens",
                           code="context_length_exceeded")
        config = DecodingConfig(max_new_tokens=max_new, temperature=req.temperature or 0.0,
                                top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
                                stop=tuple(req.stop or ()))
        if not worker.alive:
            raise APIError(503, "The server's decoding thread is not running; see its log.")
        subscription = Subscription(asyncio.get_running_loop())
        try:
            sequence = worker.submit(encoded, config, subscription)
        except QueueFull:
            raise APIError(429, f"The server is busy: {settings.max_batch} requests decoding and "
                                f"{settings.max_queue} waiting. Retry later.", code="queue_full") from None
        deadline = record.arrived + settings.request_timeout_s
        try:
            first = await subscription.next(deadline, request)
            if first.error:
                raise APIError(500, f"Generation failed: {first.error}")
        except BaseException as exc:
            worker.cancel(sequence)
            subscription.close()
            if isinstance(exc, Timeout):
                raise _timeout(settings) from None
            if isinstance(exc, Disconnected):
                record.log(499, "client disconnected before the first token")
                return JSONResponse({}, status_code=499)
            raise
        record.first = first.time
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = _stream(record, first, subscription, worker, sequence, deadline, settings, include_usage)
            return EventSourceResponse(events, headers=record.headers(decode=False), sep="\n", ping=15)
        return await _whole(record, first, subscription, worker, sequence, deadline, request, settings)

    return app


def _encode(engine: Engine, messages: list, media: MediaLimits, fetched: dict[str, bytes]) -> Any:
    """Media decoded and the conversation through the model's processor (in a worker thread: it costs CPU)."""
    chat = ChatRequest(engine_messages(messages, media, fetched))
    try:
        return engine.encode(chat)
    except PromptTooLong as exc:
        raise APIError(400, f"{exc} Shorten the conversation, or send fewer or smaller images.", param="messages",
                       code="context_length_exceeded") from None
    except NvilaError as exc:  # placeholders and media that do not match, frame counts a video cannot take, ...
        raise APIError(400, str(exc), param="messages") from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"The request body is {int(declared):,} bytes; this server takes at most {limit:,}.",
                       code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise APIError(413, f"The request body is larger than {limit:,} bytes.", code="request_too_large")
    return bytes(body)


def _timeout(settings: ServeSettings) -> APIError:
    return APIError(504, f"The request did not finish within {settings.request_timeout_s:g} s; it was cancelled.",
                    code="request_timeout")


async def _whole(record: Record, first: Delivery, subscription: Subscription, worker: DecodeLoop, sequence: int,
                 deadline: float, request: Request, settings: ServeSettings) -> JSONResponse:
    texts, delivery = [], first
    try:
        while True:
            if delivery.error:
                raise APIError(500, f"Generation failed: {delivery.error}")
            texts.append(delivery.event.text)
            record.completion += 1
            record.last = delivery.time
            if delivery.event.finish_reason:
                record.finish = delivery.event.finish_reason
                break
            delivery = await subscription.next(deadline, request)
    except Timeout:
        worker.cancel(sequence)
        raise _timeout(settings) from None
    except Disconnected:
        worker.cancel(sequence)
        record.log(499, "client disconnected")
        return JSONResponse({}, status_code=499)
    finally:
        subscription.close()
    body = completion(record.rid, settings.model_name, "".join(texts), record.finish,
                      usage(record.prompt, record.visual, record.completion))
    record.log(200)
    return JSONResponse(body, headers=record.headers())


async def _stream(record: Record, first: Delivery, subscription: Subscription, worker: DecodeLoop, sequence: int,
                  deadline: float, settings: ServeSettings, include_usage: bool) -> AsyncIterator[str]:
    """The answer as OpenAI's chunks; the sequence is cancelled if the client goes away (the generator is closed)."""
    model, created = settings.model_name, int(time.time())
    status, detail = 200, ""
    try:
        yield json.dumps(chunk(record.rid, model, created, {"role": "assistant", "content": ""}))
        delivery = first
        while True:
            if delivery.error:
                status, detail = 500, delivery.error
                yield json.dumps(APIError(500, f"Generation failed: {delivery.error}").body())
                return
            event = delivery.event
            record.completion += 1
            record.last = delivery.time
            if event.text:
                yield json.dumps(chunk(record.rid, model, created, {"content": event.text}))
            if event.finish_reason:
                record.finish = event.finish_reason
                yield json.dumps(chunk(record.rid, model, created, {}, event.finish_reason))
                break
            try:
                delivery = await subscription.next(deadline)
            except Timeout:
                status, detail = 504, "timed out mid-stream"
                yield json.dumps(_timeout(settings).body())
                return
        if include_usage:
            yield json.dumps(chunk(record.rid, model, created, None, None,
                                   usage(record.prompt, record.visual, record.completion, record.timings())))
        yield "[DONE]"
    except (asyncio.CancelledError, GeneratorExit):
        status, detail = 499, "client disconnected mid-stream"
        raise
    finally:
        worker.cancel(sequence)  # a no-op once the answer has ended
        subscription.close()
        record.log(status, detail)


# -- running it ----------------------------------------------------------------------------------------------------


def serve(ckpt: str | Path, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None) -> None:
    """Load a checkpoint and serve it until interrupted (``nvila serve``)."""
    import uvicorn

    from nvila.workflows.pretrained import load_model

    settings = settings or ServeSettings(model_name=Path(ckpt).resolve().name)
    _log_to_stderr()
    model = load_model(ckpt)  # nvila's layout or a released NVILA checkpoint, full precision or quantized
    uvicorn.run(create_app(model, settings), host=host, port=port, access_log=False, log_level="info")


def _log_to_stderr() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` from a background thread for the duration of the block; yields its base URL
    (``http://127.0.0.1:PORT``). Tests and ``nvila bench serve`` (``nvila.workflows.bench.serving``) use it."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="nvila-serve", daemon=True)
    thread.start()
    started = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - started > 60:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(30)
