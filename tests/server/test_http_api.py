"""The /microturn HTTP API through FastAPI's test client, over a stand-in for SGLang's tokenizer manager
(tests/rigs/fake_sglang_http.py). The scheduler side itself is covered by the patch tests on SGLang's real
classes and by the GPU soak.
"""

import asyncio
import threading
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fake_sglang_http import BOS, VOCAB, FakeTokenizerManager, app_for

from sglang_microturn.server.api_handlers import Backend, MicroTurnAPI
from sglang_microturn.server.routes import mount

@pytest.fixture
def tm():
    return FakeTokenizerManager()


@pytest.fixture
def api(tm, monkeypatch):
    monkeypatch.setenv("MICROTURN_SESSION_KV_TOKENS", "4096")
    monkeypatch.setenv("MICROTURN_MAX_CHUNK_TOKENS", "64")
    return MicroTurnAPI(lambda: Backend(tm, max_total_num_tokens=100_000))


@pytest.fixture
def client(api):
    return TestClient(app_for(api))


def open_session(client, **options):
    r = client.post("/microturn/open", json=options)
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def append(client, sid, ids, **extra):
    return client.post("/microturn/append", json={"session_id": sid, "input_ids": ids, **extra})


def state(client, sid):
    r = client.get(f"/microturn/sessions/{sid}", params={"tokens": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_open_gives_unguessable_distinct_ids(client):
    ids = {open_session(client) for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 40 and int(i, 16) >= 0 for i in ids)
    assert len({i[:8] for i in ids}) == 1 and len({i[8:] for i in ids}) == 3  # one instance tag, then random


def test_an_id_of_another_instance_is_gone_and_a_never_minted_one_unknown(client):
    sid = open_session(client)
    foreign = ("0" if sid[0] != "0" else "1") + sid[1:]  # minted shape, another instance's tag
    r = append(client, foreign, [5])
    assert r.status_code == 410 and "another server instance" in r.json()["error"]["message"]
    assert client.get(f"/microturn/sessions/{foreign}").status_code == 410
    assert append(client, "f" * 32, [5]).status_code == 404  # not the minted shape (e.g. SGLang's uuid4 hex)
    assert append(client, sid, [5]).status_code == 200


def test_appends_build_the_committed_sequence(client, tm):
    sid = open_session(client, output_budget=3)
    r1 = append(client, sid, [5, 6, 7, 8]).json()
    assert r1["output_ids"] == [0, 7, 14] and r1["committed_length"] == 7 == r1["server_length"]
    ts = r1["timestamps"]
    assert ts["received"] <= ts["scheduled"] <= ts["first_token"] <= ts["done"]
    assert r1["sglang_latency_s"] == 0.002  # SGLang's own time for the turn (meta_info.e2e_latency)
    r2 = append(client, sid, [9], output_budget=0).json()  # listen only
    assert r2["output_ids"] == [] and r2["committed_length"] == 8 and r2["timestamps"]["first_token"] is None
    s = state(client, sid)
    assert s["tokens"] == [5, 6, 7, 8, 0, 7, 14, 9] and s["length"] == 8 == tm.lengths[sid]
    assert s["state"] == "open" and s["appends"] == 2 and not s["in_flight"]


def test_seed_reaches_every_turn_of_the_session(client, tm):
    sid = open_session(client, temperature=0.8, seed=7)
    assert append(client, sid, [5]).status_code == 200
    assert tm.last_sampling_params["sampling_seed"] == 7 and tm.last_sampling_params["temperature"] == 0.8
    unseeded = open_session(client)
    assert append(client, unseeded, [5]).status_code == 200
    assert tm.last_sampling_params["sampling_seed"] is None


def test_logprobs_on_request(client):
    sid = open_session(client, output_budget=2)
    r = append(client, sid, [5], return_logprob=True).json()
    assert r["output_logprobs"] == [-1.0, -1.0]


BAD_APPENDS = [
    ({"input_ids": []}, 400, "input_ids is empty"),
    ({"input_ids": list(range(1, 66))}, 400, "exceeds the 64-token limit"),
    ({"input_ids": [5, VOCAB]}, 400, f"input id {VOCAB} is outside the vocabulary"),
    ({"input_ids": [5, -1]}, 400, "input id -1 is outside"),
    ({"input_ids": [5, "6"]}, 400, "list of integers"),
    ({"input_ids": [5, True]}, 400, "list of integers"),
    ({"input_ids": "5 6"}, 400, "must be a list"),
    ({"input_ids": [BOS, 5]}, 400, "BOS"),
    ({"input_ids": [5], "output_budget": -1}, 400, "output budget -1 is negative"),
    ({"input_ids": [5], "output_budget": 1.5}, 400, "must be an integer"),
    ({}, 400, "missing field 'input_ids'"),
]


@pytest.mark.parametrize("body, status, message", BAD_APPENDS)
def test_bad_append_is_rejected_and_changes_nothing(client, tm, body, status, message):
    sid = open_session(client, output_budget=1)
    append(client, sid, [BOS, 5])  # a first chunk may start with BOS
    before = state(client, sid)
    r = client.post("/microturn/append", json={"session_id": sid, **body})
    assert r.status_code == status and message in r.json()["error"]["message"], r.text
    assert state(client, sid) == {**before, "last_activity": state(client, sid)["last_activity"]}
    assert tm.lengths[sid] == before["length"]
    assert append(client, sid, [9]).json()["committed_length"] == before["length"] + 2  # still usable


@pytest.mark.parametrize(
    "raw, message",
    [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"", "JSON object")],
)
def test_malformed_bodies(client, tm, raw, message):
    sid = open_session(client, output_budget=1)
    append(client, sid, [5])
    before = state(client, sid)
    for path in ("/microturn/open", "/microturn/append", "/microturn/close"):
        r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and message in r.json()["error"]["message"], (path, r.text)
    after = state(client, sid)
    assert after == {**before, "last_activity": after["last_activity"]} and tm.lengths == {sid: 2}


@pytest.mark.parametrize(
    "options, message",
    [({"output_budget": -2}, "must be >= 0"), ({"stop_ids": [VOCAB + 5]}, "stop id"),
     ({"idle_timeout": -1}, "'idle_timeout' must be >= 0"), ({"idle_timeout": "soon"}, "must be an integer or a number"),
     ({"seed": -1}, "'seed' must be >= 0"), ({"seed": 1 << 63}, "'seed' must be < 2**63"),
     ({"seed": "7"}, "'seed' must be an integer"), ({"deadline_ms": 0}, "'deadline_ms' must be in (0, 60000]"),
     ({"deadline_ms": 1e9}, "'deadline_ms' must be in"), ({"deadline_ms": "fast"}, "'deadline_ms' must be")],
)
def test_bad_open_options(client, tm, options, message):
    r = client.post("/microturn/open", json=options)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert tm.lengths == {}


def test_unknown_closed_and_idempotent_close(client, tm):
    assert append(client, "f" * 32, [5]).status_code == 404
    assert client.get("/microturn/sessions/nope").status_code == 404
    assert client.post("/microturn/close", json={"session_id": "nope"}).status_code == 404
    sid = open_session(client)
    append(client, sid, [5])
    first = client.post("/microturn/close", json={"session_id": sid}).json()
    second = client.post("/microturn/close", json={"session_id": sid}).json()
    assert first == {"session_id": sid, "state": "closed", "already_closed": False}
    assert second == {"session_id": sid, "state": "closed", "already_closed": True}
    assert sid not in tm.lengths
    r = append(client, sid, [6])
    assert r.status_code == 410 and "closed" in r.json()["error"]["message"]
    assert state(client, sid)["length"] == 9  # the committed sequence stays readable


def test_concurrent_append_gets_409_and_leaves_running_turn_alone(api, client, tm):
    sid = open_session(client, output_budget=2)
    append(client, sid, [5])
    tm.hold = threading.Event()
    tm.running.clear()
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("first", append(client, sid, [6, 7])))
    t.start()
    assert tm.running.wait(5)
    r = append(client, sid, [8])
    assert r.status_code == 409 and "in flight" in r.json()["error"]["message"]
    assert state(client, sid)["in_flight"] and state(client, sid)["length"] == 3
    tm.hold.set()
    t.join(5)
    assert results["first"].status_code == 200 and results["first"].json()["committed_length"] == 7
    assert state(client, sid)["length"] == 7 == tm.lengths[sid] and not state(client, sid)["in_flight"]


