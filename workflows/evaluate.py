"""Held-out evaluation by generation: the model answers each question, and answers are matched exactly."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from nvila.core.data.shards import Decoded, SampleDecoder, decoded_stream
from nvila.core.data.skips import Skipped
from nvila.core.engine import ChatRequest, DecodingConfig, Engine
from nvila.core.errors import NvilaError
from nvila.core.model import NvilaModel

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """One evaluated question."""

    question: str
    reference: str
    predicted: str
    qtype: str | None = None

    @property
    def correct(self) -> bool:
        return normalise(self.predicted) == normalise(self.reference)


@dataclass
class EvalResult:
    answers: list[Answer] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    """Samples that could not be asked, by reason (the training pipeline's reasons, plus ``no_question``)."""

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip_summary(self) -> str:
        """``skipped 3 sample(s) (bad_image: 2, too_long: 1)``, or an empty string."""
        if not self.skipped:
            return ""
        counts = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common())
        return f"skipped {self.total_skipped} sample(s) ({counts}); the log names each one"

    @property
    def accuracy(self) -> float:
        return sum(a.correct for a in self.answers) / max(len(self.answers), 1)


def normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def evaluate(model: NvilaModel, shards: list[str], batch_size: int = 32, limit: int | None = None,
             max_new_tokens: int = 8, max_pixels: int | None = None) -> EvalResult:
    """Answer the last question of each held-out conversation by greedy generation through the engine.

    Samples are read through the training pipeline's decoder (:class:`SampleDecoder`), so the same samples are
    skipped for the same reasons, and counted in :attr:`EvalResult.skipped`; ``limit`` counts questions asked.
    An evaluation in which no question could be asked raises :class:`NvilaError`.
    """
    if batch_size < 1:
        raise NvilaError(f"the evaluation batch size must be at least 1, got {batch_size}.")
    model.eval()
    engine = Engine(model)
    config = DecodingConfig(max_new_tokens=max_new_tokens)
    result = EvalResult()
    decoder = SampleDecoder(model.processor, max_pixels=max_pixels)
    questions = itertools.islice(_questions(decoded_stream(shards, decoder.decode, split_by_rank=False), result),
                                 limit)
    while batch := list(itertools.islice(questions, batch_size)):
        for answer, completion in _answer(engine, batch, config, result):
            answer.predicted = completion.text.strip()
            result.answers.append(answer)
    if not result.answers and result.skipped:
        raise NvilaError(f"No question could be evaluated: {result.skip_summary()}.")
    return result


def _questions(items: Iterator[Decoded | Skipped], result: EvalResult) -> Iterator[tuple[ChatRequest, Answer, str]]:
    for item in items:
        if isinstance(item, Skipped):
            result.skipped[item.reason] += 1
            continue
        turns = item.conversations
        if len(turns) < 2:
            Skipped("malformed_json", item.where, "no question and answer to evaluate").log()
            result.skipped["malformed_json"] += 1
            continue
        question = str(turns[-2].get("value", turns[-2].get("content", "")))
        for token in ("<image>", "<video>"):
            question = question.replace(token, "")
        reference = str(turns[-1].get("value", turns[-1].get("content", "")))
        answer = Answer(question.strip(), reference, "", item.record.get("qtype"))
        yield ChatRequest(turns[:-1], images=item.images, videos=item.videos), answer, item.where


def _answer(engine: Engine, batch: list[tuple[ChatRequest, Answer, str]], config: DecodingConfig,
            result: EvalResult) -> Iterator[tuple[Answer, Any]]:
    """Completions of a batch; when the engine refuses it, each request alone, skipping those it refuses."""
    try:
        completions = engine.generate([request for request, _, _ in batch], config)
    except NvilaError as exc:
        if len(batch) > 1:
            for one in batch:
                yield from _answer(engine, [one], config, result)
            return
        reason = "too_long" if "max_length" in str(exc) else "encode_error"
        Skipped(reason, batch[0][2], str(exc)).log()
        result.skipped[reason] += 1
        return
    yield from zip([answer for _, answer, _ in batch], completions)
