"""Held-out evaluation by generation: the model answers each question, and answers are matched exactly."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from nvila.core.data.shards import read_records
from nvila.core.engine import ChatRequest, DecodingConfig, Engine
from nvila.core.model import NvilaModel


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

    @property
    def accuracy(self) -> float:
        return sum(a.correct for a in self.answers) / max(len(self.answers), 1)


def normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def evaluate(model: NvilaModel, shards: list[str], batch_size: int = 32, limit: int | None = None,
             max_new_tokens: int = 8) -> EvalResult:
    """Answer the last question of each held-out conversation by greedy generation through the engine."""
    model.eval()
    engine = Engine(model)
    config = DecodingConfig(max_new_tokens=max_new_tokens)
    result = EvalResult()
    records = itertools.islice(read_records(shards), limit)
    while batch := list(itertools.islice(records, batch_size)):
        requests, answers = [], []
        for record, images in batch:
            turns = record["conversations"]
            requests.append(ChatRequest(turns[:-1], images=images))
            question = turns[-2]["value"].replace("<image>", "").strip()
            answers.append(Answer(question, turns[-1]["value"], "", record.get("qtype")))
        for answer, completion in zip(answers, engine.generate(requests, config)):
            answer.predicted = completion.text.strip()
            result.answers.append(answer)
    return result
