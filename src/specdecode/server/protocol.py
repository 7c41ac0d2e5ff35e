"""The OpenAI wire format: request models, the error shape, and response/chunk builders.

Requests are validated with pydantic in strict mode, so ``"max_tokens": "10"`` or
``"stream": "yes"`` are rejected rather than silently coerced. Status codes:

* 422: the body is JSON but does not have the request's shape (a field missing, a wrong type);
* 400: the shape is right but a value cannot be served (out of range, too long for the context,
  unsupported option such as ``n > 1``), a parameter the request does not have (models forbid
  extra fields, as OpenAI's API does), or the body is not JSON at all.

Every error names a ``code``; ``param`` names the offending top-level field where there is one.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from ..results import GenerationResult

# ---- errors ---------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

    ``code`` is required: clients branch on it, so no error goes without one."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Union-typed fields produce one pydantic error per alternative; a single plain sentence reads better.
_EXPECTED = {
    "prompt": "a non-empty string, a list of token ids, or a list holding one string",
    "stop": "a string or a list of strings",
}


def _is_shape_error(error_type: str) -> bool:
    """Missing fields and wrong types (422) as opposed to unacceptable values (400)."""
    return error_type == "missing" or error_type.endswith("_type") or error_type == "union_tag_invalid"


# Parameters of OpenAI's API that this server does not implement: accepted when null or empty
# (clients send them so), refused as unsupported otherwise. Fields of _Common, so that a misspelt
# parameter is still "unknown".
UNSUPPORTED_OPENAI_PARAMS = (
    "tool_choice", "parallel_tool_calls", "functions", "function_call", "modalities", "audio",
    "prediction", "reasoning_effort", "web_search_options", "store", "metadata", "service_tier",
)  # fmt: skip
# The same for the fields of an assistant message that come with tools and audio: a client that
# sends back a whole response message (``refusal: null``, ``tool_calls: null``) is served.
UNSUPPORTED_MESSAGE_FIELDS = ("refusal", "tool_calls", "function_call", "audio", "tool_call_id")


def _used(value: Any) -> bool:
    """Whether an unsupported parameter asks for something: not null, false, empty or "none"."""
    return value is not None and value is not False and value != "none" and value != [] and value != {}
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 1024  # characters in one stop string


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` of an offending value, cut short: error messages must not echo megabytes."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters in all)"


def _is_union_tag(part: Any) -> bool:
    """pydantic puts the alternative tried into the location of a union's errors ("str",
    "list[TextPart]"); they are not part of the field's path."""
    return isinstance(part, str) and (part == "str" or "[" in part)


def _pick(errors: list[dict]) -> dict:
    """The error to report: the first, unless it is a union alternative's wrong type and another
    alternative got further (e.g. content is a list of parts, one with an unknown field)."""
    first = errors[0]
    loc = first["loc"]
    if len(loc) >= 2 and _is_union_tag(loc[-1]) and _is_shape_error(first["type"]):
        prefix = loc[:-1]
        deeper = [e for e in errors if e["loc"][: len(prefix)] == prefix and len(e["loc"]) > len(loc)]
        if deeper:
            return deeper[0]
    return first


def _where(loc: tuple) -> str:
    # backslashreplace: a key holding a lone surrogate must not make the error itself unencodable
    return ".".join(str(part) for part in loc).encode("utf-8", "backslashreplace").decode("utf-8")


def validation_error(e: ValidationError, model: type[BaseModel] | None = None, body: bytes | None = None) -> APIError:
    """The first of pydantic's errors as an APIError naming the field (``model``: the request
    model, to list the parameters it takes; ``body``: the raw body, to locate bad text in it)."""
    first = _pick(e.errors(include_url=False))
    if first["type"] == "json_invalid":
        located = _locate_invalid_text(body) if body is not None else None
        if located is not None:
            return located
        return APIError(400, f"the request body is not valid JSON: {first['msg']}", code="invalid_json")
    loc = tuple(part for part in first["loc"] if not _is_union_tag(part))
    param = str(loc[0]) if loc else None
    if first["type"] == "extra_forbidden":
        where = _where(loc)
        message = f"{where}: unknown parameter"
        if len(loc) == 1 and model is not None:
            takes = [name for name in model.model_fields if name not in UNSUPPORTED_OPENAI_PARAMS]
            message += f"; this endpoint takes {', '.join(takes)}"
        return APIError(400, message, param=_where(loc[:1]), code="unknown_parameter")
    status = 422 if _is_shape_error(first["type"]) else 400
    if param in _EXPECTED and first["type"] != "missing":
        message = f"{param}: expected {_EXPECTED[param]}"
    elif param is None:
        message = f"the request body: {first['msg']} (expected a JSON object)"
    else:
        message = f"{_where(loc)}: {first['msg']}" + (f" (got {_short(first['input'])})" if first["type"] != "missing" else "")
    code = "missing_field" if first["type"] == "missing" else "invalid_type" if status == 422 else "invalid_value"
    if first["type"] == "unsupported_value":  # raised by our own validators
        code = "unsupported_value"
    return APIError(status, message, param=param, code=code)


