"""The OpenAI request bodies the server accepts (pydantic, strict types, unknown fields ignored as OpenAI's own
server does), the error shape {"error": {"message", "type", "param", "code"}} and the response objects."""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Literal

from pydantic import Field, ValidationError

from ..errors import EmoEdgeError
from ..schema import Finite, Schema, parse_json

MAX_BODY = 1 << 20  # bytes of one request body
MAX_TEXT = 1 << 18  # characters of one message or prompt
Text = Annotated[str, Field(strict=True, max_length=MAX_TEXT)]
Name = Annotated[str, Field(strict=True, min_length=1, max_length=256)]
StopText = Annotated[str, Field(strict=True, min_length=1, max_length=256)]


class ApiError(EmoEdgeError):
    """A request the server refuses: HTTP `status`, OpenAI error `type`, the body field at fault (`param`)."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class TextPart(Schema):
    type: Literal["text"]
    text: Text


class Message(Schema):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(max_length=64)] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(Schema):
    include_usage: bool = False


class Common(Schema):
    """Fields both endpoints take. `pool` is emo-edge's: a catalog pool name (else `model` "BUNDLE:POOL", else
    auto from the prompt)."""

    model: Name
    max_tokens: Annotated[int, Field(strict=True, ge=1, le=1 << 20)] | None = None
    temperature: Annotated[Finite, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[Finite, Field(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, Field(strict=True, ge=0, le=(1 << 63) - 1)] | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    pool: Name | None = None

    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatRequest(Common):
    messages: Annotated[list[Message], Field(min_length=1, max_length=1024)]
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1, le=1 << 20)] | None = None


class CompletionRequest(Common):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[int, Field(strict=True, ge=1, le=1 << 20)] | None = 16

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def parse_body(raw: bytes, schema: type[Schema]) -> Schema:
    """A request body -> `schema`, or ApiError naming the field (param) at fault."""
    if len(raw) > MAX_BODY:
        raise ApiError(f"request body is {len(raw)} bytes; at most {MAX_BODY}", status=413)
    try:
        data = parse_json(raw, "request body", ApiError)
    except ApiError as exc:
        raise ApiError(str(exc), code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(f"request body: expected a JSON object (got {type(data).__name__})")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        errs = exc.errors(include_url=False)
        # a union reports one error per member: a wrong-type one says least ("should be a valid string")
        e = next((e for e in errs if not e["type"].endswith("_type")), errs[0])
        loc = _loc(tuple(e["loc"]))
        got = "" if e["type"] == "missing" else f" (got {_short(e.get('input'))})"
        raise ApiError(f"field '{loc}': {e['msg'].lower()}{got}", param=loc) from None


_TYPE_TAG = re.compile(r"(str|int|float|bool|none|(list|dict|constrained|function)[-\[].*|[A-Z]\w*)")


def _loc(loc: tuple) -> str:
    """pydantic's location without the union members' type tags it adds ("stop.list[constrained-str]")."""
    out = ""
    for p in loc:
        if isinstance(p, str) and _TYPE_TAG.fullmatch(p):
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    """OpenAI's usage object; `cached`: prompt tokens served from the prefix cache (not prefilled)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(stop: str, hit_stop_string: bool) -> str:
    return "stop" if hit_stop_string or stop == "eos" else "length"


def now() -> int:
    return int(time.time())
