"""Held-out evaluation by generation: the model answers each question, and answers are matched exactly."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from nvila.core.data.shards import read_records
from nvila.core.model import NvilaModel
from nvila.core.processor import collate


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


@torch.no_grad()
def evaluate(model: NvilaModel, shards: list[str], batch_size: int = 32, limit: int | None = None,
             max_new_tokens: int = 8) -> EvalResult:
    """Answer the last question of each held-out conversation by greedy generation."""
    model.eval()
    result = EvalResult()
    records = itertools.islice(read_records(shards), limit)
    while batch := list(itertools.islice(records, batch_size)):
        prompts, answers = [], []
        for record, images in batch:
            turns = record["conversations"]
            prompts.append(model.processor.encode(turns[:-1], images, generation_prompt=True))
            question = turns[-2]["value"].replace("<image>", "").strip()
            answers.append(Answer(question, turns[-1]["value"], "", record.get("qtype")))
        inputs = collate(prompts, model.tokenizer.pad_token_id, left_pad=True)
        new_ids = model.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixels"],
                                 inputs["grids"], max_new_tokens=max_new_tokens)
        for answer, text in zip(answers, model.tokenizer.batch_decode(new_ids, skip_special_tokens=True)):
            answer.predicted = text.strip()
            result.answers.append(answer)
    return result