def test_client_disconnect_rolls_back_and_session_continues(api, client, tm):
    sid = open_session(client, output_budget=2)
    append(client, sid, [5])
    tm.hold = threading.Event()  # never set: only the disconnect ends this append

    async def gone():
        return None

    out = asyncio.run(api.append({"session_id": sid, "input_ids": [6, 7]}, wait_disconnect=gone))
    assert out["aborted"] and len(tm.aborted) == 1
    assert state(client, sid)["length"] == 3 == tm.lengths[sid] and not state(client, sid)["in_flight"]
    tm.hold = None
    assert append(client, sid, [8]).json()["committed_length"] == 6


def test_server_side_loss_of_session_is_410_and_releases_its_budget(api, client, tm):
    sid = open_session(client, output_budget=1)
    append(client, sid, [5, 6])
    used = api.registry.used_tokens()
    del tm.lengths[sid]  # e.g. SGLang reaped it: its scheduler answers the next turn with a 400 abort
    r = append(client, sid, [7])
    assert r.status_code == 410 and "no longer exists" in r.json()["error"]["message"], r.text
    for _ in range(2):  # not a zombie: every retry is 410, never SGLang's 400
        assert append(client, sid, [7]).status_code == 410
    assert state(client, sid)["state"] == "expired" and state(client, sid)["length"] == 3
    assert api.registry.used_tokens() == used - 3 and api.registry.open_sessions == 0


