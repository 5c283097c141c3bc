"""The typed request parsers: form only, each error naming the field."""

import pytest

from sglang_microturn.server.api_requests import (AppendRequest, parse_append, parse_json_body, parse_open,
                                                  parse_session_call)
from sglang_microturn.server.session_registry import BadRequest


def test_append_parses_to_a_typed_request_and_leaves_the_default_budget_to_the_registry():
    assert parse_append({"session_id": "s", "input_ids": [1, 2]}) == AppendRequest("s", [1, 2], None, None, False, None)
    assert parse_append({"session_id": "s", "input_ids": [1], "output_budget": 0, "return_logprob": True,
                         "expected_length": 4}) == AppendRequest("s", [1], None, 0, True, 4)


@pytest.mark.parametrize("body, message", [
    ({"input_ids": [1]}, "missing field 'session_id'"),
    ({"session_id": "s"}, "missing field 'input_ids'"),
    ({"session_id": "s", "input_ids": [1, True]}, "must be a list of integers, found True"),
    ({"session_id": "s", "input_ids": [1], "output_budget": 1.5}, "'output_budget' must be an integer"),
    ({"session_id": "s", "input_ids": [1], "expected_length": -1}, "'expected_length' must be >= 0"),
    ({"session_id": "s", "input_ids": [1], "return_logprob": 1}, "'return_logprob' must be true or false"),
])
def test_bad_append_fields_are_named(body, message):
    with pytest.raises(BadRequest, match=message):
        parse_append(body)


def test_open_and_json_body():
    options = parse_open({"output_budget": 4, "deadline_ms": 150}, vocab_size=10)
    assert options.output_budget == 4 and options.deadline_s == 0.15
    with pytest.raises(BadRequest, match="stop id 10 is outside"):
        parse_open({"stop_ids": [10]}, vocab_size=10)
    assert parse_json_body(b'{"a": 1}') == {"a": 1}
    for raw, message in ((b"{", "not valid JSON"), (b"[1]", "must be a JSON object")):
        with pytest.raises(BadRequest, match=message):
            parse_json_body(raw)


def _open_raw(raw: bytes):
    return parse_open(parse_json_body(raw), vocab_size=10)


@pytest.mark.parametrize("raw, message", [
    (b'{"temperature": 1e400}', "'temperature' must be a finite number, got 1e400"),
    (b'{"temperature": NaN}', "'temperature' must be a finite number, got NaN"),
    (b'{"temperature": Infinity}', "'temperature' must be a finite number, got Infinity"),
    (b'{"temperature": 1000}', "'temperature' must be <= 100"),
    (b'{"idle_timeout": 1e400}', "'idle_timeout' must be a finite number, got 1e400"),
    (b'{"idle_timeout": NaN}', "'idle_timeout' must be a finite number, got NaN"),
    (b'{"idle_timeout": -Infinity}', "'idle_timeout' must be a finite number, got -Infinity"),
    (b'{"idle_timeout": 1e9}', "'idle_timeout' must be <= 604800"),
    (b'{"deadline_ms": NaN}', "'deadline_ms' must be a finite number"),
    (b'{"output_budget": 1e30}', "'output_budget' must be an integer"),
    (b'{"output_budget": 1000000000000000000000000000000}', "'output_budget' must be <= 1048576"),
    (b'{"seed": 1' + b"0" * 5000 + b"}", "body is not valid JSON"),
    (b'{"stop_ids": [1, NaN]}', "list of integers, found NaN"),
    (b'{"idle_timeout_s": 5}', "unknown field 'idle_timeout_s' in an open"),
    (b"[" * 100_000 + b"]" * 100_000, "nests arrays or objects too deeply"),
    (b'{"a": ' * 100_000 + b"1" + b"}" * 100_000, "nests arrays or objects too deeply"),
])
def test_bad_numbers_nesting_and_unknown_fields_are_400s_naming_the_field(raw, message):
    with pytest.raises(BadRequest) as e:
        _open_raw(raw)
    assert message in e.value.message and len(e.value.message) < 400


def test_an_unknown_append_or_close_field_is_refused_by_name():
    with pytest.raises(BadRequest, match="unknown field 'expected_len' in an append"):
        parse_append({"session_id": "s", "input_ids": [1], "expected_len": 3})
    with pytest.raises(BadRequest, match="unknown fields 'a', 'b' in a close"):
        parse_session_call({"session_id": "s", "a": 1, "b": 2}, "a close")


def parse_close(body):
    return parse_session_call(body, "a close")


def test_a_huge_session_id_or_field_name_is_not_echoed_back():
    huge = "x" * 1_000_000
    for parse, body in ((parse_append, {"session_id": huge, "input_ids": [1]}), (parse_close, {"session_id": huge}),
                        (parse_close, {"session_id": "s", huge: 1})):
        with pytest.raises(BadRequest) as e:
            parse(body)
        assert len(e.value.message) < 400 and "100000" in e.value.message


def test_idle_timeout_defaults_to_the_servers_and_zero_opts_out():
    assert parse_open({}, vocab_size=10, idle_timeout_s=300.0).idle_timeout_s == 300.0
    assert parse_open({"idle_timeout": 5}, vocab_size=10, idle_timeout_s=300.0).idle_timeout_s == 5
    assert parse_open({"idle_timeout": 0}, vocab_size=10, idle_timeout_s=300.0).idle_timeout_s is None
    assert parse_open({}, vocab_size=10, idle_timeout_s=None).idle_timeout_s is None
