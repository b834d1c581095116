"""The inference engine: chat messages with images and videos -> model inputs -> prefill -> token-by-token decode.

Every caller that generates goes through here (``nvila generate``, ``nvila eval``, and the chat command,
the OpenAI-compatible server and quantized inference to come)::

    engine = Engine(model)
    request = ChatRequest([{"role": "user", "content": "<image>\\nWhat shape is shown?"}], images=[image])
    for step in engine.stream([request], DecodingConfig(max_new_tokens=32)):
        print(step.events[0].text, end="", flush=True)
    (answer,) = engine.generate([request], DecodingConfig(temperature=0.7, seed=1))

The steps, each public so that benchmarks can time exactly what generation runs:

1. :meth:`Engine.inputs`: messages through the model's own processor (the checkpoint's chat template), left
   padded into one batch by ``collate``.
2. :meth:`Engine.prefill`: visual tokens spliced into the prompt embeddings, one language-model forward
   over every prompt that fills the KV cache and gives each prompt's next-token logits.
3. :meth:`Engine.stream`: one token per running sequence per step, each step one forward of the new tokens
   against the cache. A sequence ends at the tokenizer's EOS, at a stop string (cut from its text), or
   after ``max_new_tokens``; finished sequences stop emitting while the others go on.

Each request samples with its own ``torch.Generator``, so a seed reproduces an answer whatever its batch mates.

:meth:`Engine.join` and :meth:`Engine.keep` merge and split decoding states, so that requests can join a running
decode and leave it when they finish: ``nvila.core.scheduler`` does continuous batching with them (the server).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from nvila.core import kv_cache
from nvila.core.errors import NvilaError
from nvila.core.processor import IMAGE_TOKEN, ROLES, VIDEO_TOKEN, Encoded, SampleTooLong, collate


class PromptTooLong(NvilaError):
    """A request whose prompt (visual tokens included) is longer than the model's ``max_length``."""


FINISH_REASONS = ("stop", "length")
"""Why a sequence ended: "stop" (EOS or a stop string), "length" (``max_new_tokens`` reached)."""


