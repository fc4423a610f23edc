"""The OpenAI request bodies, checked field by field: a wrong type, a value out of range or a field
this server does not know is one 400 naming the field, never an exception inside the server.

Fields of the OpenAI API that this server does not implement are accepted only at their neutral
value (`frequency_penalty: 0`, `logit_bias: {}`, `best_of: 1` ...), so that a client that sends
defaults works and one that relies on them is told.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

MAX_LOGPROBS = 5  # as the OpenAI API
MAX_STOP = 4
MAX_SEED = 2**63


class BadRequest(ValueError):
    """A request the client must fix: HTTP `status` with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}


# --- field checkers: (name, value) -> the value, or BadRequest --------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                         list: "array", dict: "object"}.get(type(value), type(value).__name__)


def integer(lo: int, hi: int, optional: bool = False) -> Callable[[str, Any], int | None]:
    def check(name: str, value: Any) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"'{name}' must be an integer, got {_type_name(value)}", name)
        if not lo <= value <= hi:
            raise BadRequest(f"'{name}' must be between {lo} and {hi}, got {value}", name)
        return value

    return check


def number(lo: float, hi: float, low_open: bool = False) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadRequest(f"'{name}' must be a finite number, got {_type_name(value)}", name)
        if not (lo < value if low_open else lo <= value) or value > hi:
            interval = f"{'(' if low_open else '['}{lo}, {hi}]"
            raise BadRequest(f"'{name}' must be in {interval}, got {value}", name)
        return float(value)

    return check


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false, got {_type_name(value)}", name)
    return value


def string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string, got {_type_name(value)}", name)
    return value


def stop_strings(name: str, value: Any) -> list[str]:
    values = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(s, str) for s in values):
        raise BadRequest(f"'{name}' must be a string or an array of strings", name)
    if len(values) > MAX_STOP:
        raise BadRequest(f"'{name}' takes at most {MAX_STOP} strings, got {len(values)}", name)
    return values


def prompts(name: str, value: Any) -> list[str | list[int]]:
    """A string, an array of strings, an array of token ids, or an array of arrays of token ids."""
    def is_ids(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)

    if isinstance(value, str):
        return [value]
    if is_ids(value) and value:
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) or (is_ids(p) and p) for p in value):
        return list(value)
    raise BadRequest(f"'{name}' must be a string, an array of strings, an array of token ids or an array of "
                     "non-empty arrays of token ids", name)


def messages(name: str, value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"'{name}' must be a non-empty array of {{role, content}} objects", name)
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"'{where}' must be an object, got {_type_name(m)}", where)
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise BadRequest(f"'{where}' has unknown field(s) {extra}; expected role and content", where)
        if m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"'{where}.role' must be system, user or assistant, got {m.get('role')!r}", where)
        if not isinstance(m.get("content"), str):
            raise BadRequest(f"'{where}.content' must be a string", where)
    return value