def _locate_invalid_text(body: bytes) -> APIError | None:
    """JSON that pydantic refuses but Python's parser reads holds a string with a lone surrogate
    escape (``"\\ud800"``): name the field it is in. None when that is not the trouble."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    path = _surrogate_path(value, ())
    if path is None:
        return None
    where = _where(path) or "the request body"
    param = _where(path[:1]) if path else None
    return APIError(
        400, f"{where}: holds a lone surrogate escape (\\ud800-\\udfff), which is not valid Unicode; "
        "send UTF-8 text or valid surrogate pairs", param=param, code="invalid_value",
    )  # fmt: skip


def _surrogate_path(value: Any, path: tuple) -> tuple | None:
    stack = [(value, path)]
    while stack:  # iterative: a deeply nested body must not exhaust the recursion limit
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                if _SURROGATE.search(key):
                    return (*path, key)
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, i)) for i, item in reversed(list(enumerate(value))))
    return None


# ---- requests -------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: Optional[bool] = None


class _Common(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions. None means "the default"."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)  # OpenAI's range
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)  # not OpenAI's, but vLLM and others accept it
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch's generators take
    n: Optional[int] = Field(None, ge=1)
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[dict[str, Any]] = None  # only {"type": "text"}, the default
    user: Optional[str] = None  # accepted and ignored
    # TokenSkip (docs/tokenskip.md): the chain-of-thought ratio a TokenSkip adapter is asked for,
    # written into the prompt (the last user message of a chat) the way it was trained.
    cot_ratio: Optional[float] = Field(None, gt=0, le=1)
    # Whisper (docs/whisper.md): a suffix appended to the last user message ("" for none; absent:
    # the server's -o reasoning_suffix; checked in ServerState.reasoning, with the server's own).
    # What was added comes back in the response's usage.
    reasoning_suffix: Optional[str] = None
    # UNSUPPORTED_OPENAI_PARAMS: refused unless null or empty
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None

    def check_supported(self) -> None:
        """Options we parse but cannot honour are refused rather than silently ignored."""
        if self.n not in (None, 1):
            raise APIError(400, f"n: only n=1 is supported, got {self.n}", param="n", code="unsupported_value")
        for name in UNSUPPORTED_OPENAI_PARAMS:
            if _used(getattr(self, name)):
                raise APIError(400, f"{name}: not supported by this server", param=name, code="unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name}: penalties are not supported (would change the output)", param=name, code="unsupported_value")  # fmt: skip
        if self.logit_bias:
            raise APIError(400, "logit_bias: not supported", param="logit_bias", code="unsupported_value")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options: only allowed with stream=true", param="stream_options", code="invalid_value")  # fmt: skip
        if self.response_format is not None and self.response_format != {"type": "text"}:
            raise APIError(
                400, f"response_format: only {{'type': 'text'}} is supported (no JSON mode or structured output), "
                f"got {_short(self.response_format)}", param="response_format", code="unsupported_value",
            )  # fmt: skip
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stops)}", param="stop", code="invalid_value")  # fmt: skip
        longest = max(map(len, stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise APIError(
                400, f"stop: a stop string may have at most {MAX_STOP_CHARS} characters, got one of {longest}",
                param="stop", code="invalid_value",
            )  # fmt: skip

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: Optional[bool] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def check_supported(self) -> None:
        super().check_supported()
        unsupported = {"echo": self.echo, "logprobs": self.logprobs is not None, "suffix": self.suffix,
                       "best_of": self.best_of not in (None, 1)}  # fmt: skip
        for name, used in unsupported.items():
            if used:
                raise APIError(400, f"{name}: not supported by this server", param=name, code="unsupported_value")

    def engine_prompt(self) -> str | list[int]:
        """The one prompt the engine gets: a batch of prompts is n > 1 in disguise."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"prompt: one prompt per request, got {len(p)}", param="prompt", code="unsupported_value")  # fmt: skip
            p = p[0]
        return p


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]  # no tools, so no "tool" messages
    content: Optional[Union[str, list[TextPart]]] = None  # only an assistant's may be absent or null
    name: Optional[str] = None
    # UNSUPPORTED_MESSAGE_FIELDS: refused unless null or empty
    refusal: Any = None
    tool_calls: Any = None
    function_call: Any = None
    audio: Any = None
    tool_call_id: Any = None

    @model_validator(mode="after")
    def _needs_content(self) -> ChatMessage:
        for name in UNSUPPORTED_MESSAGE_FIELDS:
            if _used(getattr(self, name)):
                raise PydanticCustomError("unsupported_value", "{name}: not supported by this server", {"name": name})
        if self.content is None and self.role != "assistant":
            raise PydanticCustomError(
                "content_required",
                "a {role} message needs content: a string or a list of text parts (only an assistant "
                "message may leave it out or null)", {"role": self.role},
            )  # fmt: skip
        return self

    def engine_message(self) -> dict[str, str]:
        content = self.content
        if content is None:
            content = ""
        elif isinstance(content, list):
            content = "\n".join(part.text for part in content)
        return {"role": self.role, "content": content}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None

    def check_supported(self) -> None:
        super().check_supported()
        for name in ("logprobs", "top_logprobs", "tools"):
            if getattr(self, name):
                raise APIError(400, f"{name}: not supported by this server", param=name, code="unsupported_value")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses ------------------------------------------------------------------------------


