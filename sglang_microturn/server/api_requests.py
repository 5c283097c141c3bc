"""Typed requests of the /microturn API: each parser takes a request body (a JSON object) and returns a typed
value, or raises BadRequest naming the field, what it must be and what it got.

Parsers check form only (types, ranges a value can never leave, no field they do not know); what depends on
a session's state (its length, the KV budget, the chunk against the vocabulary and the chunk limit, the
default output budget) is the session registry's to check and resolve. A number JSON can write but a float
cannot hold (1e400, and the NaN / Infinity Python's json reads) reaches a parser as `NonFinite`, so the error
names its field; unknown fields are refused by name (a typo such as `idle_timeout_s` would otherwise leave a
session without the timeout its client asked for).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from sglang_microturn.config import MAX_DEADLINE_MS, MAX_IDLE_TIMEOUT_S
from sglang_microturn.server.layout_turns import LayoutInput, parse_layout_input
from sglang_microturn.server.session_registry import BadRequest, SessionOptions, shown

OPEN_FIELDS = frozenset({"output_budget", "stop_ids", "idle_timeout", "temperature", "ignore_eos", "seed",
                         "deadline_ms"})
# An append carries its micro-turn as `input_ids`, or as `input` (audio and text: server/layout_turns.py).
APPEND_FIELDS = frozenset({"session_id", "input_ids", "input", "output_budget", "return_logprob", "expected_length"})
CLOSE_FIELDS = frozenset({"session_id"})
MAX_SESSION_ID_CHARS = 128  # ours are 40 hex digits (session_registry.SESSION_ID_CHARS); SGLang's own are uuid4 hex
MAX_OUTPUT_BUDGET = 1 << 20  # tokens of one micro-turn's output: far past any context length
MAX_TEMPERATURE = 100


class NonFinite:
    """A JSON number outside the float range (1e400) or NaN / Infinity / -Infinity: never a valid value."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return shown(self.text)


def _parse_float(text: str):
    value = float(text)
    return value if math.isfinite(value) else NonFinite(text)


# parse_float / parse_constant run only for floats and NaN / Infinity: the integer ids of an append still
# take the C scanner's fast path.
_DECODER = json.JSONDecoder(parse_float=_parse_float, parse_constant=NonFinite)


@dataclass(frozen=True)
class AppendRequest:
    session_id: str
    input_ids: list[int]  # empty when the micro-turn came as `layout_input`
    layout_input: LayoutInput | None  # audio / text for the server to encode (None: input_ids)
    output_budget: int | None  # None: the session's own budget (resolved by the registry)
    return_logprob: bool
    expected_length: int | None


def parse_json_body(raw: bytes) -> dict:
    try:
        body = _DECODER.decode(raw.decode("utf-8") if raw else "null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON: {shown(str(e))}") from None
    except RecursionError:
        raise BadRequest("body is not valid JSON: it nests arrays or objects too deeply") from None
    except ValueError as e:  # an integer literal past Python's digit limit (4300)
        raise BadRequest(f"body is not valid JSON: {shown(str(e))}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def refuse_unknown_fields(body: dict, allowed: frozenset, what: str) -> None:
    unknown = body.keys() - allowed
    if unknown:
        names = ", ".join(shown(repr(n)) for n in sorted(unknown)[:5])
        raise BadRequest(f"unknown field{'s' if len(unknown) > 1 else ''} {names} in {what}; "
                         f"allowed: {', '.join(sorted(allowed))}")


def _field(body: dict, name: str, kind: type | tuple, default=None, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise BadRequest(f"missing field {name!r}")
        return default
    value = body[name]
    if type(value) is NonFinite:
        raise BadRequest(f"field {name!r} must be a finite number, got {value!r}")
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
        raise BadRequest(f"field {name!r} must be >= 0, got {shown(str(value))}")
    return value


def _at_most(value, name: str, limit, why: str = ""):
    if value is not None and value > limit:
        raise BadRequest(f"field {name!r} must be <= {limit}{why}, got {shown(str(value))}")
    return value


def parse_session_id(body: dict) -> str:
    session_id = _field(body, "session_id", str, required=True)
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise BadRequest(f"field 'session_id' is {len(session_id)} characters long; session ids have at most "
                         f"{MAX_SESSION_ID_CHARS}")
    return session_id


def parse_session_call(body: dict, what: str) -> str:
    """The body of a call that names only its session (`what`: "a close", "a cancel")."""
    refuse_unknown_fields(body, CLOSE_FIELDS, what)
    return parse_session_id(body)


def parse_open(body: dict, vocab_size: int, deadline_ms: float = 200.0,
               idle_timeout_s: float | None = None) -> SessionOptions:
    """`deadline_ms` / `idle_timeout_s`: the server's defaults (MICROTURN_DEADLINE_MS, MICROTURN_IDLE_TIMEOUT_S;
    None = never expire). The body's `idle_timeout` overrides the latter; 0 there opts out (never expire)."""
    refuse_unknown_fields(body, OPEN_FIELDS, "an open")
    deadline_ms = _field(body, "deadline_ms", (int, float), default=deadline_ms)
    if not 0 < deadline_ms <= MAX_DEADLINE_MS:
        raise BadRequest(f"field 'deadline_ms' must be in (0, {MAX_DEADLINE_MS}] milliseconds, got {deadline_ms}")
    idle = _at_most(_non_negative(_field(body, "idle_timeout", (int, float)), "idle_timeout"), "idle_timeout",
                    MAX_IDLE_TIMEOUT_S, " seconds (0 = never expire)")
    options = SessionOptions(
        output_budget=_at_most(_non_negative(_field(body, "output_budget", int,
                                                    default=SessionOptions.output_budget), "output_budget"),
                               "output_budget", MAX_OUTPUT_BUDGET),
        stop_ids=tuple(_int_list(body, "stop_ids", required=False)),
        idle_timeout_s=idle_timeout_s if idle is None else (idle or None),
        temperature=float(_at_most(_non_negative(_field(body, "temperature", (int, float), default=0.0),
                                                 "temperature"), "temperature", MAX_TEMPERATURE)),
        ignore_eos=_field(body, "ignore_eos", bool, default=False),
        seed=_non_negative(_field(body, "seed", int), "seed"),
        deadline_s=deadline_ms / 1e3,
    )
    if options.seed is not None and options.seed >= 1 << 63:
        raise BadRequest(f"field 'seed' must be < 2**63 (SGLang keeps seeds as int64), got {shown(str(options.seed))}")
    bad = next((t for t in options.stop_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise BadRequest(f"stop id {bad} is outside the vocabulary [0, {vocab_size})")
    return options


def parse_append(body: dict) -> AppendRequest:
    """The append's fields; a negative output budget is the registry's to refuse (with the chunk's checks)."""
    if not body.keys() <= APPEND_FIELDS:
        refuse_unknown_fields(body, APPEND_FIELDS, "an append")
    given = body.get("input")
    if given is not None and body.get("input_ids") is not None:
        raise BadRequest("an append carries 'input_ids' or 'input' (audio / text), not both")
    return AppendRequest(
        session_id=parse_session_id(body),
        input_ids=_int_list(body, "input_ids", required=True) if given is None else [],
        layout_input=None if given is None else parse_layout_input(given),
        output_budget=_at_most(_field(body, "output_budget", int), "output_budget", MAX_OUTPUT_BUDGET),
        return_logprob=_field(body, "return_logprob", bool, default=False),
        expected_length=_at_most(_non_negative(_field(body, "expected_length", int), "expected_length"),
                                 "expected_length", 1 << 62),
    )