def test_the_session_gone_messages_are_sglangs_own():
    import inspect

    from sglang.srt.managers.scheduler import Scheduler

    from sglang_microturn.server.api_handlers import SESSION_GONE_MESSAGES

    source = inspect.getsource(Scheduler.handle_generate_request)
    assert all(m in source for m in SESSION_GONE_MESSAGES)


@pytest.mark.parametrize("status, message", [(503, "Request running timeout reached."), (None, "Aborted")])
def test_a_server_side_abort_is_503_retry_and_changes_nothing(client, tm, status, message):
    sid = open_session(client, output_budget=1)
    append(client, sid, [5])
    before = state(client, sid)
    tm.abort_next = (message, status)  # a running timeout (SGLang's 503) / an operator's /abort_request
    r = append(client, sid, [6])
    assert r.status_code == 503 and r.json()["error"]["code"] == 503, r.text
    assert message in r.json()["error"]["message"] and "retry" in r.json()["error"]["message"]
    after = state(client, sid)
    assert after == {**before, "last_activity": after["last_activity"]} and tm.lengths[sid] == 2
    assert append(client, sid, [6]).json()["committed_length"] == 4  # the retry applies once


def test_sglangs_500_is_in_our_shape(client, tm):
    sid = open_session(client, output_budget=1)
    tm.abort_next = ("out of memory", 500)
    r = append(client, sid, [6])
    assert r.status_code == 500 and r.json() == {"error": {"code": 500, "message": r.json()["error"]["message"]}}
    assert "out of memory" in r.json()["error"]["message"] and state(client, sid)["length"] == 0


