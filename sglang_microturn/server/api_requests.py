"""Typed requests of the /microturn API: each parser takes a request body (a JSON object) and returns a typed
value, or raises BadRequest naming the field, what it must be and what it got.

Parsers check form only (types, ranges a value can never leave); what depends on a session's state (its
length, the KV budget, the chunk against the vocabulary and the chunk limit, the default output budget) is
the session registry's to check and resolve.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sglang_microturn.config import MAX_DEADLINE_MS
from sglang_microturn.server.session_registry import BadRequest, SessionOptions


@dataclass(frozen=True)
class AppendRequest:
    session_id: str
    input_ids: list[int]
    output_budget: int | None  # None: the session's own budget (resolved by the registry)
    return_logprob: bool
    expected_length: int | None


def parse_json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _field(body: dict, name: str, kind: type | tuple, default=None, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise BadRequest(f"missing field {name!r}")
        return default
    value = body[name]
    if isinstance(value, bool) and kind is not bool:  # bool is an int in Python; never accept it as one
        raise BadRequest(f"field {name!r} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise BadRequest(f"field {name!r} must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", bool: "true or false"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _int_list(body: dict, name: str, required: bool) -> list[int]:
    values = _field(body, name, list, default=[], required=required)
    if values and set(map(type, values)) != {int}:  # C loops, as this runs on every append; bool is no int here
        bad = next(v for v in values if type(v) is not int)
        raise BadRequest(f"field {name!r} must be a list of integers, found {bad!r}")
    return values


def _non_negative(value, name: str):
    if value is not None and value < 0:
        raise BadRequest(f"field {name!r} must be >= 0, got {value}")
    return value


def parse_session_id(body: dict) -> str:
    return _field(body, "session_id", str, required=True)


def parse_open(body: dict, vocab_size: int, deadline_ms: float = 200.0) -> SessionOptions:
    deadline_ms = _field(body, "deadline_ms", (int, float), default=deadline_ms)
    if not 0 < deadline_ms <= MAX_DEADLINE_MS:
        raise BadRequest(f"field 'deadline_ms' must be in (0, {MAX_DEADLINE_MS}] milliseconds, got {deadline_ms}")
    options = SessionOptions(
        output_budget=_non_negative(_field(body, "output_budget", int, default=SessionOptions.output_budget),
                                    "output_budget"),
        stop_ids=tuple(_int_list(body, "stop_ids", required=False)),
        idle_timeout_s=_field(body, "idle_timeout", (int, float)),
        temperature=float(_non_negative(_field(body, "temperature", (int, float), default=0.0), "temperature")),
        ignore_eos=_field(body, "ignore_eos", bool, default=False),
        seed=_non_negative(_field(body, "seed", int), "seed"),
        deadline_s=deadline_ms / 1e3,
    )
    if options.seed is not None and options.seed >= 1 << 63:
        raise BadRequest(f"field 'seed' must be < 2**63 (SGLang keeps seeds as int64), got {options.seed}")
    if options.idle_timeout_s is not None and options.idle_timeout_s <= 0:
        raise BadRequest(f"field 'idle_timeout' must be > 0 seconds, got {options.idle_timeout_s}")
    bad = next((t for t in options.stop_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise BadRequest(f"stop id {bad} is outside the vocabulary [0, {vocab_size})")
    return options


def parse_append(body: dict) -> AppendRequest:
    """The append's fields; a negative output budget is the registry's to refuse (with the chunk's checks)."""
    return AppendRequest(
        session_id=parse_session_id(body),
        input_ids=_int_list(body, "input_ids", required=True),
        output_budget=_field(body, "output_budget", int),
        return_logprob=_field(body, "return_logprob", bool, default=False),
        expected_length=_non_negative(_field(body, "expected_length", int), "expected_length"),
    )
