"""Continuous batching: requests join a running decode as they come, and leave it when they finish.

The engine (``nvila.core.engine``) answers a fixed batch. A server gets requests one at a time, whenever
clients send them; running each batch to its end before starting the next would keep a new request waiting for
the longest answer of the batch before it. :class:`Scheduler` keeps one running batch instead::

    engine = Engine(model)
    scheduler = Scheduler(engine, max_batch=8)
    sequence = scheduler.submit(engine.encode(request), DecodingConfig(max_new_tokens=32))
    while not scheduler.idle:
        for event in scheduler.step().events:
            ...  # event.request is the sequence id that submit returned

Each :meth:`Scheduler.step`:

1. drops cancelled sequences (a client that went away) from the queue and from the batch;
2. runs one decode step of the running batch: one language-model forward for all of them, the weights read
   once (decode is memory-bound, so a batch of 8 costs little more than one sequence);
3. admits waiting requests while the batch has room, at most ``prefill_batch`` per step (and at most
   ``prefill_tokens`` once padded): prefills them together (visual encoder and prompts; one forward for several
   prompts costs far less than one each: on the CPU, 8 short prompts of a 100 M model took 2.4x less time
   together) and joins them to the batch (:meth:`Engine.join`), so new prompts delay the running sequences'
   next token by one prefill only;
4. chooses every sequence's next token, one :class:`TokenEvent` each, and lets the finished ones leave
   (:meth:`Engine.keep`).

A greedy answer is the same, token for token, as the engine's answer to the request alone: left padding is
masked, positions count per sequence, and a sampled answer draws from its own generator (its seed reproduces it
whatever its batch mates).

:meth:`Scheduler.submit` and :meth:`Scheduler.cancel` may be called from any thread; :meth:`Scheduler.step`
from one thread at a time (the server's decoding thread).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from nvila.core.engine import Answer, DecodingConfig, Engine, Prefill, TokenEvent
from nvila.core.errors import NvilaError
from nvila.core.processor import Encoded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tick:
    """What one :meth:`Scheduler.step` did."""

    events: tuple[TokenEvent, ...]
    """A token for every sequence in the batch; ``request`` is the sequence id, ``finish_reason`` set on the last."""
    admitted: tuple[int, ...] = ()
    """Sequences prefilled and joined to the batch in this step (their first token is among ``events``)."""
    failed: dict[int, str] = field(default_factory=dict)
    """Sequences that failed in this step (sequence id -> error message); they have left the batch."""
    batch: int = 0
    """Sequences that got a token in this step."""
    seconds: float = 0.0
    """Wall time of the step: the decode forward, any prefill, and the choice of tokens."""


class Scheduler:
    """Continuous batching over one :class:`Engine`; see the module's documentation.

    ``max_batch`` is the most sequences decoding together; ``prefill_batch`` the most waiting requests prefilled
    (together) in one step, and ``prefill_tokens`` (None: no limit) the most tokens that prefill may hold once
    its prompts are padded to the longest: a long prompt is not batched with short ones that it would pad out,
    and one prompt longer than the limit is still prefilled, alone.
    """

    def __init__(self, engine: Engine, max_batch: int = 8, prefill_batch: int = 1,
                 prefill_tokens: int | None = None) -> None:
        for name, value in (("max_batch", max_batch), ("prefill_batch", prefill_batch),
                            ("prefill_tokens", 1 if prefill_tokens is None else prefill_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise NvilaError(f"{name} must be a whole number of at least 1, got {value!r}")
        self.engine, self.max_batch, self.prefill_batch = engine, max_batch, prefill_batch
        self.prefill_tokens = prefill_tokens
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._waiting: deque[tuple[int, Encoded, DecodingConfig]] = deque()
        self._cancelled: set[int] = set()
        self._state: Prefill | None = None
        self._answers: list[Answer] = []  # one per row of the state
        self._tokens: torch.Tensor | None = None  # (B,) each row's last token, fed to the next decode step
        self.peak_batch = 0
        """The most sequences that have decoded together so far."""

    # -- any thread ----------------------------------------------------------------------------------------------

    def submit(self, encoded: Encoded, config: DecodingConfig) -> int:
        """Queue a request (from :meth:`Engine.encode`) to answer with ``config``; returns its sequence id."""
        with self._lock:
            sequence = next(self._ids)
            self._waiting.append((sequence, encoded, config))
        return sequence

    def cancel(self, sequence: int) -> None:
        """Drop a sequence at the next step, waiting or running (unknown or finished ones are ignored)."""
        with self._lock:
            self._cancelled.add(sequence)

    @property
    def waiting(self) -> int:
        """Requests queued, not yet prefilled."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Sequences in the decoding batch."""
        return len(self._answers)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._answers

    # -- the decoding thread -------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> Tick:
        """Decode one token of every running sequence, admitting waiting ones first (see the module docs)."""
        start = time.perf_counter()
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if cancelled:
                self._waiting = deque(w for w in self._waiting if w[0] not in cancelled)
        if cancelled and self._answers:
            self._leave([i for i, a in enumerate(self._answers) if a.request not in cancelled])
        failed: dict[int, str] = {}
        if self._state is not None:
            try:
                self._state = self.engine.step(self._state, self._tokens)
            except Exception as exc:  # noqa: BLE001 - out of memory, a broken backend: fail these, keep serving
                log.exception("decode step failed for %d sequence(s)", len(self._answers))
                failed.update({a.request: f"decoding failed: {type(exc).__name__}: {exc}" for a in self._answers})
                self._leave([])
        admitted = self._admit(failed)
        if self._state is None:
            return Tick((), admitted, failed, 0, time.perf_counter() - start)
        tokens = self.engine.choose(self._state.logits, self._answers)  # (B,)
        events = tuple(a.add(t) for a, t in zip(self._answers, tokens.tolist()))
        self._tokens = tokens
        if any(a.finished for a in self._answers):
            self._leave([i for i, a in enumerate(self._answers) if not a.finished])
        return Tick(events, admitted, failed, len(events), time.perf_counter() - start)

    def _admit(self, failed: dict[int, str]) -> tuple[int, ...]:
        with self._lock:
            room = min(self.max_batch - len(self._answers), self.prefill_batch)
            batch, longest = [], 0
            while self._waiting and len(batch) < room:
                longest = max(longest, len(self._waiting[0][1].input_ids))
                if batch and self.prefill_tokens is not None and (len(batch) + 1) * longest > self.prefill_tokens:
                    break
                batch.append(self._waiting.popleft())
        if not batch:
            return ()
        try:
            state = self.engine.prefill(self.engine.collate([encoded for _, encoded, _ in batch]))
            joined = state if self._state is None else self.engine.join([self._state, state])
        except Exception as exc:  # noqa: BLE001 - the running batch is untouched: only these fail
            log.exception("prefill failed for %d request(s)", len(batch))
            failed.update({sequence: f"prefill failed: {type(exc).__name__}: {exc}" for sequence, _, _ in batch})
            return ()
        self._state = joined
        self._answers += [self.engine.answer(config, sequence) for sequence, _, config in batch]
        self.peak_batch = max(self.peak_batch, len(self._answers))
        return tuple(sequence for sequence, _, _ in batch)

    def _leave(self, rows: list[int]) -> None:
        """Keep only these rows of the batch (none: the batch is gone)."""
        if not rows:
            self._state, self._answers, self._tokens = None, [], None
            return
        self._state = self.engine.keep(self._state, rows)
        self._answers = [self._answers[i] for i in rows]
        self._tokens = self._tokens[torch.as_tensor(rows, device=self._tokens.device)]


__all__ = ["Scheduler", "Tick"]