def usage(result: GenerationResult, prompt_added: dict | None = None) -> dict[str, Any]:
    """OpenAI's token counts, and (``prompt_added``) what the server wrote into the prompt:
    ``cot_ratio`` and ``reasoning_suffix``, so that a client sees it."""
    prompt, completion = len(result.prompt_token_ids), len(result.token_ids)
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if prompt_added:
        out["prompt_added"] = dict(prompt_added)
    return out


def speculative(method: str, result: GenerationResult, queue_time: float) -> dict[str, Any]:
    """The speculative-decoding statistics of one request (the extra response field)."""
    s = result.stats
    return {
        "method": method,
        "verify": s.verify,
        "lossy": s.lossy,  # True: not token for token what plain decoding would have produced
        "target_forwards": s.target_forwards,
        "mean_accepted_tokens": round(s.mean_accepted_tokens, 4),
        "acceptance_rate": round(s.acceptance_rate, 4),
        "drafted_tokens": s.drafted_tokens,
        "accepted_draft_tokens": s.accepted_draft_tokens,
        "tokens_per_second": round(s.tokens_per_second, 2),
        "prefill_time": round(s.prefill_time, 6),
        "draft_time": round(s.draft_time, 6),
        "verify_time": round(s.verify_time, 6),
        "total_time": round(s.total_time, 6),
        "queue_time": round(queue_time, 6),
        "method_stats": s.method,
    }


class Formatter:
    """Builds the bodies of one request's response: plain, or the chunks of a stream.

    Completions and chat differ only in names and in where the text goes
    (``text`` vs ``message``/``delta``).
    """

    def __init__(self, chat: bool, model: str, prompt_added: dict | None = None):
        self.chat, self.model, self.prompt_added = chat, model, prompt_added
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def response(self, result: GenerationResult, spec: dict) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}}
        else:
            choice = {"index": 0, "text": result.text}
        choice.update(logprobs=None, finish_reason=result.finish_reason)
        body = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        body.update(usage=usage(result, self.prompt_added), speculative=spec)
        return body

    def chunk(self, text: str | None = None, *, role: bool = False, finish_reason: str | None = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish_reason)
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def usage_chunk(self, result: GenerationResult, spec: dict) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body.update(usage=usage(result, self.prompt_added), speculative=spec)
        return body