@dataclass(frozen=True)
class DecodingConfig:
    """How to pick each new token, and when to stop."""

    max_new_tokens: int = 256
    """Most tokens generated per request (the EOS token counts)."""
    temperature: float = 0.0
    """0 picks the most likely token (greedy); above 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens whose probabilities sum to top_p (1 keeps all)."""
    seed: int | None = None
    """Seed of this request's own random generator: the same seed gives the same sampled answer. None: unseeded."""
    stop: tuple[str, ...] = ()
    """Strings that end the answer; the answer's text stops before the first one (which is not included)."""

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        problems = []
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be a whole number of at least 1, got {self.max_new_tokens!r}")
        if not _real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be 0 (greedy) or a positive number, got {self.temperature!r}")
        if not _real(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            problems.append(f"seed must be a whole number in [0, 2**63) or None, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in stop):
            problems.append(f"stop must be non-empty strings, got {self.stop!r}")
        if problems:
            raise NvilaError("Invalid decoding settings: " + "; ".join(problems) + ".")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class ChatRequest:
    """One conversation to answer.

    ``messages`` are OpenAI-like: ``{"role": "system" | "user" | "assistant", "content": ...}`` where content
    is text whose ``<image>`` / ``<video>`` placeholders ``images`` / ``videos`` fill in order, or a list of
    parts ``{"type": "text", "text": str}``, ``{"type": "image", "image": PIL.Image}``,
    ``{"type": "video", "video": [PIL.Image, ...]}`` (each media part becomes its placeholder and a newline).
    LLaVA turns (``{"from": "human" | "gpt", "value": str}``) are accepted too. The engine answers the last
    message, which must not be the assistant's.
    """

    messages: Sequence[Mapping[str, Any]]
    images: Sequence[Image.Image] = ()
    """Images for the ``<image>`` placeholders written in text content, in order."""
    videos: Sequence[Sequence[Image.Image]] = ()
    """Videos (each a list of frames) for the ``<video>`` placeholders written in text content, in order."""


def chat_turns(request: ChatRequest) -> tuple[list[dict[str, str]], list[Image.Image], list[list[Image.Image]]]:
    """A request as the processor takes it: ``{"role", "content": str}`` turns, then its images and videos."""
    if not request.messages:
        raise NvilaError("A chat request needs at least one message.")
    turns: list[dict[str, str]] = []
    images: list[Image.Image] = []
    videos: list[list[Image.Image]] = []
    for i, message in enumerate(request.messages):
        if not isinstance(message, Mapping):
            raise NvilaError(f"message {i} is a {type(message).__name__}, not a mapping with role and content")
        role = ROLES.get(message.get("role", message.get("from")))
        if role is None:
            raise NvilaError(f"message {i}: role {message.get('role', message.get('from'))!r} is not one of "
                             "system, user, assistant")
        content = message.get("content", message.get("value"))
        if isinstance(content, str):
            text = content
        elif isinstance(content, Sequence) and not isinstance(content, bytes):
            text = "".join(_part_text(i, part, images, videos) for part in content)
        else:
            raise NvilaError(f"message {i}: content must be text or a list of parts, got {type(content).__name__}")
        turns.append({"role": role, "content": text})
    if turns[-1]["role"] == "assistant":
        raise NvilaError("The last message is the assistant's: the engine writes the assistant's next turn, so "
                         "end the conversation with a user (or system) message.")
    if (images or videos) and (request.images or request.videos):
        raise NvilaError("Give media either as content parts or in the request's images/videos lists, not both: "
                         "their order would be ambiguous.")
    if request.images or request.videos:
        images, videos = list(request.images), [list(v) for v in request.videos]
    return turns, images, videos


def _part_text(i: int, part: object, images: list[Image.Image], videos: list[list[Image.Image]]) -> str:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if kind == "image" and isinstance(part.get("image"), Image.Image):
        images.append(part["image"])
        return f"{IMAGE_TOKEN}\n"
    if kind == "video" and isinstance(part.get("video"), Sequence) \
            and all(isinstance(f, Image.Image) for f in part["video"]):
        videos.append(list(part["video"]))
        return f"{VIDEO_TOKEN}\n"
    raise NvilaError(f"message {i}: content part {_describe(part)} is not one of {{'type': 'text', 'text': str}}, "
                     "{'type': 'image', 'image': PIL.Image}, {'type': 'video', 'video': [PIL.Image, ...]}")


def _describe(part: object) -> str:
    if isinstance(part, Mapping):
        return "{" + ", ".join(f"{k!r}: {type(v).__name__}" for k, v in part.items()) + "}"
    return type(part).__name__


@dataclass(frozen=True)
class TokenEvent:
    """One new token of one sequence."""

    request: int
    """Index of the request in the batch (:meth:`Engine.stream`), or its sequence id (``nvila.core.scheduler``)."""
    token_id: int
    text: str
    """Text this token adds to the answer; empty while text is held back (the start of a possible stop string,
    or bytes of an unfinished character), or for EOS. The events' texts concatenate to the answer."""
    finish_reason: str | None = None
    """"stop" or "length" on a sequence's last token, else None."""


@dataclass(frozen=True)
class Step:
    """One decoding step: a token for every sequence still running."""

    index: int
    """0 for the token from the prefill's logits, then 1, 2, ..."""
    seconds: float
    """Wall time of the forward pass (prefill for step 0, with the visual encoder) and token choice."""
    events: tuple[TokenEvent, ...]


@dataclass
class Completion:
    """A finished answer and what it cost."""

    text: str
    token_ids: list[int]
    """Every generated token id, EOS and the tokens of a stop string included."""
    finish_reason: str
    """"stop" (EOS or a stop string) or "length"."""
    prompt_tokens: int
    """Prompt length in tokens, visual tokens included (no padding)."""
    visual_tokens: int
    """Image and video tokens in the prompt."""
    completion_tokens: int
    prefill_s: float
    """Seconds of the batch's prefill (visual encoder and language model) and first token."""
    decode_tokens_per_s: float
    """Tokens after the first, per second of the decode steps this sequence ran in (nan for one token)."""


@dataclass
class Prefill:
    """The state after a batch's prompts have run: the KV cache and each prompt's next-token logits."""

    logits: torch.Tensor
    """(B, V) next-token logits at each prompt's last position."""
    cache: Any
    """The language model's cache (opaque; see ``LanguageModel.forward_with_cache``)."""
    attention_mask: torch.Tensor
    """(B, L) 1 on prompt tokens, 0 on left padding."""
    positions: torch.Tensor
    """(B,) position id of each prompt's last token."""


class _Detokenizer:
    """Token ids -> text deltas that concatenate to the decoded text, with stop strings cut off.

    Decodes a short window of recent tokens rather than the whole answer at every step. The window starts at the
    tokens before the last emitted ones, so that tokenizers whose decoding of a token depends on the one before
    (leading spaces) decode it as in the whole text. Text ending in U+FFFD (bytes of a character that is not
    complete yet) waits for the next token. Text that may be the start of a stop string waits too.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # all text decoded so far
        self.emitted = 0  # characters of self.text already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Text to emit after ``token_id``, and whether a stop string has ended the answer."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        window = self._decode(self.ids[self.prefix_offset:])
        if len(window) > len(prefix) and not window.endswith("\ufffd"):
            self.text += window[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever text is still held back, at the end of the answer."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        self.text += self._decode(self.ids[self.prefix_offset:])[len(prefix):]
        self.read_offset = len(self.ids)
        text, _ = self._release(final=True)
        return text

    def _release(self, final: bool) -> tuple[str, bool]:
        if self.stop:
            start = max(0, self.emitted - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                return self._emit(len(self.text)), True
        if final:
            return self._emit(len(self.text)), False
        return self._emit(len(self.text) - self._held()), False

    def _held(self) -> int:
        """Characters at the end of the text that could begin a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta


class Answer:
    """One answer being written: its settings, random generator and text so far. Turns each chosen token into a
    :class:`TokenEvent` and decides when the answer ends (EOS, a stop string, ``max_new_tokens``), the same way
    for a fixed batch (:meth:`Engine.stream`) and for continuous batching (``nvila.core.scheduler``)."""

    def __init__(self, tokenizer: Any, eos_token_id: int | None, config: DecodingConfig, request: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.config, self.request, self.eos_token_id = config, request, eos_token_id
        self.generator = _generator(config, torch.device(device))
        self.text = _Detokenizer(tokenizer, config.stop)
        self.count = 0
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> TokenEvent:
        """The event of the answer's next token; its ``finish_reason`` is set on the last one."""
        self.count += 1
        if token == self.eos_token_id:
            text, reason = self.text.finish(), "stop"
        else:
            text, stopped = self.text.add(token)
            reason = "stop" if stopped else "length" if self.count == self.config.max_new_tokens else None
            if reason == "length":
                text += self.text.finish()
        self.finish_reason = reason
        return TokenEvent(self.request, token, text, reason)


class Engine:
    """Generates answers with an :class:`~nvila.core.model.NvilaModel` (its processor, embedder and language
    model); holds no state between calls, so one engine serves any number of batches.

    ``eos_token_id`` (the tokenizer's EOS) ends an answer; ``pad_token_id`` fills the left padding and is fed
    to sequences that have finished while others run on.
    """

    def __init__(self, model: Any, compile_decode: bool = False) -> None:
        self.model = model
        self.compile_decode = compile_decode
        """Decoding steps run the language model through ``torch.compile`` (see :mod:`nvila.core.compiled`): faster
        steps once the first ones have compiled (tens of seconds). The model must not change while it decodes."""
        self._compiled_step = None
        if compile_decode:
            from nvila.core.compiled import compile_step

            self._compiled_step = compile_step(model.llm, self.device)
        self.tokenizer = model.tokenizer
        self.eos_token_id = self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.eos_token_id

    def warm_up(self, batch_sizes: Iterable[int] = (1,)) -> None:
        """Answer a short text prompt at each batch size, so that a compiled decoding step compiles now (tens of
        seconds per batch shape) rather than inside the first real request."""
        request = ChatRequest([{"role": "user", "content": "Hello"}])
        for size in batch_sizes:
            state = self.prefill(self.inputs([request] * size))
            for _ in range(2):  # the first step compiles; the second checks that it is not compiled again
                state = self.step(state, state.logits.argmax(-1))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- inputs ------------------------------------------------------------------------------------------------

    def encode(self, request: ChatRequest | Sequence[Mapping[str, Any]]) -> Encoded:
        """One request through the model's processor, with the generation prompt (the assistant's header)."""
        from jinja2.exceptions import TemplateError

        if not isinstance(request, ChatRequest):
            request = ChatRequest(request)
        turns, images, videos = chat_turns(request)
        try:
            return self.model.processor.encode(turns, images, generation_prompt=True, videos=videos)
        except TemplateError as exc:
            raise NvilaError(f"The checkpoint's chat template refused the conversation: {exc}") from None
        except SampleTooLong as exc:
            raise PromptTooLong(f"The prompt is too long: {exc}.") from None
        except ValueError as exc:  # placeholder/media mismatch, a prompt longer than max_length, ...
            raise NvilaError(f"Cannot encode the request: {exc}") from None

    def inputs(self, requests: Sequence[ChatRequest | Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
        """A left-padded batch of requests on the model's device: ``input_ids``, ``attention_mask``, media."""
        if not requests:
            raise NvilaError("No requests to generate for.")
        encoded = []
        for i, request in enumerate(requests):
            try:
                encoded.append(self.encode(request))
            except NvilaError as exc:
                raise NvilaError(f"request {i}: {exc}" if len(requests) > 1 else str(exc)) from None
        return self.collate(encoded)

    def collate(self, encoded: Sequence[Encoded]) -> dict[str, Any]:
        """Requests already through :meth:`encode` as one left-padded batch on the model's device."""
        return self._to_device(collate(encoded, self.pad_token_id, left_pad=True))

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        device, dtype = self.device, _floating_dtype(self.model.encoder)
        out = {k: v for k, v in batch.items() if k != "labels"}
        for key in ("input_ids", "attention_mask"):
            out[key] = batch[key].to(device)
        for key in ("pixels", "videos"):
            if batch.get(key) is not None:
                out[key] = batch[key].to(device, dtype)
        return out

    # -- prefill and decode ------------------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        """Prompt embeddings with the visual tokens spliced in: (B, L, D). The vision half of :meth:`prefill`."""
        return self.model.embed(inputs["input_ids"], inputs.get("pixels"), inputs.get("grids") or [],
                                inputs.get("videos"), inputs.get("video_grids"))

    @torch.no_grad()
    def prefill(self, inputs: Mapping[str, Any], embeds: torch.Tensor | None = None) -> Prefill:
        """Run the prompts of a batch from :meth:`inputs`: the KV cache and each prompt's next-token logits.

        Given ``embeds`` (from :meth:`embed`), only the language model runs: time that to measure the
        language-model prefill alone, and this method without ``embeds`` for the time to the first token.
        """
        if embeds is None:
            embeds = self.embed(inputs)  # (B, L, D)
        mask = inputs["attention_mask"]  # (B, L)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L): each prompt counts from 0 after its padding
        logits, cache = self.model.llm.forward_with_cache(embeds, mask, position_ids)  # (B, 1, V)
        return Prefill(logits[:, -1].float(), cache, mask, position_ids[:, -1])

    @torch.no_grad()
    def step(self, state: Prefill, token_ids: torch.Tensor) -> Prefill:
        """Feed one new token per sequence (B,) against the cache: the next state, logits for the token after."""
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(len(token_ids), 1)], dim=1)
        positions = state.positions + 1  # (B,)
        embeds = self.model.llm.embed(token_ids[:, None])  # (B, 1, D)
        kv_cache.reserve(state.cache, 1)  # room to write the step's keys and values in place (nvila.core.kv_cache)
        forward = self._compiled_step or self.model.llm.forward_with_cache
        logits, cache = forward(embeds, mask, positions[:, None], state.cache)
        return Prefill(logits[:, -1].float(), cache, mask, positions)

    def stream(self, requests: Sequence[ChatRequest | Sequence[Mapping[str, Any]]],
               config: DecodingConfig | Sequence[DecodingConfig] | None = None) -> Iterator[Step]:
        """Answer a batch of requests token by token: one :class:`Step` per decoding step, as soon as it is known.

        ``config`` is one setting for all requests or one per request. Requests are encoded before the first
        step, so bad input raises here, not halfway through the stream.
        """
        configs = self._configs(config, len(requests))
        inputs = self.inputs(requests)
        return self.stream_inputs(inputs, configs)

    def stream_inputs(self, inputs: Mapping[str, Any],
                      config: DecodingConfig | Sequence[DecodingConfig] | None = None) -> Iterator[Step]:
        """:meth:`stream` for a batch already built by :meth:`inputs`."""
        batch = inputs["input_ids"].shape[0]
        return self._decode(inputs, self._configs(config, batch))

    @torch.no_grad()
    def join(self, states: Sequence[Prefill]) -> Prefill:
        """Several batches' states as one batch, rows in order: each is left-padded to the longest.

        Continuous batching (``nvila.core.scheduler``) adds a newly prefilled request to the running decode with
        this; the padding is masked, so every row decodes as it would alone. Consumes ``states``.
        """
        if len(states) == 1:
            return states[0]
        lengths = [s.attention_mask.shape[1] for s in states]
        longest = max(lengths)
        mask = torch.cat([torch.nn.functional.pad(s.attention_mask, (longest - n, 0))
                          for s, n in zip(states, lengths)])  # (sum B_i, longest)
        cache = self.model.llm.concat_caches([s.cache for s in states], lengths)
        return Prefill(torch.cat([s.logits for s in states]), cache, mask, torch.cat([s.positions for s in states]))

    @torch.no_grad()
    def keep(self, state: Prefill, rows: Sequence[int]) -> Prefill:
        """The state of some rows only (finished sequences leave the batch), without the columns of left padding
        that every kept row has. Consumes ``state``."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=state.logits.device)
        mask = state.attention_mask[index]  # (B', L)
        start = int(mask.any(0).nonzero()[0]) if len(index) else 0  # the first column a kept row attends to
        cache = self.model.llm.select_cache(state.cache, index, start)
        return Prefill(state.logits[index], cache, mask[:, start:], state.positions[index])

    @torch.no_grad()
    def _decode(self, inputs: Mapping[str, Any], configs: list[DecodingConfig]) -> Iterator[Step]:
        device = self.device
        answers = [self.answer(c, i) for i, c in enumerate(configs)]
        running = [True] * len(configs)
        start = time.perf_counter()
        state = self.prefill(inputs)
        for index in range(max(c.max_new_tokens for c in configs)):
            tokens = self.choose(state.logits, [a if r else None for a, r in zip(answers, running)])  # (B,)
            _synchronize(device)
            seconds = time.perf_counter() - start
            events = []
            for i, token in enumerate(tokens.tolist()):
                if running[i]:
                    events.append(answers[i].add(token))
                    running[i] = not answers[i].finished
            yield Step(index, seconds, tuple(events))
            if not any(running):
                return
            start = time.perf_counter()
            tokens = torch.where(torch.tensor(running, device=device), tokens, self.pad_token_id)
            state = self.step(state, tokens)

    def answer(self, config: DecodingConfig, request: int = 0) -> Answer:
        """A new :class:`Answer` to ``config``, its events numbered ``request``."""
        return Answer(self.tokenizer, self.eos_token_id, config, request, self.device)

    def choose(self, logits: torch.Tensor, answers: Sequence[Answer | None]) -> torch.Tensor:
        """The next token of every sequence (B,) from its logits (B, V): argmax, or a sample with the answer's own
        generator. Rows whose answer is None (finished) get the argmax, which the caller ignores."""
        tokens = logits.argmax(-1)  # (B,)
        for i, answer in enumerate(answers):
            if answer is not None and not answer.config.greedy:
                tokens[i] = sample(logits[i], answer.config.temperature, answer.config.top_p, answer.generator)
        return tokens

    def generate(self, requests: Sequence[ChatRequest | Sequence[Mapping[str, Any]]],
                 config: DecodingConfig | Sequence[DecodingConfig] | None = None) -> list[Completion]:
        """Answer a batch of requests: the finished :class:`Completion` of each, in order (consumes :meth:`stream`)."""
        configs = self._configs(config, len(requests))
        return self.generate_inputs(self.inputs(requests), configs)

    def generate_inputs(self, inputs: Mapping[str, Any],
                        config: DecodingConfig | Sequence[DecodingConfig] | None = None) -> list[Completion]:
        """:meth:`generate` for a batch already built by :meth:`inputs`."""
        return self.collect(inputs, self.stream_inputs(inputs, config))

    def collect(self, inputs: Mapping[str, Any], steps: Iterable[Step]) -> list[Completion]:
        """The :class:`Completion` of each request of ``inputs`` from the steps of its stream.

        A caller that shows tokens as they come passes the stream through its own loop and still gets the
        finished answers and their counts and timings::

            def echo(steps):
                for step in steps:
                    print(step.events[0].text, end="", flush=True)
                    yield step

            (answer,) = engine.collect(inputs, echo(engine.stream_inputs(inputs, config)))
        """
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        visual = self.visual_mask(ids)
        batch = ids.shape[0]
        texts: list[list[str]] = [[] for _ in range(batch)]
        token_ids: list[list[int]] = [[] for _ in range(batch)]
        reasons: list[str] = [""] * batch
        decode_s = [0.0] * batch
        prefill_s = 0.0
        for step in steps:
            if step.index == 0:
                prefill_s = step.seconds
            for event in step.events:
                texts[event.request].append(event.text)
                token_ids[event.request].append(event.token_id)
                if step.index:
                    decode_s[event.request] += step.seconds
                if event.finish_reason:
                    reasons[event.request] = event.finish_reason
        return [Completion(text="".join(texts[i]), token_ids=token_ids[i], finish_reason=reasons[i],
                           prompt_tokens=int(mask[i].sum()), visual_tokens=int(visual[i].sum()),
                           completion_tokens=len(token_ids[i]), prefill_s=prefill_s,
                           decode_tokens_per_s=(len(token_ids[i]) - 1) / decode_s[i] if decode_s[i] else math.nan)
                for i in range(batch)]

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Where the image and video tokens are in prompt ids (any shape): a bool tensor of the same shape."""
        visual = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in (self.model.image_token_id, self.model.video_token_id):
            if token_id is not None:
                visual |= input_ids == token_id
        return visual

    @staticmethod
    def _configs(config: DecodingConfig | Sequence[DecodingConfig] | None, batch: int) -> list[DecodingConfig]:
        if config is None:
            config = DecodingConfig()
        if isinstance(config, DecodingConfig):
            return [config] * batch
        configs = list(config)
        if len(configs) != batch or not all(isinstance(c, DecodingConfig) for c in configs):
            raise NvilaError(f"Give one DecodingConfig, or one per request ({batch}); got {len(configs)} items.")
        return configs


def sample(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id from logits (V,): softmax(logits / temperature), restricted to the top-p nucleus."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (V,)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)  # (V,)
        before = sorted_probs.cumsum(0) - sorted_probs  # probability mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0)  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]


def _generator(config: DecodingConfig, device: torch.device) -> torch.Generator | None:
    if config.greedy or config.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(config.seed)


def _floating_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype the module computes in: that of its first floating-point parameter (float32 if none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["FINISH_REASONS", "Answer", "ChatRequest", "Completion", "DecodingConfig", "Engine", "Prefill",
           "PromptTooLong", "Step", "TokenEvent", "chat_turns", "sample"]
