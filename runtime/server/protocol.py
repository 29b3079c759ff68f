"""The wire format: OpenAI-shaped request and response models (pydantic, FastAPI's own) and the error shape.

Requests are validated by :func:`parse_request`: unknown fields are refused (``extra="forbid"``), options this
server does not implement are refused unless they hold their default, and every failure becomes one
:class:`APIError` naming the field (``param``) with a machine-readable ``code``.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      ValidationError, ValidationInfo, WrapValidator, field_validator)
from pydantic_core import PydanticCustomError

ROLES = ("system", "user", "assistant", "developer")
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorBody(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return ErrorBody(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                         code=self.code)).model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def type_name(v: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(v), type(v).__name__)


def _param(loc: tuple) -> str | None:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def api_error_from(err: ValidationError) -> APIError:
    """The first validation error as a 400 naming its field."""
    e = err.errors(include_url=False)[0]
    kind, param, value = e["type"], _param(e["loc"]), e.get("input")
    if param is None:                                            # the body itself
        return bad_request(f"the request body must be a JSON object, got {type_name(value)}", None, "invalid_type")
    if kind == "missing":
        return bad_request(f"missing required field '{param}'", param, "missing")
    if kind == "extra_forbidden":
        return bad_request(f"unknown field '{param}': this server does not support it (docs/serving.md lists the "
                           f"fields it accepts)", param, "unknown_field")
    if kind in _CUSTOM_CODES:                                    # raised below, message already complete
        return bad_request(e["msg"], param, kind)
    is_type = kind.endswith(("_type", "_parsing")) or kind == "int_from_float"
    got = type_name(value) if is_type else json.dumps(value, default=str)[:40]
    return bad_request(f"'{param}': {e['msg']}, got {got}", param, "invalid_type" if is_type else "invalid_value")


_CUSTOM_CODES = ("missing", "invalid_type", "invalid_value", "empty_prompt", "unsupported")


def _fail(code: str, message: str):
    raise PydanticCustomError(code, message)


# ---------------------------------------------------------------------------------------------------------------
# field types
# ---------------------------------------------------------------------------------------------------------------
def _integral(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v      # JSON 3.0 is the integer 3


Int = Annotated[StrictInt, BeforeValidator(_integral)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]      # int or float, never bool or string


def _collapse(value, handler, name: str, what: str):
    """Run the union's validation; report its per-member errors as one 'must be ...' error on the field."""
    if value is None:
        _fail("missing", f"missing required field '{name}'")
    try:
        return handler(value)
    except ValidationError:
        _fail("invalid_type", f"'{name}' must be {what}, got {type_name(value)}")


def _one_of(what: str) -> WrapValidator:
    return WrapValidator(lambda value, handler, info: _collapse(value, handler, info.field_name, what))


def _required(name: str) -> BeforeValidator:
    def check(value):
        if value is None:
            _fail("missing", f"missing required field '{name}'")
        return value
    return BeforeValidator(check)


def _prompt(value, handler):
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]                                          # a batch of one prompt
    if isinstance(value, list) and len(value) > 1 and all(isinstance(x, str) for x in value):
        _fail("unsupported", "batched prompts (an array of strings) are not supported; send one prompt per request")
    if isinstance(value, (str, list)) and not value:
        _fail("empty_prompt", "'prompt' is empty")
    return _collapse(value, handler, "prompt", "a string or an array of integer token ids")


def _content(value, handler):
    if isinstance(value, list) and any(not isinstance(p, dict) or p.get("type") != "text" for p in value):
        _fail("unsupported", "only text content parts {\"type\": \"text\", \"text\": ...} are supported")
    return _collapse(value, handler, "content", "a string or an array of text parts")


def _same(v: Any, ok: Any) -> bool:
    return isinstance(v, bool) == isinstance(ok, bool) and v == ok          # False is not 0, True is not 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class Message(_Strict):
    role: Literal[ROLES]
    content: Annotated[Union[StrictStr, list[TextPart]], WrapValidator(_content)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: Optional[StrictBool] = None


# Options this server does not implement, with the values that mean "off" (refused otherwise, never ignored).
UNSUPPORTED = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False, 0), "top_logprobs": (),
               "presence_penalty": (0,), "frequency_penalty": (0,), "tools": ([],), "tool_choice": ("none",),
               "logit_bias": ({},), "suffix": ("",), "response_format": ({"type": "text"},)}


