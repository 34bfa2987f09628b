"""The OpenAI HTTP API as the `openai` client (v1+) speaks it: request validation and response shapes.

Requests are checked field by field, by hand rather than with a schema library, so that every
rejection is an OpenAI-shaped error object naming the offending `param` — what the client turns
into `BadRequestError` with a readable message. Three kinds of field exist:

- honoured: `model`, `messages` / `prompt`, `max_tokens`, `max_completion_tokens`, `temperature`,
  `top_p`, `stop`, `seed`, `stream`, `stream_options.include_usage`, plus llama-server's
  extensions `top_k`, `min_p`, `repeat_penalty`, `repeat_last_n`, `ignore_eos`;
- inert: fields that cannot change the tokens (`user`, `metadata`, `store`, ...) and fields whose
  value asks for nothing we lack (`n: 1`, `logprobs: false`, `tools: []`, `frequency_penalty: 0`);
- everything else is a 400, like OpenAI's own "Unrecognized request argument" — a field the server
  cannot honour is never silently ignored.

Omitted sampling fields take `moe-local generate`'s defaults (llama.cpp's), so a request and the
same `generate` command line produce the same tokens.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from moe_local.runtime.generate import GenerateOptions
from moe_local.runtime.sampling import SamplingOptions

# OpenAI's documented default for the legacy completions endpoint; chat has no limit but the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    """An error the client sees as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ------------------------------------------------------------------ parsed requests
@dataclass
class ParsedRequest:
    """One validated request: what to generate from, and how."""

    kind: str  # "chat" | "completion"
    model: str
    options: GenerateOptions
    stream: bool = False
    include_usage: bool = False
    messages: list[dict[str, str]] = field(default_factory=list)  # chat
    prompt_text: str | None = None  # completion, text
    prompt_ids: list[int] | None = None  # completion, token ids
    max_tokens: int | None = None  # None: until EOS or the context is full


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, else a 400 saying what is wrong with it."""
    if not raw.strip():
        raise bad("the request body is empty: send a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"could not parse the JSON body of the request: {exc}") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_json_type(body)}")
    return body


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class _Fields:
    """Typed reads of a request body that remember which keys were looked at."""

    def __init__(self, body: dict) -> None:
        self.body = body
        self.seen: set[str] = set()

    def get(self, name: str) -> Any:
        self.seen.add(name)
        return self.body.get(name)

    def number(self, name: str, default: float, check: Callable[[float], bool], rule: str) -> float:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(f"'{name}' must be a number, got {_json_type(value)}", name, "invalid_type")
        if not check(value):
            raise bad(f"'{name}' must be {rule}, got {value}", name, "invalid_value")
        return float(value)

    def integer(self, name: str, default: int | None, check: Callable[[int], bool] = lambda v: True,
                rule: str = "") -> int | None:
        value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"'{name}' must be an integer, got {_json_type(value)}", name, "invalid_type")
        if not check(value):
            raise bad(f"'{name}' must be {rule}, got {value}", name, "invalid_value")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise bad(f"'{name}' must be a boolean, got {_json_type(value)}", name, "invalid_type")
        return value

    def inert(self, *names: str) -> None:
        """Fields that cannot change the tokens (identifiers, storage hints): accepted, not acted on."""
        self.seen.update(names)

    def only(self, name: str, allowed: Callable[[Any], bool], why: str) -> None:
        """A field we accept only at the value that asks for nothing we lack (n=1, tools=[])."""
        value = self.get(name)
        if value is not None and not allowed(value):
            raise bad(f"'{name}' is not supported by this server: {why}", name, "unsupported_parameter")

    def reject_unknown(self) -> None:
        unknown = sorted(set(self.body) - self.seen)
        if unknown:
            raise bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")


def _common(f: _Fields, kind: str) -> tuple[str, GenerateOptions, bool, bool, int | None]:
    """Model, sampling, stop and stream fields shared by both endpoints."""
    model = f.get("model")
    if model is None:
        raise bad("you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise bad(f"'model' must be a string, got {_json_type(model)}", "model", "invalid_type")

    d = SamplingOptions()
    positive = (lambda v: v >= 1, "an integer >= 1")
    max_tokens = f.integer("max_tokens", None, *positive)
    if kind == "chat":
        mct = f.integer("max_completion_tokens", None, *positive)
        if mct is not None and max_tokens is not None and mct != max_tokens:
            raise bad("give 'max_completion_tokens' or 'max_tokens', not both with different values",
                      "max_completion_tokens", "invalid_value")
        max_tokens = mct if mct is not None else max_tokens
    elif max_tokens is None:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    sampling = SamplingOptions(
        temperature=f.number("temperature", d.temperature, lambda v: v >= 0, ">= 0"),
        top_p=f.number("top_p", d.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
        top_k=f.integer("top_k", d.top_k, lambda v: v >= 0, ">= 0 (0 = off)"),
        min_p=f.number("min_p", d.min_p, lambda v: 0 <= v <= 1, "in [0, 1]"),
        repeat_penalty=f.number("repeat_penalty", d.repeat_penalty, lambda v: v > 0, "> 0 (1 = off)"),
        repeat_last_n=f.integer("repeat_last_n", d.repeat_last_n, lambda v: v >= -1, ">= -1 (-1 = all)"),
        seed=f.integer("seed", None),
    )
    stop = f.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if any(not s for s in stops):
        raise bad("'stop' strings must not be empty", "stop", "invalid_value")
    ignore_eos = f.boolean("ignore_eos", False)
    stream = f.boolean("stream", False)
    include_usage = False
    so = f.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise bad(f"'stream_options' must be an object, got {_json_type(so)}", "stream_options", "invalid_type")
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options", "invalid_value")
        extra = sorted(set(so) - {"include_usage"})
        if extra:
            raise bad(f"Unrecognized stream option: {extra[0]}", f"stream_options.{extra[0]}", "unknown_parameter")
        iu = so.get("include_usage")
        if iu is not None and not isinstance(iu, bool):
            raise bad("'stream_options.include_usage' must be a boolean", "stream_options.include_usage", "invalid_type")
        include_usage = bool(iu)

    # Asking for nothing we lack: accepted. Asking for more: a 400 naming the field.
    f.only("n", lambda v: v == 1, "one choice per request (n must be 1)")
    f.only("logprobs", lambda v: v is False, "log probabilities are not returned")
    f.only("top_logprobs", lambda v: v == 0, "log probabilities are not returned")
    f.only("logit_bias", lambda v: v == {}, "logit bias is not implemented")
    f.only("frequency_penalty", lambda v: v == 0, "use 'repeat_penalty' (llama.cpp's) instead")
    f.only("presence_penalty", lambda v: v == 0, "use 'repeat_penalty' (llama.cpp's) instead")
    f.inert("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")
    options = GenerateOptions(sampling, max_tokens=max_tokens or 0, stop=stops, ignore_eos=ignore_eos)
    return model, options, stream, include_usage, max_tokens


# ------------------------------------------------------------------ chat
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_NULLABLE_MESSAGE_FIELDS = ("tool_calls", "function_call", "refusal", "audio", "annotations")


def _message(i: int, m: Any) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(f"'{where}' must be an object, got {_json_type(m)}", where, "invalid_type")
    role = m.get("role")
    if role is None:
        raise bad(f"'{where}.role' is missing", f"{where}.role", "missing_required_parameter")
    if role in ("tool", "function"):
        raise bad(f"'{where}.role' {role!r}: tool calling is not supported by this server", f"{where}.role",
                  "unsupported_parameter")
    if role not in _ROLES:
        raise bad(f"'{where}.role' must be one of system, developer, user, assistant; got {role!r}",
                  f"{where}.role", "invalid_value")
    for key in _NULLABLE_MESSAGE_FIELDS:  # echoed back by clients that replay our own replies
        if m.get(key) not in (None, [], ""):
            raise bad(f"'{where}.{key}' is not supported by this server", f"{where}.{key}", "unsupported_parameter")
    unknown = sorted(set(m) - {"role", "content", "name", *_NULLABLE_MESSAGE_FIELDS})
    if unknown:
        raise bad(f"Unrecognized field in '{where}': {unknown[0]}", f"{where}.{unknown[0]}", "unknown_parameter")
    if m.get("name") is not None:
        raise bad(f"'{where}.name' is not supported: chat templates have no participant names",
                  f"{where}.name", "unsupported_parameter")
    content = m.get("content")
    if content is None:
        if role != "assistant":
            raise bad(f"'{where}.content' is missing", f"{where}.content", "missing_required_parameter")
        content = ""
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                raise bad(f"'{pwhere}': only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported"
                          + (f", got type {kind!r}" if kind else ""), pwhere, "unsupported_parameter")
            parts.append(part["text"])
        content = "\n".join(parts)
    elif not isinstance(content, str):
        raise bad(f"'{where}.content' must be a string or an array of text parts, got {_json_type(content)}",
                  f"{where}.content", "invalid_type")
    return {"role": _ROLES[role], "content": content}


def parse_chat(body: dict) -> ParsedRequest:
    f = _Fields(body)
    messages = f.get("messages")
    if messages is None:
        raise bad("'messages' is a required property", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise bad(f"'messages' must be an array, got {_json_type(messages)}", "messages", "invalid_type")
    if not messages:
        raise bad("'messages' must not be empty", "messages", "invalid_value")
    parsed = [_message(i, m) for i, m in enumerate(messages)]
    model, options, stream, include_usage, max_tokens = _common(f, "chat")
    f.only("tools", lambda v: v == [], "tool calling is not supported")
    f.only("functions", lambda v: v == [], "function calling is not supported")
    f.only("tool_choice", lambda v: v == "none", "tool calling is not supported")
    f.only("function_call", lambda v: v == "none", "function calling is not supported")
    f.only("parallel_tool_calls", lambda v: isinstance(v, bool), "tool calling is not supported")
    f.only("response_format", lambda v: v == {"type": "text"}, "only plain text output ({'type': 'text'})")
    f.only("modalities", lambda v: v == ["text"], "only text output")
    f.only("audio", lambda v: False, "only text output")
    f.only("prediction", lambda v: False, "predicted outputs are not supported")
    f.only("reasoning_effort", lambda v: False, "this is not a reasoning-effort model")
    f.only("web_search_options", lambda v: False, "web search is not supported")
    f.reject_unknown()
    return ParsedRequest("chat", model, options, stream, include_usage, messages=parsed, max_tokens=max_tokens)


# ------------------------------------------------------------------ completions
def _ids(value: list, where: str) -> list[int]:
    if not value:
        raise bad(f"'{where}' must not be empty", where, "invalid_value")
    if any(isinstance(t, bool) or not isinstance(t, int) for t in value):
        raise bad(f"'{where}' must be a string or an array of token ids (integers)", where, "invalid_type")
    return list(value)


def parse_completion(body: dict) -> ParsedRequest:
    f = _Fields(body)
    prompt = f.get("prompt")
    text: str | None = None
    ids: list[int] | None = None
    if prompt is None:
        raise bad("'prompt' is a required property", "prompt", "missing_required_parameter")
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise bad(f"'prompt' holds {len(prompt)} prompts; this server runs one prompt per request",
                      "prompt", "unsupported_parameter")
        if isinstance(prompt[0], str):
            text = prompt[0]
        else:
            ids = _ids(prompt[0], "prompt[0]")
    elif isinstance(prompt, list):
        ids = _ids(prompt, "prompt")
    else:
        raise bad(f"'prompt' must be a string or an array of token ids, got {_json_type(prompt)}", "prompt",
                  "invalid_type")
    if text is not None and not text:
        raise bad("'prompt' must not be empty", "prompt", "invalid_value")
    model, options, stream, include_usage, max_tokens = _common(f, "completion")
    f.only("echo", lambda v: v is False, "the prompt is not echoed back")
    f.only("best_of", lambda v: v == 1, "one candidate per request (best_of must be 1)")
    f.only("suffix", lambda v: v == "", "insertion (suffix) is not supported")
    f.reject_unknown()
    return ParsedRequest("completion", model, options, stream, include_usage, prompt_text=text, prompt_ids=ids,
                         max_tokens=max_tokens)


# ------------------------------------------------------------------ responses
def finish_reason(stop_reason: str) -> str:
    """Our stop reasons -> OpenAI's: EOS and stop strings are "stop"; every cut-off is "length".

    "interrupted" (the server shutting down mid-reply) also maps to "length": the text was cut
    short by a limit, not finished, and strict clients accept only the documented values.
    """
    return "stop" if stop_reason in ("eos", "stop") else "length"


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage object; `cached_tokens` is our KV prefix reuse (not prefilled again)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass
class Reply:
    """Builds the response objects of one request (ids and timestamps fixed once)."""

    kind: str
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or new_id(self.kind)
        self.created = self.created or int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, reason: str, use: dict) -> dict:
        """The `stream: false` response."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": None, "finish_reason": reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": use}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": use}

    def chunk(self, text: str | None, reason: str | None = None, include_usage: bool = False,
              first: bool = False) -> dict:
        """One streamed chunk: a text delta, or (reason set) the final chunk with an empty delta."""
        if self.kind == "chat":
            delta: dict = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            out = {**self._head("text_completion"), "choices": [choice]}
        if include_usage:
            out["usage"] = None  # OpenAI: null on every chunk but the last, which carries it
        return out

    def usage_chunk(self, use: dict) -> dict:
        """With `stream_options.include_usage`: one more chunk, no choices, the request's usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": use}


def model_object(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "moe-local"}
