"""WS /microturn/ws over uvicorn on loopback (its `websockets` protocol) in front of the stand-in tokenizer manager
(tests/rigs/fake_sglang_http.py), driven by the real client (client/ws_session.py) and by raw frames.

Every event, every error event (with the HTTP API's code), bad frames that change nothing, a dropped connection
mid-turn (the session rolls back and stays open), resume with expected_length, and the API-key handshake.
"""

import asyncio
import json
import threading

import pytest
import websockets
from fastapi import FastAPI
from fake_sglang_http import FakeTokenizerManager, serve_on_loopback

from sglang_microturn import protocol
from sglang_microturn.client import (
    BadRequestError,
    LengthMismatchError,
    MicroTurnClient,
    MicroTurnWebSocket,
    PayloadTooLargeError,
    SessionGoneError,
    SessionNotFoundError,
    UnauthorizedError,
)
from sglang_microturn.client.ws_session import ws_url
from sglang_microturn.server.api_handlers import Backend, MicroTurnAPI
from sglang_microturn.server.routes import mount
from sglang_microturn.server.ws_transport import api_key_check


def run(coro):
    return asyncio.run(coro)


def test_a_session_streams_micro_turns_over_one_connection(server):
    url, tm = server

    async def go():
        async with await MicroTurnWebSocket.open(url, output_budget=3) as ws:
            first = await ws.append([10, 11, 12])
            second = await ws.append([13], output_budget=1)
            closed = await ws.close()
        return ws, first, second, closed

    ws, first, second, closed = run(go())
    assert first["type"] == protocol.WS_RESPONSE_DONE and len(first["output_ids"]) == 3
    assert first["committed_length"] == 3 + 3
    assert second["committed_length"] == first["committed_length"] + 1 + len(second["output_ids"])
    assert closed["type"] == protocol.WS_SESSION_CLOSED and closed["state"] == "closed"
    assert tm.closed_lengths == [second["committed_length"]]


async def _raw(url, *events, read=None):
    """Send raw frames on one connection; return every server event that came back (`read` of them)."""
    async with websockets.connect(ws_url(url)) as c:
        for e in events:
            await c.send(e)
        return [json.loads(await asyncio.wait_for(c.recv(), 5)) for _ in range(read or len(events))]


@pytest.mark.parametrize("frame,code,says", [
    (b"\x00\x01", 400, "binary frames"),
    ("not json", 400, "not valid JSON"),
    ("[1, 2]", 400, "JSON object"),
    (json.dumps({"type": "input_audio_buffer.commit"}), 400, "unknown event type"),
    (json.dumps({"event_id": 7, "type": protocol.WS_SESSION_CLOSE}), 400, "event_id must be a string"),
    (json.dumps({"type": protocol.WS_INPUT_APPEND, "input_ids": [1]}), 400, "before the connection has a session"),
    (json.dumps({"type": protocol.WS_SESSION_RESUME, "session_id": "nope"}), 404, "nope"),
    (json.dumps({"type": protocol.WS_SESSION_UPDATE, "session": {"idle_timeout_s": 5}}), 400, "idle_timeout_s"),
    (json.dumps({"type": protocol.WS_SESSION_UPDATE, "session": {"temperature": float("nan")}}), 400, "temperature"),
    (json.dumps({"type": protocol.WS_SESSION_UPDATE, "session": [1]}), 400, '"session" must be an object'),
])
def test_a_bad_frame_is_an_error_event_and_the_connection_stays(server, frame, code, says):
    url, tm = server
    events = run(_raw(url, frame, json.dumps({"type": protocol.WS_SESSION_UPDATE, "event_id": "open"})))
    error, opened = events
    assert error["type"] == protocol.WS_ERROR and error["error"]["code"] == code, error
    assert says in error["error"]["message"]
    assert error["error"]["type"] == protocol.name_of(code)
    # The connection is still usable, and nothing was opened by the bad frame.
    assert opened["type"] == protocol.WS_SESSION_CREATED and opened["in_reply_to"] == "open"
    assert len(tm.lengths) == 1