class _Common(_Strict):
    model: Optional[StrictStr] = None
    max_tokens: Optional[Annotated[Int, Field(ge=1)]] = None
    temperature: Optional[Annotated[Number, Field(ge=0, le=2)]] = None
    top_p: Optional[Annotated[Number, Field(gt=0, le=1)]] = None
    top_k: Optional[Annotated[Int, Field(ge=-1)]] = None
    seed: Optional[Annotated[Int, Field(ge=0, le=2 ** 63 - 1)]] = None
    stream: Optional[StrictBool] = None
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Annotated[Union[StrictStr, list[StrictStr]], _one_of("a string or an array of strings")]] = None
    user: Optional[StrictStr] = None                  # an end-user id: accepted, not used
    n: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    logprobs: Any = None
    response_format: Any = None

    @field_validator("max_tokens", "max_completion_tokens", check_fields=False)
    @classmethod
    def _within_server_limit(cls, v, info: ValidationInfo):
        hi = (info.context or {}).get("max_new_tokens")
        if v is not None and hi is not None and v > hi:
            _fail("invalid_value", f"'{info.field_name}' must be <= {hi} (this server's --max-new-tokens), got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return ()
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_STRINGS:
            _fail("invalid_value", f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            _fail("invalid_value", f"each stop string must be 1..{MAX_STOP_CHARS} characters")
        return tuple(dict.fromkeys(stops))

    @field_validator(*UNSUPPORTED, check_fields=False)
    @classmethod
    def _off_only(cls, v, info: ValidationInfo):
        if v is not None and not any(_same(v, ok) for ok in UNSUPPORTED[info.field_name]):
            _fail("unsupported", f"'{info.field_name}' = {json.dumps(v, default=str)[:40]} is not supported by "
                                 f"this server")
        return v


class CompletionRequest(_Common):
    prompt: Annotated[Union[StrictStr, list[StrictInt]], WrapValidator(_prompt)]
    suffix: Any = None
    echo: Any = None
    best_of: Any = None


class ChatRequest(_Common):
    messages: Annotated[list[Message], _required("messages")]
    max_completion_tokens: Optional[Annotated[Int, Field(ge=1)]] = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v: list[Message]):
        if not v:
            _fail("empty_prompt", "'messages' is empty")
        if not any(m.text() for m in v):
            _fail("empty_prompt", "all messages are empty")
        return v


# ---------------------------------------------------------------------------------------------------------------
# the validated request, as the server executes it
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GenRequest:
    kind: str                                   # "completion" | "chat"
    model: str | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = None               # None: the server default (and what the context allows)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"


def parse_request(kind: str, body: Any, max_new_tokens: int | None = None) -> GenRequest:
    """Validate a decoded JSON body for ``kind`` ("completion" | "chat"); raises :class:`APIError` (400)."""
    model = ChatRequest if kind == "chat" else CompletionRequest
    try:
        r = model.model_validate(body, context={"max_new_tokens": max_new_tokens})
    except ValidationError as e:
        raise api_error_from(e) from None
    req = GenRequest(kind=kind, model=r.model, max_tokens=r.max_tokens, seed=r.seed, stop=r.stop or (),
                     temperature=1.0 if r.temperature is None else r.temperature,
                     top_p=1.0 if r.top_p is None else r.top_p,
                     top_k=0 if r.top_k in (None, -1) else r.top_k, stream=bool(r.stream),
                     include_usage=bool(r.stream_options and r.stream_options.include_usage))
    if isinstance(r, ChatRequest):
        req.messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in r.messages]
        if r.max_completion_tokens is not None:
            req.max_tokens = r.max_completion_tokens
    elif isinstance(r.prompt, str):
        req.prompt = r.prompt
    else:
        req.prompt_ids = list(r.prompt)
    return req


# ---------------------------------------------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Optional[str]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Optional[str]


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Optional[str]


class _Reply(BaseModel):
    id: str
    object: str
    created: int
    model: str


class Completion(_Reply):
    choices: list[Union[CompletionChoice, ChatChoice]]
    usage: Usage


class Chunk(_Reply):
    choices: list[Union[CompletionChoice, ChatChunkChoice]]
    usage: Optional[Usage] = None


@dataclasses.dataclass(frozen=True)
class ReplyHead:
    """What every response / chunk of one request shares."""
    kind: str
    id: str
    created: int
    model: str

    def final(self, text: str, finish_reason: str | None, usage: Usage) -> dict:
        if self.kind == "chat":
            obj, choice = "chat.completion", ChatChoice(message=AssistantMessage(content=text),
                                                        finish_reason=finish_reason)
        else:
            obj, choice = "text_completion", CompletionChoice(text=text, finish_reason=finish_reason)
        return Completion(id=self.id, object=obj, created=self.created, model=self.model, choices=[choice],
                          usage=usage).model_dump()

    def chunk(self, text: str | None = None, finish: str | None = None, role: bool = False,
              include_usage: bool = False) -> dict:
        """One streamed chunk; ``usage`` is ``null`` on every chunk when the client asked for a usage chunk."""
        if self.kind == "chat":
            delta = Delta(role="assistant") if role else Delta()
            if text is not None:
                delta.content = text
            choice = ChatChunkChoice(delta=delta, finish_reason=finish)
        else:
            choice = CompletionChoice(text=text or "", finish_reason=finish)
        out = Chunk(id=self.id, object=self.chunk_object, created=self.created, model=self.model,
                    choices=[choice]).model_dump(exclude=None if include_usage else {"usage"})
        if self.kind == "chat":                   # a delta carries only what it says (role and/or content)
            out["choices"][0]["delta"] = choice.delta.model_dump(exclude_none=True)
        return out

    def usage_chunk(self, usage: Usage) -> dict:
        return Chunk(id=self.id, object=self.chunk_object, created=self.created, model=self.model, choices=[],
                     usage=usage).model_dump()

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"