def test_kv_budget_429_for_open_and_append(monkeypatch, tm):
    monkeypatch.setenv("MICROTURN_SESSION_KV_TOKENS", "200")
    monkeypatch.setenv("MICROTURN_MAX_CHUNK_TOKENS", "64")
    api = MicroTurnAPI(lambda: Backend(tm, max_total_num_tokens=100_000))
    client = TestClient(app_for(api))
    a = open_session(client, output_budget=8)
    r = append(client, a, list(range(1, 61)), output_budget=8)
    assert r.status_code == 200 and r.json()["committed_length"] == 68
    b = open_session(client, output_budget=8)
    append(client, b, list(range(1, 61)), output_budget=8)
    r = client.post("/microturn/open", json={"output_budget": 8})  # 136 used + 72 headroom > 200
    assert r.status_code == 429 and "budget" in r.json()["error"]["message"]
    r = append(client, a, list(range(1, 61)), output_budget=8)
    assert r.status_code == 429 and state(client, a)["length"] == 68 and tm.lengths[a] == 68
    client.post("/microturn/close", json={"session_id": b})
    assert append(client, a, list(range(1, 61)), output_budget=8).status_code == 200  # freed budget is reused


def test_idle_session_expires_and_is_closed_in_sglang(api, client, tm):
    api.registry.sweep_interval_s = 0.0
    sid = open_session(client, idle_timeout=0.05)
    assert tm.timeouts[sid] is None  # the registry is the only idle timer
    append(client, sid, [5])
    time.sleep(0.1)
    s = state(client, sid)
    assert s["state"] == "expired" and s["length"] == 9 and sid not in tm.lengths
    assert append(client, sid, [6]).status_code == 410