def test_errors_of_a_session_are_the_http_apis_and_change_nothing(server):
    url, tm = server

    async def go():
        ws = await MicroTurnWebSocket.open(url, output_budget=2)
        await ws.append([10, 11])
        length = ws.committed_length
        errors = []
        for call in (lambda: ws.append([10], expected_length=length + 5),  # 412
                     lambda: ws.append([]),  # 400 empty chunk
                     lambda: ws.append([10**9]),  # 400 outside the vocabulary
                     lambda: ws.append([10], output_budget=-1)):  # 400
            with pytest.raises((LengthMismatchError, BadRequestError)) as e:
                await call()
            errors.append(type(e.value).__name__)
        after = await ws.append([12])
        await ws.close()
        return length, errors, after

    length, errors, after = run(go())
    assert errors == ["LengthMismatchError", "BadRequestError", "BadRequestError", "BadRequestError"]
    assert after["committed_length"] == length + 1 + len(after["output_ids"])  # the errors appended nothing


def test_a_second_session_on_one_connection_is_refused(server):
    url, tm = server
    events = run(_raw(url, json.dumps({"type": protocol.WS_SESSION_UPDATE}),
                      json.dumps({"type": protocol.WS_SESSION_UPDATE})))
    assert events[0]["type"] == protocol.WS_SESSION_CREATED
    assert events[1]["error"]["code"] == 400 and "already carries session" in events[1]["error"]["message"]
    assert len(tm.lengths) == 1


def test_an_oversized_event_is_413(server, monkeypatch):
    url, tm = server
    big = json.dumps({"type": protocol.WS_SESSION_UPDATE, "pad": "x" * 2_000_000})
    [error] = run(_raw(url, big))
    assert error["error"]["code"] == 413


def test_a_dropped_connection_mid_turn_rolls_back_and_resume_continues(server):
    url, tm = server
    tm.hold = threading.Event()

    async def go():
        ws = await MicroTurnWebSocket.open(url, output_budget=2)
        tm.hold.set()
        await ws.append([10, 11])
        committed = ws.committed_length
        tm.hold.clear()
        tm.running.clear()
        sent = asyncio.ensure_future(ws.append([12, 13]))
        await asyncio.wait_for(asyncio.to_thread(tm.running.wait), 5)  # the turn is running in "SGLang"
        await ws.disconnect()  # mid-turn: the server aborts the turn
        with pytest.raises(Exception):
            await sent
        for _ in range(500):
            if tm.aborted:
                break
            await asyncio.sleep(0.01)
        assert tm.aborted, "the dropped connection's turn was not aborted"
        tm.hold.set()
        # The abort lands a moment after SGLang saw it: until then the session answers 409 (as over HTTP).
        async with MicroTurnClient(url) as http:
            for _ in range(500):
                if not (await http.call("status", {"session_id": ws.session_id}))["in_flight"]:
                    break
                await asyncio.sleep(0.01)
        again = await MicroTurnWebSocket.resume(url, ws.session_id)
        resumed_at = again.committed_length
        with pytest.raises(LengthMismatchError):
            await again.append([12, 13], expected_length=committed + 4)
        reply = await again.append([12, 13])  # resent with the length it saw: applies once
        await again.close()
        with pytest.raises(SessionGoneError):
            await MicroTurnWebSocket.resume(url, ws.session_id)
        return committed, resumed_at, reply

    committed, resumed_at, reply = run(go())
    assert resumed_at == committed  # the aborted turn rolled back
    assert reply["committed_length"] == committed + 2 + len(reply["output_ids"])


def test_resume_of_an_unknown_session_is_404(server):
    url, _ = server
    with pytest.raises(SessionNotFoundError):
        run(MicroTurnWebSocket.resume(url, "0" * 32))


@pytest.fixture
def keyed_server(monkeypatch):
    monkeypatch.setenv("MICROTURN_SESSION_KV_TOKENS", "100000")
    tm = FakeTokenizerManager()
    api = MicroTurnAPI(lambda: Backend(tm, max_total_num_tokens=100_000))
    app = FastAPI()
    mount(app, api, api_key_check("sekret"))
    with serve_on_loopback(app) as url:
        yield url, tm


