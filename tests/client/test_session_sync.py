"""The client stays in sync with the server's sequence through timeouts, cancellations and dropped
connections: a reply always belongs to the call that gets it, and a resent append applies at most once.

Over real HTTP: uvicorn on loopback in front of the /microturn API over the stand-in tokenizer manager (the
`server` fixture), with tests/rigs/dropping_proxy.py between client and server where connections must die.
The stand-in's outputs depend on the session length (output k of a turn = 7 * (length before the turn + k)
% 1000), so a reply of another turn cannot pass for this one's.
"""

import asyncio
import threading

import pytest
from dropping_proxy import DroppingProxy
from fake_sglang_http import serve_on_loopback
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from sglang_microturn.client import (
    ConnectionLostError,
    HTTPConnection,
    LengthMismatchError,
    MicroTurnClient,
    MicroTurnSession,
    ProtocolError,
    RequestTimeoutError,
)


def _outputs(length, n=2):
    """The stand-in's output for a turn appended to a session of `length` tokens."""
    return [(7 * (length + i)) % 1000 for i in range(n)]


# --- the transport: a late reply goes nowhere -------------------------------------------------------------

async def _echo(request):
    body = await request.json()
    await asyncio.sleep(body["delay"])
    return JSONResponse({"n": body["n"]})


@pytest.fixture(scope="module")
def echo():
    with serve_on_loopback(Starlette(routes=[Route("/echo", _echo, methods=["POST"])])) as url:
        yield url


def test_a_timed_out_request_never_hands_its_reply_to_the_next(echo):
    async def run():
        conn = HTTPConnection(echo, timeout_s=0.5)
        got = []
        try:
            for n in range(3):
                with pytest.raises(RequestTimeoutError, match="no response within 0.5 s"):
                    await conn.request("POST", "/echo", {"n": n, "delay": 0.8})
                got.append((await conn.request("POST", "/echo", {"n": 100 + n, "delay": 0}))["n"])
            await asyncio.sleep(0.5)  # every late reply is due by now
            got.append((await conn.request("POST", "/echo", {"n": 200, "delay": 0}))["n"])
        finally:
            await conn.close()
        return got

    assert asyncio.run(run()) == [100, 101, 102, 200]


def test_a_cancelled_request_never_hands_its_reply_to_the_next(echo):
    async def run():
        conn = HTTPConnection(echo, timeout_s=5)
        got = []
        try:
            for n in range(3):
                task = asyncio.ensure_future(conn.request("POST", "/echo", {"n": n, "delay": 0.2}))
                await asyncio.sleep(0.05)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                got.append((await conn.request("POST", "/echo", {"n": 100 + n, "delay": 0}))["n"])
            await asyncio.sleep(0.3)
            got.append((await conn.request("POST", "/echo", {"n": 200, "delay": 0}))["n"])
        finally:
            await conn.close()
        return got

    assert asyncio.run(run()) == [100, 101, 102, 200]


# --- the session: timeouts and cancellation mid-append ---------------------------------------------------

async def _interrupt(how: str, session: MicroTurnSession, ids):
    if how == "timeout":
        with pytest.raises(RequestTimeoutError):
            await session.append(ids)
    else:
        task = asyncio.ensure_future(session.append(ids))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("how", ["timeout", "cancel"])
@pytest.mark.parametrize("late_commit", [False, True], ids=["rolled-back", "committed-late"])
def test_an_interrupted_append_leaves_the_next_append_its_own_reply(server, how, late_commit):
    """rolled-back: the server sees the disconnect and aborts the turn (patch 0003). committed-late: the turn
    finished before the abort reached it, so it commits and its reply goes to a closed connection."""
    url, tm = server
    if late_commit:
        tm.abort_request = lambda rid: None

    async def run():
        async with MicroTurnClient(url) as patient, MicroTurnClient(url, timeout_s=1.0) as client:
            opened = await patient.open(output_budget=2)  # the first call of a test server can be slow
            session = MicroTurnSession(client, opened.session_id, committed_length=0)
            await session.append([5])  # length 3
            tm.hold = threading.Event()  # the next turn runs until released
            await _interrupt(how, session, [6, 7])
            for _ in range(500):  # rolled-back: the server saw the disconnect before the turn could finish
                if late_commit or tm.aborted:
                    break
                await asyncio.sleep(0.01)
            tm.hold.set()
            reply = await session.append([8])
            after = await session.append([9])
            state = await session.status(tokens=True)
        return session, reply, after, state

    session, reply, after, state = asyncio.run(run())
    tokens = state["tokens"]
    if late_commit:
        assert tokens[3:7] == [6, 7, *_outputs(3)]  # the interrupted turn, once
        assert [t.input_ids for t in session.turns] == [[5], [6, 7], [8], [9]]
        assert [t.recovered for t in session.turns] == [False, True, False, False]
        assert session.turns[1].output_ids == _outputs(3)
    else:
        assert [t.input_ids for t in session.turns] == [[5], [8], [9]]
    start = len(tokens) - 6  # [8] and [9] are the last two turns
    assert tokens[start:] == [8, *_outputs(start), 9, *_outputs(start + 3)]
    assert reply["output_ids"] == _outputs(start) and reply["committed_length"] == start + 3
    assert after["output_ids"] == _outputs(start + 3) and after["committed_length"] == len(tokens)
    assert session.committed_length == len(tokens)


# --- dropped connections: resent with the same expected_length, applied once -----------------------------

def _port(url):
    return int(url.rsplit(":", 1)[1])


