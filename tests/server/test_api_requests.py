"""The typed request parsers: form only, each error naming the field."""

import pytest

from sglang_microturn.server.api_requests import AppendRequest, parse_append, parse_json_body, parse_open
from sglang_microturn.server.session_registry import BadRequest


def test_append_parses_to_a_typed_request_and_leaves_the_default_budget_to_the_registry():
    assert parse_append({"session_id": "s", "input_ids": [1, 2]}) == AppendRequest("s", [1, 2], None, False, None)
    assert parse_append({"session_id": "s", "input_ids": [1], "output_budget": 0, "return_logprob": True,
                         "expected_length": 4}) == AppendRequest("s", [1], 0, True, 4)


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