def test_routes_honour_sglang_api_key(api):
    from sglang.srt.utils.auth import add_api_key_middleware

    app = app_for(api)
    add_api_key_middleware(app, api_key="sekrit", admin_api_key=None)
    client = TestClient(app)
    assert client.post("/microturn/open", json={}).status_code == 401
    assert client.post("/microturn/open", json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.post("/microturn/open", json={}, headers={"Authorization": "Bearer sekrit"})
    assert r.status_code == 200
    assert client.get(f"/microturn/sessions/{r.json()['session_id']}").status_code == 401


def test_expected_length_precondition(client, tm):
    sid = open_session(client, output_budget=1)
    assert append(client, sid, [5], expected_length=0).json()["committed_length"] == 2
    r = append(client, sid, [6], expected_length=0)  # e.g. a late copy of an append whose response was lost
    assert r.status_code == 412 and "has 2 committed tokens, not the expected 0" in r.json()["error"]["message"]
    assert state(client, sid)["length"] == 2 == tm.lengths[sid]
    assert append(client, sid, [6], expected_length=2).json()["committed_length"] == 4


def test_each_turn_counts_against_the_session_deadline(client, tm):
    sid, other = open_session(client, deadline_ms=50), open_session(client)
    assert state(client, other)["deadline"]["deadline_ms"] == 200.0  # MICROTURN_DEADLINE_MS
    assert append(client, sid, [1, 2]).status_code == 200
    d = state(client, sid)["deadline"]
    assert (d["deadline_ms"], d["turns"], d["misses"]) == (50.0, 1, 0)
    tm.hold = threading.Event()
    threading.Timer(0.15, tm.hold.set).start()  # the turn is held ~150 ms: a miss of tens of ms
    assert append(client, sid, [3]).status_code == 200
    d = state(client, sid)["deadline"]
    assert (d["turns"], d["misses"]) == (2, 1) and d["lateness_ms_max"] > 20 and d["jitter_ms"] > 0


def test_open_past_real_time_capacity_is_429_with_retry_after_and_opens_nothing(monkeypatch, tm):
    monkeypatch.setenv("MICROTURN_ADMIT_P99_FRACTION", "0.5")
    api = MicroTurnAPI(lambda: Backend(tm, max_total_num_tokens=100_000))
    client = TestClient(app_for(api))
    live = open_session(client, deadline_ms=50)
    tm.hold = threading.Event()
    threading.Timer(0.05, tm.hold.set).start()  # the live session's turn takes its whole deadline
    assert append(client, live, [1, 2]).status_code == 200
    r = client.post("/microturn/open", json={})
    assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    assert "real-time capacity" in r.json()["error"]["message"]
    assert list(tm.lengths) == [live] and api.registry.open_sessions == 1  # nothing opened, here or in SGLang
    assert append(client, live, [3]).status_code == 200  # a live session is never cut off


def test_fixed_session_ceiling(monkeypatch, tm):
    monkeypatch.setenv("MICROTURN_MAX_LIVE_SESSIONS", "1")
    client = TestClient(app_for(MicroTurnAPI(lambda: Backend(tm, max_total_num_tokens=100_000))))
    first = open_session(client)
    assert client.post("/microturn/open", json={}).status_code == 429
    client.post("/microturn/close", json={"session_id": first})
    open_session(client)  # a closed session frees its place


@pytest.mark.parametrize("name, value", [("MICROTURN_ADMIT_P99_FRACTION", "-1"), ("MICROTURN_MAX_LIVE_SESSIONS", "2.5"),
                                         ("MICROTURN_ADMIT_WINDOW_S", "soon"), ("MICROTURN_DEADLINE_MS", "0")])
def test_bad_realtime_settings_are_refused(monkeypatch, tm, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name}='{value}'"):
        MicroTurnAPI(lambda: Backend(tm, max_total_num_tokens=100_000))


def test_the_front_serves_microturn_before_the_apps_routes_and_passes_the_rest_on(api):
    app = FastAPI()

    @app.api_route("/{anything:path}", methods=["GET", "POST"])
    def catch_all(anything: str):  # would shadow /microturn if our routes sat in the app's table
        return {"app": anything}

    mount(app, api)
    client = TestClient(app)
    assert client.post("/microturn/open", json={}).json()["session_id"]
    assert client.get("/generate").json() == {"app": "generate"}
    assert client.get("/microturnx/open").json() == {"app": "microturnx/open"}


def test_the_front_answers_unknown_routes_and_methods_in_the_error_shape(client):
    r = client.post("/microturn/nope", json={})
    assert r.status_code == 404 and "/microturn/nope" in r.json()["error"]["message"]
    r = client.get("/microturn/append")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


def test_a_non_integer_id_is_named(client):
    sid = open_session(client)
    for bad in ([1, True], [1, 2.0], [1, "3"]):
        r = append(client, sid, bad)
        assert r.status_code == 400 and repr(bad[1]) in r.json()["error"]["message"], r.text
    assert state(client, sid)["length"] == 0


def test_the_front_keeps_sglangs_cors_policy(client):
    r = client.options("/microturn/append", headers={"Origin": "http://console.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://console.example"
    r = client.post("/microturn/open", json={}, headers={"Origin": "http://console.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://console.example"


def _nothing_opened(api, tm):
    return tm.lengths == {} and api.registry.open_sessions == 0 and api.registry.sessions == {}


@pytest.mark.parametrize("raw, field", [
    (b'{"temperature": 1e400}', "temperature"), (b'{"temperature": NaN}', "temperature"),
    (b'{"idle_timeout": 1e400}', "idle_timeout"), (b'{"idle_timeout": NaN}', "idle_timeout"),
    (b'{"idle_timeout": Infinity}', "idle_timeout"), (b'{"idle_timeout_s": 5}', "idle_timeout_s"),
    (b"[" * 100_000 + b"]" * 100_000, "nests"), (b'{"output_budget": 1e30}', "output_budget"),
    (b'{"output_budget": 100000000000000000000000000000}', "output_budget"),
])
def test_a_bad_number_or_field_in_an_open_is_400_naming_it_and_opens_nothing(api, client, tm, raw, field):
    r = client.post("/microturn/open", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    assert r.json()["error"]["code"] == 400 and _nothing_opened(api, tm)


@pytest.mark.parametrize("raw_tail, field", [
    (b', "output_budget": 1e400}', "output_budget"), (b', "expected_length": NaN}', "expected_length"),
    (b', "return_logprobs": true}', "return_logprobs"), (b', "output_budget": 5000}', "output_budget"),
])
def test_a_bad_number_or_field_in_an_append_is_400_and_changes_nothing(client, tm, raw_tail, field):
    sid = open_session(client, output_budget=1)
    append(client, sid, [5])
    before = state(client, sid)
    raw = b'{"session_id": "%s", "input_ids": [6]' % sid.encode() + raw_tail
    r = client.post("/microturn/append", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and field.replace("output_budget", "output") in r.json()["error"]["message"], r.text
    after = state(client, sid)
    assert after == {**before, "last_activity": after["last_activity"]} and tm.lengths[sid] == 2


def test_an_output_budget_no_session_could_ever_get_is_400_not_429(client, tm):
    sid = open_session(client)
    r = append(client, sid, [5], output_budget=100_000)  # the whole session budget is 4096
    assert r.status_code == 400 and "more than the whole 4096-token session budget" in r.json()["error"]["message"]
    r = client.post("/microturn/open", json={"output_budget": 100_000})
    assert r.status_code == 400 and state(client, sid)["length"] == 0


def test_a_body_over_the_limit_is_413_and_changes_nothing(monkeypatch, tm):
    monkeypatch.setenv("MICROTURN_MAX_BODY_BYTES", "2048")
    api = MicroTurnAPI(lambda: Backend(tm, max_total_num_tokens=100_000))
    client = TestClient(app_for(api))
    sid = open_session(client, output_budget=1)
    big = {"session_id": sid, "input_ids": [5] * 1000}  # ~3 kB
    r = client.post("/microturn/append", json=big)
    assert r.status_code == 413 and r.json()["error"] == {
        "code": 413, "message": r.json()["error"]["message"]} and "MICROTURN_MAX_BODY_BYTES" in r.text
    import json as _json

    def chunked():  # no Content-Length: the limit holds while reading
        raw = _json.dumps(big).encode()
        for i in range(0, len(raw), 512):
            yield raw[i:i + 512]

    r = client.post("/microturn/append", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert state(client, sid)["length"] == 0 and tm.lengths[sid] == 0 and not state(client, sid)["in_flight"]
    assert append(client, sid, [5]).status_code == 200


def test_a_one_megabyte_session_id_is_not_echoed_back(client):
    huge = "f" * 1_000_000
    for r in (append(client, huge, [5]), client.post("/microturn/close", json={"session_id": huge}),
              client.get(f"/microturn/sessions/{'f' * 10_000}")):
        assert r.status_code in (400, 404) and len(r.content) < 1000, r.status_code


def test_sglangs_http_exceptions_and_our_bugs_answer_in_our_shape(api, client, tm, monkeypatch):
    import fastapi

    async def unavailable(obj):
        raise fastapi.HTTPException(status_code=503, detail="The server is overloaded")

    monkeypatch.setattr(tm, "open_session", unavailable)
    r = client.post("/microturn/open", json={})
    assert r.status_code == 503 and r.json() == {"error": {"code": 503, "message": "The server is overloaded"}}
    assert api.registry.open_sessions == 0  # the registry's half of the open was undone

    async def bug(obj):
        raise KeyError("oops")

    monkeypatch.setattr(tm, "open_session", bug)
    r = client.post("/microturn/open", json={})
    assert r.status_code == 500 and r.json() == {"error": {"code": 500, "message": "the server failed: KeyError"}}
    assert api.registry.open_sessions == 0


def test_the_cap_derived_from_the_pool_rows_refuses_opens_with_429(monkeypatch, tm):
    monkeypatch.delenv("MICROTURN_MAX_SESSIONS", raising=False)
    api = MicroTurnAPI(lambda: Backend(tm, max_total_num_tokens=100_000, req_to_token_rows=3))
    client = TestClient(app_for(api))
    first, _ = open_session(client), open_session(client)  # 3 rows: 2 sessions, 1 row kept for plain requests
    r = client.post("/microturn/open", json={})
    assert r.status_code == 429 and "MICROTURN_MAX_SESSIONS" in r.json()["error"]["message"]
    assert "Retry-After" in r.headers and len(tm.lengths) == 2
    client.post("/microturn/close", json={"session_id": first})
    open_session(client)


def test_sessions_expire_by_default_and_idle_timeout_zero_opts_out(monkeypatch, tm):
    monkeypatch.setenv("MICROTURN_IDLE_TIMEOUT_S", "0.05")
    api = MicroTurnAPI(lambda: Backend(tm, max_total_num_tokens=100_000))
    client = TestClient(app_for(api))
    default, forever = open_session(client), open_session(client, idle_timeout=0)
    time.sleep(0.1)
    assert state(client, default)["state"] == "expired" and default not in tm.lengths
    assert state(client, forever)["state"] == "open" and append(client, forever, [5]).status_code == 200


def test_a_turn_longer_than_the_idle_timeout_is_not_reaped_underneath(api, client, tm):
    sid = open_session(client, idle_timeout=0.05, output_budget=1)
    assert tm.timeouts[sid] is None  # SGLang has no timer of its own that could start at the turn's arrival
    tm.hold = threading.Event()
    tm.running.clear()
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("turn", append(client, sid, [5])))
    t.start()
    assert tm.running.wait(5)
    for _ in range(4):  # sweeps run while the turn takes 4x the idle timeout
        time.sleep(0.05)
        assert state(client, sid)["state"] == "open"
    tm.hold.set()
    t.join(5)
    assert results["turn"].status_code == 200 and state(client, sid)["length"] == 2 == tm.lengths[sid]
    tm.hold = None
    assert append(client, sid, [6]).status_code == 200


def test_the_reaper_expires_idle_sessions_without_any_call(api, tm, monkeypatch):
    from sglang_microturn.server import api_handlers

    monkeypatch.setattr(api_handlers, "REAP_INTERVAL_S", 0.01)
    api.reap_in_background = True

    async def scenario():
        sid = (await api.open({"idle_timeout": 0.05}))["session_id"]
        await api.sweep()  # the first call starts the reaper
        await asyncio.sleep(0.3)
        return sid

    sid = asyncio.run(scenario())
    assert api.registry.sessions[sid].state.value == "expired" and sid not in tm.lengths


def test_plain_close_session_on_a_microturn_session_closes_it_in_the_registry(api, client, tm):
    from sglang.srt.managers.io_struct import CloseSessionReqInput

    sid = open_session(client, output_budget=1)
    append(client, sid, [5])
    assert api.registry.used_tokens() == 2
    asyncio.run(tm.close_session(CloseSessionReqInput(session_id=sid)))  # what SGLang's /close_session calls
    assert sid not in tm.lengths and api.registry.used_tokens() == 0 and api.registry.open_sessions == 0
    r = append(client, sid, [6])
    assert r.status_code == 410 and "closed" in r.json()["error"]["message"]
    assert client.post("/microturn/close", json={"session_id": sid}).json()["already_closed"]


def test_plain_generate_with_session_params_on_a_microturn_session_is_refused(api, client, tm):
    from sglang.srt.managers.io_struct import GenerateReqInput

    sid = open_session(client, output_budget=1)
    append(client, sid, [5])
    before = state(client, sid)

    async def plain(session_params):
        obj = GenerateReqInput(input_ids=[6], session_params=session_params, sampling_params={"max_new_tokens": 1})
        return [out async for out in tm.generate_request(obj, None)]

    for params in ({"id": sid}, [{"id": sid}]):  # what /generate, /v1/completions, /v1/chat/completions call
        with pytest.raises(ValueError, match="is a /microturn session: append to it with POST /microturn/append"):
            asyncio.run(plain(params))
    after = state(client, sid)
    assert after == {**before, "last_activity": after["last_activity"]} and tm.lengths[sid] == 2
    tm.lengths["plain"] = 0  # an SGLang session opened with /open_session is not ours: it still works
    assert asyncio.run(plain({"id": "plain"}))[-1]["meta_info"]["prompt_tokens"] == 1


def test_multi_tokenizer_mode_is_refused_at_startup_in_one_line():
    from types import SimpleNamespace

    from sglang_microturn.server.routes import require_single_tokenizer

    require_single_tokenizer(SimpleNamespace(tokenizer_worker_num=1))
    with pytest.raises(SystemExit) as e:
        require_single_tokenizer(SimpleNamespace(tokenizer_worker_num=4))
    assert "--tokenizer-worker-num 4" in str(e.value) and "\n" not in str(e.value)


def test_the_launch_hook_refuses_multi_tokenizer_mode_before_mounting(monkeypatch):
    from types import SimpleNamespace

    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_microturn.server import routes

    registered = {}
    monkeypatch.setattr(HookRegistry, "register", lambda target, fn, kind: registered.setdefault(target, fn))
    routes.install()
    before_launch = registered["sglang.srt.entrypoints.http_server.launch_server"]
    with pytest.raises(SystemExit, match="--tokenizer-worker-num 2: the /microturn API needs 1"):
        before_launch(SimpleNamespace(tokenizer_worker_num=2))
    with pytest.raises(SystemExit, match="--tokenizer-worker-num 3"):
        before_launch(server_args=SimpleNamespace(tokenizer_worker_num=3))


def test_a_non_json_body_is_400_in_our_shape_never_a_422(client):
    r = client.post("/microturn/open", data={"output_budget": "3"})  # a form, not JSON
    assert r.status_code == 400 and r.json()["error"]["code"] == 400 and "not valid JSON" in r.text


def test_cancel_stops_the_running_turn_and_keeps_what_it_generated(api, client, tm):
    """Barge-in: the running append returns with the output it has (finish_reason cancelled), all committed;
    the request went to the scheduler as AbortReq(finish_now=True) through SGLang's own wire encoding."""
    sid = open_session(client, output_budget=8)
    append(client, sid, [5])  # 1 + 8 = 9 committed
    tm.hold = threading.Event()  # never set: only the cancel ends this turn
    tm.running.clear()
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("turn", append(client, sid, [6, 7])))
    t.start()
    assert tm.running.wait(5)
    r = client.post("/microturn/cancel", json={"session_id": sid})
    assert r.status_code == 200 and r.json() == {"session_id": sid, "cancelled": True}
    t.join(5)
    turn = results["turn"].json()
    assert turn["finish_reason"] == {"type": "cancelled"} and len(turn["output_ids"]) == 1
    assert turn["committed_length"] == 9 + 2 + 1 == state(client, sid)["length"] == tm.lengths[sid]
    assert not tm.aborted and len(tm.finish_now) == 1  # stopped, not aborted: nothing rolled back
    tm.hold = None
    assert append(client, sid, [8]).json()["committed_length"] == 12 + 1 + 8


def test_cancel_with_nothing_running_changes_nothing(client, tm):
    sid = open_session(client, output_budget=2)
    append(client, sid, [5])
    r = client.post("/microturn/cancel", json={"session_id": sid})
    assert r.json() == {"session_id": sid, "cancelled": False} and not tm.finish_now
    assert state(client, sid)["length"] == 3
    assert client.post("/microturn/cancel", json={"session_id": sid[:8] + "0" * 32}).status_code == 404
    assert client.post("/microturn/cancel", json={"session_id": sid, "x": 1}).status_code == 400
    client.post("/microturn/close", json={"session_id": sid})
    assert client.post("/microturn/cancel", json={"session_id": sid}).status_code == 410
