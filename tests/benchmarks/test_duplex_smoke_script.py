"""benchmarks/duplex_smoke.py on CPU against the real /microturn API and WebSocket in front of the stand-in
tokenizer manager (the `server` fixture): its checks pass where the features work and fail where they do not."""

import asyncio
import threading

import benchmarks.duplex_smoke as ds


def test_audio_turns_check_the_server_build(server):
    url, _ = server
    result = asyncio.run(ds.audio_turns(url, turns=4))
    assert all(result["checks"].values()), result["checks"]
    assert len(result["latency_ms"]) == 4


def test_cancel_turns_stop_and_keep_their_output(server):
    url, tm = server
    tm.hold = threading.Event()  # never set: every turn runs until its cancel
    result = asyncio.run(ds.cancel_turns(url, turns=3, budget=64, after_ms=20))
    assert all(result["checks"].values()), result["checks"]
    assert [r["finish"] for r in result["turns"]] == ["cancelled"] * 3


def test_a_cancel_that_stops_nothing_fails_the_check(server):
    url, tm = server  # no hold: each turn finishes before its cancel arrives
    result = asyncio.run(ds.cancel_turns(url, turns=2, budget=8, after_ms=50))
    assert not result["checks"]["some_turns_stopped_by_cancel"]
    assert result["checks"]["committed_sequence_is_the_replies"] and result["checks"]["other_turns_finished_whole"]
