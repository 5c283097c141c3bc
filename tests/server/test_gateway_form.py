"""The gateway form of the API (sglang_microturn/protocol.py): POST /generate with {"microturn": {"op", ...}}
is served by the plugin's front exactly as the call's own route, and every other /generate body reaches
SGLang's /generate byte for byte, streamed bodies included."""

import json

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from fake_sglang_http import FakeTokenizerManager

from sglang_microturn import protocol
from sglang_microturn.server.api_handlers import Backend, MicroTurnAPI
from sglang_microturn.server.routes import mount


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setenv("MICROTURN_MAX_BODY_BYTES", "4096")
    app = FastAPI()
    app.state.generate_bodies = []

    @app.post("/generate")  # stands for SGLang's: records what reached it
    async def generate(request: Request):
        app.state.generate_bodies.append(await request.body())
        return {"text": "sglang"}

    tm = FakeTokenizerManager()
    mount(app, MicroTurnAPI(lambda: Backend(tm, max_total_num_tokens=100_000)))
    return app


@pytest.fixture
def client(app):
    return TestClient(app)


def via_gateway(client, call, body):
    method, path, payload = protocol.gateway_request(call, body)
    return client.request(method, path, json=payload)


def test_every_call_in_its_gateway_form_acts_as_its_route(client, app):
    r = via_gateway(client, "open", {"output_budget": 2})
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    r = via_gateway(client, "append", {"session_id": sid, "input_ids": [5, 6], "expected_length": 0})
    assert r.status_code == 200 and r.json()["committed_length"] == 4
    direct = client.get(f"/microturn/sessions/{sid}", params={"tokens": 1}).json()
    assert via_gateway(client, "status", {"session_id": sid, "tokens": True}).json() == direct
    assert "tokens" not in via_gateway(client, "status", {"session_id": sid}).json()
    assert via_gateway(client, "close", {"session_id": sid}).status_code == 200
    assert via_gateway(client, "append", {"session_id": sid, "input_ids": [7]}).status_code == 410
    assert app.state.generate_bodies == []  # none of it reached SGLang's /generate


def test_errors_in_the_gateway_form_are_the_routes_errors(client):
    sid = via_gateway(client, "open", {}).json()["session_id"]
    r = via_gateway(client, "append", {"session_id": sid, "input_ids": [5], "expected_length": 3})
    assert r.status_code == 412 and r.json()["error"]["code"] == 412
    r = via_gateway(client, "open", {"idle_timeout_s": 5})  # a typo'd field is refused by name, as on the route
    assert r.status_code == 400 and "idle_timeout_s" in r.json()["error"]["message"]


@pytest.mark.parametrize("envelope,match", [
    ({"op": "delete"}, '"op" is one of open, append, close, cancel, status'),
    ([1, 2], "must be an object"),
    ({"op": "status"}, "needs a session_id"),
    ({"op": "status", "session_id": "x", "verbose": 1}, "unknown field(s) for status: verbose"),
])
def test_a_malformed_envelope_is_a_400_naming_what_is_wrong(client, app, envelope, match):
    r = client.post("/generate", json={protocol.GATEWAY_FIELD: envelope})
    assert r.status_code == 400 and match in r.json()["error"]["message"]
    assert app.state.generate_bodies == []


def test_other_generate_bodies_reach_sglang_unchanged(client, app):
    plain = json.dumps({"text": "hello", "sampling_params": {"max_new_tokens": 1}}).encode()
    mentions = json.dumps({"text": 'say "microturn"'}).encode()  # the word, not the field: parsed, passed on
    big = json.dumps({"text": "x" * 10_000}).encode()  # over the body limit: passed on unread past it

    def chunks(body):
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    for body in (plain, mentions, big):
        assert client.post("/generate", content=body).json() == {"text": "sglang"}
    assert client.post("/generate", content=chunks(big)).json() == {"text": "sglang"}  # streamed, no length
    assert app.state.generate_bodies == [plain, mentions, big, big]