def _dropping(mode: str, target):
    """A plan for DroppingProxy: drop the first append of `target` with `mode`; relay everything else."""
    left = [1]

    def plan(method, path, body):
        if path == "/microturn/append" and body["input_ids"] == target and left:
            left.pop()
            return mode
        return "relay"

    return plan


@pytest.mark.parametrize("mode", ["drop_after_reply", "drop_before_reply", "drop_request", "late_request"])
def test_an_append_after_a_dropped_connection_applies_once(server, mode):
    """The session looks before it resends: drop_after_reply, the turn committed and its reply was lost, so
    the session reads the turn back and sends no copy; drop_request, the copy never arrived, so it resends
    (same expected_length); late_request, the first copy reaches the server after the resend committed and
    meets 412; drop_before_reply, the server commits or rolls back the first copy (a race), either way once."""
    url, tm = server
    plan = _dropping(mode, [6, 7])

    async def run():
        proxy = DroppingProxy(_port(url), plan)
        async with proxy as proxy_url, MicroTurnClient(proxy_url) as client:
            session = await client.open(output_budget=2)
            await session.append([5])
            reply = await session.append([6, 7])
            await proxy.settled()
            after = await session.append([8])
            state = await session.status(tokens=True)
        return proxy, session, reply, after, state

    proxy, session, reply, after, state = asyncio.run(run())
    assert proxy.dropped == 1
    assert state["tokens"] == [5, *_outputs(0), 6, 7, *_outputs(3), 8, *_outputs(7)]  # [6, 7] once
    assert reply["output_ids"] == _outputs(3) and reply["committed_length"] == 7
    assert after["committed_length"] == 10 and after["output_ids"] == _outputs(7)
    appends = [body for method, path, body in proxy.requests if path == "/microturn/append"]
    assert all("expected_length" in body for body in appends)  # every append, first sends and resends
    copies = [body["expected_length"] for body in appends if body["input_ids"] == [6, 7]]
    assert set(copies) == {3}
    assert [body["expected_length"] for body in appends if body["input_ids"] != [6, 7]] == [0, 7]
    if mode == "drop_after_reply":
        assert len(copies) == 1 and reply["recovered"] and session.turns[1].recovered
    if mode in ("drop_request", "late_request"):
        assert len(copies) == 2 and not session.turns[1].recovered
    if mode == "late_request":
        assert proxy.late_statuses == [412]  # the stuck copy could not apply on top of the resend


def test_a_connection_lost_for_good_is_resolved_by_the_next_append(server):
    """Every send of the append and every read of the session is dropped: the append raises
    ConnectionLostError. The turn had committed; the next append (network back) reads it back first."""
    url, tm = server
    down = {"on": False}

    def plan(method, path, body):
        if down["on"] and (method == "GET" or (body or {}).get("input_ids") == [6, 7]):
            return "drop_after_reply"
        return "relay"

    async def run():
        proxy = DroppingProxy(_port(url), plan)
        async with proxy as proxy_url, MicroTurnClient(proxy_url) as client:
            session = await client.open(output_budget=2)
            await session.append([5])
            down["on"] = True
            with pytest.raises(ConnectionLostError):
                await session.append([6, 7])
            down["on"] = False
            reply = await session.append([8])
            state = await session.status(tokens=True)
        return session, reply, state

    session, reply, state = asyncio.run(run())
    assert state["tokens"] == [5, *_outputs(0), 6, 7, *_outputs(3), 8, *_outputs(7)]
    assert [(t.input_ids, t.recovered) for t in session.turns] == [([5], False), ([6, 7], True), ([8], False)]
    assert reply["output_ids"] == _outputs(7) and reply["committed_length"] == 10


# --- other writers and replies that do not follow ---------------------------------------------------------

def test_another_writer_gives_length_mismatch_with_both_lengths_then_the_session_adopts(server):
    url, tm = server

    async def run():
        async with MicroTurnClient(url) as client:
            session = await client.open(output_budget=2)
            await session.append([5])
            other = MicroTurnSession(client, session.session_id)  # a second writer; reads the length first
            await other.append([6])
            with pytest.raises(LengthMismatchError) as info:
                await session.append([7])
            reply = await session.append([7])
        return info.value, reply

    error, reply = asyncio.run(run())
    assert (error.status, error.expected_length, error.committed_length) == (412, 3, 6)
    assert reply["committed_length"] == 9 and reply["output_ids"] == _outputs(6)


def test_a_reply_that_does_not_follow_from_the_append_is_refused():
    """A server (or anything between) answering with another turn's reply: ProtocolError, never accepted."""
    replies = iter([
        {"session_id": "s1", "output_ids": [1, 2], "committed_length": 99, "timestamps": {}},  # wrong length
        {"session_id": "s2", "output_ids": [1, 2], "committed_length": 3, "timestamps": {}},  # another session
    ])

    async def append(request):
        return JSONResponse(next(replies))

    async def state(request):
        return JSONResponse({"session_id": "s1", "length": 0, "in_flight": False, "tokens": []})

    app = Starlette(routes=[Route("/microturn/append", append, methods=["POST"]),
                            Route("/microturn/sessions/s1", state)])

    async def run(url):
        async with MicroTurnClient(url) as client:
            session = MicroTurnSession(client, "s1", committed_length=0)
            with pytest.raises(ProtocolError, match="committed_length 99 != 3"):
                await session.append([5])
            with pytest.raises(ProtocolError, match="reply of session s2"):
                await session.append([5])  # re-reads the session first (length 0), then refuses
        return session

    with serve_on_loopback(app) as url:
        session = asyncio.run(run(url))
    assert session.turns == []
