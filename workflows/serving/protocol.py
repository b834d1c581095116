"""The OpenAI chat-completions wire format: the request as pydantic models, error bodies, answers and stream chunks.

Requests are validated strictly (a string where a number belongs is an error, not a guess), and every problem
becomes an :class:`APIError`: an HTTP status and OpenAI's error body ``{"error": {"message", "type", "param",
"code"}}``, where ``param`` names the field (``messages.0.content.1.image_url.url``).

Content parts: ``text``; ``image_url`` (a base64 ``data:`` URL, or an http(s) URL where the server allows remote
media); and, beyond OpenAI's own types, a video as ``video_url`` (an mp4 or webm ``data:`` URL, as vLLM and
SGLang accept it) or as ``video`` (a list of frames, each an image URL).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator

ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
               504: "timeout_error"}

MAX_STOP_STRINGS = 4  # as OpenAI's API
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""OpenAI roles -> the engine's; ``developer`` is what newer OpenAI clients send for the system prompt."""

UNSUPPORTED = {
    "tools": "tool calling", "functions": "function calling", "logprobs": "log probabilities",
    "top_logprobs": "log probabilities", "logit_bias": "logit bias", "audio": "audio output",
    "presence_penalty": "presence penalty", "frequency_penalty": "frequency penalty",
    "response_format": "structured output",
}
"""Parameters that change an answer and that this server does not implement: refused unless left at their
neutral value, rather than silently ignored. Other unknown fields are ignored, as OpenAI-compatible servers do."""
NEUTRAL: tuple[Any, ...] = (None, False, 0, 0.0, [], {}, {"type": "text"})


class APIError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # strict: ints are floats, "0.5" is not


class Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class URL(Strict):
    url: StrictStr
    detail: StrictStr | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: StrictStr


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: URL


class VideoURLPart(Strict):
    type: Literal["video_url"]
    video_url: URL


class VideoFramesPart(Strict):
    type: Literal["video"]
    video: list[StrictStr] = Field(min_length=1)
    """Frames, each an image URL (a data: URL, or remote where allowed)."""


Part = Annotated[TextPart | ImagePart | VideoURLPart | VideoFramesPart, Field(discriminator="type")]


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: list[Part]
    """Text, or a list of parts (text is read as one text part)."""
    name: StrictStr | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_or_parts(cls, content: Any) -> Any:
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ValueError(f"content must be a string or a list of content parts, got {_json_type(content)}")
        return content


class StreamOptions(Strict):
    include_usage: StrictBool = False


class ChatCompletionRequest(Strict):
    """The fields of ``POST /v1/chat/completions`` this server reads."""

    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Float | None = Field(None, ge=0, le=2)
    top_p: Float | None = Field(None, gt=0, le=1)
    stop: list[StrictStr] | None = None
    """Strings that end the answer (a single string is read as a list of one)."""
    seed: StrictInt | None = Field(None, ge=0, lt=2**63)
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string(cls, stop: Any) -> Any:
        return [stop] if isinstance(stop, str) else stop

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: list[str] | None) -> list[str] | None:
        if stop and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        if stop and not all(stop):
            raise ValueError("stop strings must not be empty")
        return stop

    @property
    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's current name), else ``max_tokens``, else None."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_request(payload: Any) -> ChatCompletionRequest:
    """A decoded JSON body as a request, or an :class:`APIError` (400) naming every problem found."""
    if not isinstance(payload, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(payload).__name__}.",
                       code="invalid_json")
    for key, what in UNSUPPORTED.items():
        if payload.get(key) not in NEUTRAL:
            raise APIError(400, f"This server does not support {what} ('{key}').", param=key,
                           code="unsupported_parameter")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = _location(errors[0]["loc"])
        problems = "; ".join(f"{_location(e['loc']) or 'body'}: {_message(e)}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        code = "unsupported_content_type" if any(e["type"] == "union_tag_invalid" for e in errors) else None
        raise APIError(400, f"Invalid request: {problems}{more}.", param=first or None, code=code) from None


def _location(loc: tuple[Any, ...]) -> str:
    # a content part's location repeats its tag before the field of the same name (image_url.image_url.url)
    parts = [str(p) for i, p in enumerate(loc) if i == 0 or p != loc[i - 1]]
    return ".".join(parts)


def _json_type(value: Any) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", dict: "an object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "union_tag_invalid":
        tag = error.get("ctx", {}).get("tag")
        return (f"content part type {tag!r} is not supported; use 'text', 'image_url', 'video_url' or 'video'")
    if error["type"] == "missing":
        return "required"
    return str(error["msg"]).removeprefix("Value error, ")


# -- answers -----------------------------------------------------------------------------------------------------


def usage(prompt: int, visual: int, completion: int, timings: dict[str, float] | None = None) -> dict[str, Any]:
    """OpenAI's usage block, with the visual tokens (part of ``prompt_tokens``) and, in streams, the timings."""
    body: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                            "total_tokens": prompt + completion, "visual_tokens": visual}
    if timings:
        body.update(timings)
    return body


def completion(rid: str, model: str, text: str, finish_reason: str, usage_block: dict[str, Any]) -> dict[str, Any]:
    """A whole answer (``stream: false``)."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_block}


def chunk(rid: str, model: str, created: int, delta: dict[str, Any] | None,
          finish_reason: str | None = None, usage_block: dict[str, Any] | None = None) -> dict[str, Any]:
    """One server-sent event of a stream: a delta of the answer, or (``delta`` None) the closing usage chunk."""
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [] if delta is None else
                            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if usage_block is not None:
        body["usage"] = usage_block
    return body
