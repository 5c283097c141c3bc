"""Sessions through the real SGLang Model Gateway (smg, as `sglang-microturn cluster` runs it) in front of
stand-in workers in their own processes (tests/rigs/gateway_rig.py): the client needs nothing but the
gateway's URL, every call of a session reaches the worker its open reached (a busy worker's too), a worker's
loss turns its sessions into 410s and leaves the others untouched, and a full worker's refusal sends the open
elsewhere."""

import asyncio
import collections
import json
import urllib.request

import pytest

from gateway_rig import gateway_with_standins, healthy_workers, wait_until

from sglang_microturn.client import MicroTurnClient
from sglang_microturn.client.errors import SessionGoneError


def run(coro):
    return asyncio.run(coro)


def test_thousands_of_sessions_each_stay_on_the_worker_that_opened_it(tmp_path):
    async def drive(url):
        async with MicroTurnClient(url) as client:
            async def one(k):
                session = await client.open(output_budget=1)
                await session.append([100 + k % 500, 7])
                await session.append([8])  # would be a 410 on any worker but its own
                return session

            sessions = []
            for start in range(0, 2000, 20):  # 20 at a time: the 2-core CI machine answers health probes
                sessions += await asyncio.gather(*(one(k) for k in range(start, start + 20)))
            assert client.via_gateway  # found out from the gateway's 404 of /microturn/open, by itself
            state = await sessions[0].status(tokens=True)
            return collections.Counter(s.session_id[:8] for s in sessions), state, len(sessions)

    with gateway_with_standins(tmp_path, [None, None]) as (url, _):
        per_worker, state, n = run(drive(url))
    assert n == 2000 and len(per_worker) == 2 and min(per_worker.values()) > 600, per_worker
    assert state["length"] == 5


def test_a_lost_worker_turns_its_sessions_into_410_and_leaves_the_others(tmp_path):
    with gateway_with_standins(tmp_path, [None, None]) as (url, workers):
        victim = workers[0]

        async def scenario():
            async with MicroTurnClient(url) as client, MicroTurnClient(victim.url) as direct:
                sessions = [await client.open(output_budget=1) for _ in range(16)]
                for s in sessions:
                    await s.append([5, 6])
                on_victim = [s for s in sessions if await _served_by(direct, s)]
                others = [s for s in sessions if s not in on_victim]
                assert on_victim and others
                victim._stop()  # the worker's process dies
                wait_until(lambda: victim.url not in healthy_workers(url), 10, "the gateway drops the worker")
                for s in on_victim:
                    with pytest.raises(SessionGoneError, match="another server instance"):
                        await s.append([9])
                for s in others:
                    before = s.committed_length
                    assert (await s.append([9]))["committed_length"] == before + 2
                fresh = [await client.open(output_budget=1) for _ in range(6)]
                assert {s.session_id[:8] for s in fresh} == {others[0].session_id[:8]}
                for s in fresh:
                    await s.append([1])

        run(scenario())


async def _served_by(direct: MicroTurnClient, session) -> bool:
    """Whether the worker behind `direct` holds `session` (its own registry answers its status)."""
    try:
        await direct.call("status", {"session_id": session.session_id})
        return True
    except SessionGoneError:
        return False


def test_an_open_refused_by_a_full_worker_goes_to_another(tmp_path):
    # rows 2 -> a cap of one session on the first worker; the second has no cap
    async def scenario(url):
        async with MicroTurnClient(url) as client:
            sessions = [await client.open(output_budget=1) for _ in range(12)]
            for s in sessions:
                await s.append([5])
            return collections.Counter(s.session_id[:8] for s in sessions)

    with gateway_with_standins(tmp_path, [2, None]) as (url, _):
        per_worker = run(scenario(url))
    assert sum(per_worker.values()) == 12 and min(per_worker.values()) <= 1 < max(per_worker.values())


def _standin(worker, route: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(worker.url + route, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)


def _standin_load(worker, waiting: int | None = None) -> dict:
    """The stand-in's reported load (and how often the gateway polled it); with `waiting`, set it first."""
    return _standin(worker, "/standin/load", None if waiting is None else {"waiting": waiting})


async def _open_across(client, direct, n: int) -> tuple[list, list]:
    """`n` sessions opened through the gateway, one append each; returns (all, those on the worker behind
    `direct`), with sessions on both workers."""
    sessions = [await client.open(output_budget=1) for _ in range(n)]
    for s in sessions:
        await s.append([5])
    on_direct = [s for s in sessions if await _served_by(direct, s)]
    assert 0 < len(on_direct) < n, len(on_direct)
    return sessions, on_direct


def test_a_busy_worker_keeps_its_sessions(tmp_path):
    # Seen on an H200 (two workers, 384 sessions): the gateway's overload protection (on by default in smg 1.13)
    # left a worker with 8 waiting requests out of routing, so its sessions' appends reached the other worker
    # and answered 410. A queue is no reason to lose a session: `cluster` switches that protection off.
    async def scenario(url, workers):
        async with MicroTurnClient(url) as client, MicroTurnClient(workers[1].url) as direct:
            sessions, busy = await _open_across(client, direct, 12)
            polls = _standin_load(workers[1], waiting=64)["polls"]
            wait_until(lambda: _standin_load(workers[1])["polls"] >= polls + 2, 10, "the gateway polls the load")
            for s in sessions:
                before = s.committed_length
                assert (await s.append([9]))["committed_length"] == before + 2
            assert all([await _served_by(direct, s) for s in busy])

    # a poll a second instead of every 10 s: the test waits for two of them
    with gateway_with_standins(tmp_path, [None, None], ("--load-monitor-interval", "1")) as (url, workers):
        run(scenario(url, workers))


def test_a_stalled_worker_keeps_its_sessions(tmp_path):
    async def scenario(url, workers):
        async with MicroTurnClient(url) as client, MicroTurnClient(workers[1].url) as direct:
            _, stalled = await _open_across(client, direct, 24)
            assert len(stalled) >= 6, len(stalled)  # more in flight than smg's wedge rule counts (4 deep)
            _standin(workers[1], "/standin/hold", {"on": True})
            pending = [asyncio.create_task(s.append([6])) for s in stalled[:-1]]
            await asyncio.sleep(6)  # twice smg's default --worker-wedge-secs: no token, no completion
            late = asyncio.create_task(stalled[-1].append([6]))
            await asyncio.sleep(1)
            _standin(workers[1], "/standin/hold", {"on": False})
            for reply in await asyncio.gather(*pending, late):
                assert reply["committed_length"] == 4

    with gateway_with_standins(tmp_path, [None, None], ("--load-monitor-interval", "1")) as (url, workers):
        run(scenario(url, workers))
