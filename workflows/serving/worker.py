"""The server's one decoding thread: it steps the core's continuous-batching scheduler while there is work, and
hands each token to the request it belongs to.

The HTTP side (asyncio) never runs the model: it encodes a request, :meth:`DecodeLoop.submit`\\ s it with a
callback, and reads what the callback delivers (usually into an ``asyncio.Queue`` through
``loop.call_soon_threadsafe``). The queue of requests waiting for a place in the batch is bounded:
:class:`QueueFull` when it is full, which the server answers with 429.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from nvila.core.engine import DecodingConfig, Engine, TokenEvent
from nvila.core.processor import Encoded
from nvila.core.scheduler import Scheduler

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every place in the batch and in the waiting queue is taken."""


@dataclass(frozen=True)
class Delivery:
    """What a request's callback receives: a token, or the error that ended its sequence."""

    event: TokenEvent | None
    error: str | None
    time: float
    """``time.perf_counter()`` when the step that made it ended."""


class DecodeLoop:
    """Runs a :class:`Scheduler` in a thread of its own; see the module's documentation."""

    def __init__(self, engine: Engine, max_batch: int = 8, prefill_batch: int = 1, max_queue: int = 32,
                 prefill_tokens: int | None = None) -> None:
        self.scheduler = Scheduler(engine, max_batch, prefill_batch, prefill_tokens)
        self.max_queue = max_queue
        self._callbacks: dict[int, Callable[[Delivery], None]] = {}
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nvila-decode", daemon=True)
        self.failure: BaseException | None = None
        """What stopped the thread, if it died (the health check reports it)."""

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._work:
            self._stopping = True
            self._work.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, encoded: Encoded, config: DecodingConfig, callback: Callable[[Delivery], None]) -> int:
        """Queue a request; ``callback`` gets each :class:`Delivery` of its sequence, in the decoding thread."""
        with self._work:
            if self.scheduler.waiting >= self.max_queue:
                raise QueueFull
            sequence = self.scheduler.submit(encoded, config)
            self._callbacks[sequence] = callback
            self._work.notify()
        return sequence

    def cancel(self, sequence: int) -> None:
        """Stop a sequence (its client went away or timed out): its place in the batch is free at the next step."""
        with self._work:
            if self._callbacks.pop(sequence, None) is not None:
                self.scheduler.cancel(sequence)
                self._work.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._work:
                    while self.scheduler.idle and not self._stopping:
                        self._work.wait()
                    if self._stopping:
                        return
                tick = self.scheduler.step()
                now = time.perf_counter()
                with self._lock:
                    deliveries = [(self._callbacks.get(e.request), Delivery(e, None, now)) for e in tick.events]
                    deliveries += [(self._callbacks.get(s), Delivery(None, error, now))
                                   for s, error in tick.failed.items()]
                    for event in tick.events:
                        if event.finish_reason:
                            self._callbacks.pop(event.request, None)
                    for sequence in tick.failed:
                        self._callbacks.pop(sequence, None)
                for callback, delivery in deliveries:
                    if callback is not None:
                        callback(delivery)
        except BaseException as exc:  # noqa: BLE001 - reported by /health; the requests in flight get the error
            self.failure = exc
            log.exception("the decoding thread stopped")
            with self._lock:
                callbacks, self._callbacks = list(self._callbacks.values()), {}
                self._stopping = True
            for callback in callbacks:
                callback(Delivery(None, f"the decoding thread stopped: {type(exc).__name__}: {exc}",
                                  time.perf_counter()))
            raise