def stream_options(name: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or set(value) - {"include_usage"}:
        raise BadRequest(f"'{name}' must be an object with at most the field include_usage", name)
    return {"include_usage": boolean(f"{name}.include_usage", value.get("include_usage", False))}


def neutral(*allowed: Any) -> Callable[[str, Any], None]:
    """A field this server does not implement: accepted only at a value that changes nothing."""
    def check(name: str, value: Any) -> None:
        if value not in allowed:
            raise BadRequest(f"'{name}' is not supported by this server (only {allowed[0]!r} is accepted)", name)

    return check


def any_string_or_null(name: str, value: Any) -> None:
    if value is not None:
        string(name, value)


# --- the requests --------------------------------------------------------------------------------


def parse(body: Any, fields: dict[str, tuple[Callable[[str, Any], Any], Any]], required: tuple[str, ...]) -> dict:
    """The checked values of `fields` (checker, default) in `body`; BadRequest on the first problem."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {_type_name(body)}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; accepted fields: {sorted(fields)}", unknown[0])
    for name in required:
        if name not in body:
            raise BadRequest(f"'{name}' is required", name)
    return {name: check(name, body[name]) if name in body else default for name, (check, default) in fields.items()}


def _sampling_fields(max_tokens_default: int | None) -> dict:
    return {
        "model": (any_string_or_null, None),
        "max_tokens": (integer(0, 2**31 - 1, optional=True), max_tokens_default),
        "temperature": (number(0.0, 2.0), 1.0),
        "top_p": (number(0.0, 1.0, low_open=True), 1.0),
        "top_k": (integer(-1, 2**31 - 1), 0),
        "seed": (integer(-MAX_SEED, MAX_SEED - 1, optional=True), None),
        "stop": (stop_strings, []),
        "n": (integer(1, 128), 1),
        "stream": (boolean, False),
        "stream_options": (stream_options, {}),
        "user": (any_string_or_null, None),
        "presence_penalty": (neutral(0, 0.0, None), None),
        "frequency_penalty": (neutral(0, 0.0, None), None),
        "logit_bias": (neutral({}, None), None),
        "return_tokens_as_token_ids": (boolean, False),
        "ignore_eos": (boolean, False),
    }


@dataclasses.dataclass
class Sampling:
    """What a completion or chat request asks of generation, after checking."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token; None: no log-probs
    tokens_as_ids: bool  # log-prob tokens as "token_id:<id>" (vLLM's extension): exact, even mid-character
    ignore_eos: bool  # generate max_tokens whatever the model says (vLLM's extension; for benchmarks)

    @classmethod
    def from_values(cls, v: dict, logprobs: int | None) -> Sampling:
        return cls(max_tokens=v["max_tokens"], temperature=v["temperature"], top_p=v["top_p"],
                   top_k=max(v["top_k"], 0), seed=v["seed"], stop=v["stop"], n=v["n"], stream=v["stream"],
                   include_usage=v["stream_options"].get("include_usage", False), logprobs=logprobs,
                   tokens_as_ids=v["return_tokens_as_token_ids"], ignore_eos=v["ignore_eos"])


@dataclasses.dataclass
class Completion:
    prompts: list[str | list[int]]
    echo: bool
    sampling: Sampling


@dataclasses.dataclass
class Chat:
    messages: list[dict]
    sampling: Sampling


def parse_completion(body: Any) -> Completion:
    fields = {
        **_sampling_fields(16),
        "prompt": (prompts, None),
        "echo": (boolean, False),
        "logprobs": (integer(0, MAX_LOGPROBS, optional=True), None),
        "best_of": (neutral(1, None), None),
        "suffix": (neutral(None, ""), None),
    }
    v = parse(body, fields, required=("prompt",))
    if v["max_tokens"] is None:
        v["max_tokens"] = 16
    return Completion(prompts=v["prompt"], echo=v["echo"], sampling=Sampling.from_values(v, v["logprobs"]))


def parse_chat(body: Any) -> Chat:
    fields = {
        **_sampling_fields(None),
        "messages": (messages, None),
        "max_completion_tokens": (integer(0, 2**31 - 1, optional=True), None),
        "logprobs": (boolean, False),
        "top_logprobs": (integer(0, MAX_LOGPROBS, optional=True), None),
    }
    v = parse(body, fields, required=("messages",))
    if v["max_completion_tokens"] is not None:
        v["max_tokens"] = v["max_completion_tokens"]
    if v["top_logprobs"] is not None and not v["logprobs"]:
        raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    logprobs = (v["top_logprobs"] or 0) if v["logprobs"] else None
    return Chat(messages=v["messages"], sampling=Sampling.from_values(v, logprobs))


def parse_tokenize(body: Any) -> tuple[str, bool]:
    fields = {"prompt": (string, None), "add_special_tokens": (boolean, True), "model": (any_string_or_null, None)}
    v = parse(body, fields, required=("prompt",))
    return v["prompt"], v["add_special_tokens"]


def parse_detokenize(body: Any, vocab_size: int) -> list[int]:
    v = parse(body, {"tokens": (lambda n, x: x, None), "model": (any_string_or_null, None)}, required=("tokens",))
    return token_ids("tokens", v["tokens"], vocab_size)


def token_ids(name: str, value: Any, vocab_size: int) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise BadRequest(f"'{name}' must be an array of token ids", name)
    bad = [i for i in value if not 0 <= i < vocab_size]
    if bad:
        raise BadRequest(f"'{name}' holds ids outside the vocabulary [0, {vocab_size}): {bad[:5]}", name)
    return value