def test_the_handshake_needs_the_api_key(keyed_server):
    url, tm = keyed_server
    for key in (None, "wrong"):
        with pytest.raises(UnauthorizedError):
            run(MicroTurnWebSocket.open(url, api_key=key))
    assert tm.lengths == {}

    async def go():
        async with await MicroTurnWebSocket.open(url, api_key="sekret", output_budget=1) as ws:
            return await ws.append([10])

    assert run(go())["committed_length"] == 2


def test_close_then_append_is_refused(server):
    url, tm = server
    events = run(_raw(url, json.dumps({"type": protocol.WS_SESSION_UPDATE}),
                      json.dumps({"type": protocol.WS_SESSION_CLOSE}),
                      json.dumps({"type": protocol.WS_INPUT_APPEND, "input_ids": [10]})))
    assert [e["type"] for e in events] == [protocol.WS_SESSION_CREATED, protocol.WS_SESSION_CLOSED, protocol.WS_ERROR]
    assert "before the connection has a session" in events[2]["error"]["message"]


def test_an_append_naming_a_session_is_refused(server):
    url, _ = server
    events = run(_raw(url, json.dumps({"type": protocol.WS_SESSION_UPDATE}),
                      json.dumps({"type": protocol.WS_INPUT_APPEND, "input_ids": [10], "session_id": "x"})))
    assert events[1]["error"]["code"] == 400 and "session_id" in events[1]["error"]["message"]


def test_payload_error_type_is_exported():
    assert PayloadTooLargeError.status == 413


def test_response_cancel_stops_the_running_turn_and_its_output_stays(server):
    """Barge-in over the WebSocket: response.cancel while a turn runs is acknowledged, and the turn's
    response.done follows with what it generated (finish_reason cancelled), committed."""
    url, tm = server
    tm.hold = threading.Event()  # never set: only the cancel ends the turn

    async def go():
        async with websockets.connect(ws_url(url)) as c:
            await c.send(json.dumps({"type": protocol.WS_SESSION_UPDATE, "session": {"output_budget": 8}}))
            created = json.loads(await c.recv())
            tm.running.clear()
            await c.send(json.dumps({"type": protocol.WS_INPUT_APPEND, "event_id": "a1", "input_ids": [10, 11]}))
            assert await asyncio.to_thread(tm.running.wait, 5)
            await c.send(json.dumps({"type": protocol.WS_RESPONSE_CANCEL, "event_id": "c1"}))
            events = {e["in_reply_to"]: e for e in [json.loads(await asyncio.wait_for(c.recv(), 5)) for _ in "ab"]}
            await c.send(json.dumps({"type": protocol.WS_RESPONSE_CANCEL, "event_id": "c2"}))
            events["c2"] = json.loads(await asyncio.wait_for(c.recv(), 5))
            return created["session"]["id"], events

    sid, events = run(go())
    assert events["c1"] == {"type": protocol.WS_RESPONSE_CANCELLED, "in_reply_to": "c1", "session_id": sid,
                            "cancelled": True}
    done = events["a1"]
    assert done["type"] == protocol.WS_RESPONSE_DONE and done["finish_reason"] == {"type": "cancelled"}
    assert done["committed_length"] == 2 + 1 == tm.lengths[sid] and not tm.aborted
    assert events["c2"]["cancelled"] is False  # nothing running any more


def test_the_client_cancels_while_its_append_waits(server):
    url, tm = server
    tm.hold = threading.Event()

    async def go():
        async with await MicroTurnWebSocket.open(url, output_budget=8) as ws:
            tm.running.clear()
            turn = asyncio.ensure_future(ws.append([10, 11]))
            assert await asyncio.to_thread(tm.running.wait, 5)
            cancelled = await ws.cancel()
            reply = await turn
            return cancelled, reply, await ws.cancel(), ws.committed_length

    cancelled, reply, again, length = run(go())
    assert cancelled and reply["finish_reason"] == {"type": "cancelled"} and len(reply["output_ids"]) == 1
    assert again is False and length == 3
