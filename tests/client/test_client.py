"""The asyncio client against the real HTTP stack (uvicorn on loopback) over the stand-in tokenizer manager
(the `server` fixture of tests/conftest.py)."""

import asyncio

import pytest

from sglang_microturn.client import BadRequestError, MicroTurnClient, SessionGoneError, SessionNotFoundError


def test_stream_paces_on_the_clock_and_records_turns(server):
    url, tm = server

    async def run():
        client = MicroTurnClient(url)
        session = await client.open(output_budget=2, period_s=0.05)
        replies = [r async for r in session.stream([[5, 6], [7], [8, 9, 10]])]
        status = await session.status(tokens=True)
        await session.close()
        await client.close()
        return session, replies, status

    session, replies, status = asyncio.run(run())
    assert [r["committed_length"] for r in replies] == [4, 7, 12]
    assert [t.committed_length for t in session.turns] == [4, 7, 12]
    sends = [t.sent for t in session.turns]
    assert all(b - a >= 0.045 for a, b in zip(sends, sends[1:]))  # one slot per 50 ms period
    assert all(t.latency_ms > 0 and t.late_ms < 50 for t in session.turns)
    assert status["tokens"][:2] == [5, 6] and status["length"] == 12


def test_concurrent_appends_from_one_session_are_serialized(server):
    url, tm = server

    async def run():
        client = MicroTurnClient(url)
        session = await client.open(output_budget=1)
        replies = await asyncio.gather(*(session.append([5 + i]) for i in range(4)))  # never a 409
        await client.close()
        return sorted(r["committed_length"] for r in replies)

    assert asyncio.run(run()) == [2, 4, 6, 8]


def test_typed_errors(server):
    url, tm = server

    async def run():
        client = MicroTurnClient(url)
        session = await client.open()
        with pytest.raises(BadRequestError, match="outside the vocabulary"):
            await session.append([10**6])
        await session.close()
        with pytest.raises(SessionGoneError):
            await session.append([5])
        with pytest.raises(SessionNotFoundError):
            await _append_unknown(url)
        await client.close()

    asyncio.run(run())


async def _append_unknown(url):
    from sglang_microturn.client import MicroTurnSession

    async with MicroTurnClient(url) as client:
        await MicroTurnSession(client, "0" * 32).append([5])


def test_cancel_from_another_task_stops_the_running_append(server):
    import threading

    url, tm = server
    tm.hold = threading.Event()  # never set: only the cancel ends the turn

    async def run():
        async with MicroTurnClient(url) as client:
            session = await client.open(output_budget=8)
            tm.running.clear()
            turn = asyncio.ensure_future(session.append([10, 11]))
            assert await asyncio.to_thread(tm.running.wait, 5)
            cancelled = await session.cancel()
            reply = await turn
            return cancelled, reply, await session.cancel(), session.committed_length

    cancelled, reply, again, length = asyncio.run(run())
    assert cancelled and reply["finish_reason"] == {"type": "cancelled"} and len(reply["output_ids"]) == 1
    assert again is False and length == 3
