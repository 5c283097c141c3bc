"""benchmarks/realtime_capacity.py on CPU: the capacity rule, miss and latency accounting (a turn queued behind
a late one included), the open-loop pacer's schedule, the GPU sampler, an end-to-end run of both
protocols against a stand-in server that refuses opens past a capacity and turns slow past a load, and ours over
WS /microturn/ws (--transport ws) against the real /microturn API in front of the stand-in tokenizer manager
(the `server` fixture)."""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from aiohttp import web

import benchmarks.realtime_capacity as rc
from sglang_microturn.server import stall_log
REPO = Path(__file__).resolve().parents[2]
VOCAB = rc.model_spec("small").vocab_size
WORKLOAD = rc.Workload(period_s=0.2, chunk=98, speak_tokens=16, listen_tokens=1, speak_share=0.3, vocab=VOCAB)


def turn(session, k, due, done, sent="at due", status=200, budget=1, output_len=1, sglang_s=None):
    return rc.TurnRecord(session, k, budget, due, due if sent == "at due" else sent, done, status, output_len,
                         sglang_s)


def level(sessions, p99_ms, miss_rate, admitted=None, errors=0, turns=100):
    stats = rc.TurnStats(turns=turns, missed=round(miss_rate * turns), miss_rate=miss_rate, p50_ms=10.0,
                         p90_ms=20.0, p99_ms=p99_ms, max_ms=p99_ms, mean_lateness_ms=None, max_lateness_ms=None,
                         unsent_turns=0, turn_errors=errors, turns_per_s=5.0 * sessions, output_tokens=0,
                         short_outputs=0)
    return rc.LevelRecord(**vars(stats), server="ours", transport="http", sessions=sessions,
                          admitted_sessions=sessions if admitted is None else admitted,
                          refused_opens=0 if admitted is None else sessions - admitted, errors=errors, seconds=15,
                          warmup_s=2, server_misses=None, server_turns=None, compiles=None, gc_pauses=None,
                          stalls=None, gpu_busy_ratio=None)


# ------------------------------------------------------------------------------------------ units


def test_capacity_is_the_largest_level_with_every_smaller_level_passing():
    levels = [level(32, 160.0, 0.0), level(1, 20.0, 0.0), level(16, 149.9, 0.0009), level(64, 100.0, 0.0)]
    assert rc.capacity(levels) == 16  # 32 fails on p99, so 64 passing (noise) does not count
    assert rc.capacity([level(1, 20.0, 0.001)]) == 0  # 0.1 % is not < 0.1 %
    assert rc.capacity([level(1, 20.0, 0.0), level(16, 150.0, 0.0)]) == 1  # 150 ms is not < 150 ms
    assert rc.capacity([level(1, 20.0, 0.0), level(16, 20.0, 0.0, admitted=15)]) == 1  # a refused open fails it
    assert rc.capacity([level(1, 20.0, 0.0), level(16, 20.0, 0.0, errors=1)]) == 1
    assert rc.capacity([level(1, 20.0, 0.0, turns=0)]) == 0  # nothing measured is not a pass
    assert rc.capacity([]) == 0


def test_small_levels_run_long_enough_to_count_min_turns():
    args = rc.parse_args(["--seconds", "8", "--warmup-s", "2", "--min-turns", "150"])
    assert rc.level_seconds(args, 1) == 2 + 150 * 0.2  # one session: 30 s of counted turns
    assert rc.level_seconds(args, 32) == 8  # 32 sessions count 150 turns well within --seconds
    assert rc.level_seconds(rc.parse_args(["--seconds", "8", "--min-turns", "0"]), 1) == 8


def test_a_turn_queued_behind_a_late_one_is_late_from_its_own_due_time():
    period = 0.2
    turns = [
        turn(0, 0, due=10.0, done=10.05),  # warm-up (turn 0 < 0.2 s): not counted
        turn(0, 1, due=10.2, done=10.25),  # 50 ms
        turn(0, 2, due=10.4, done=10.85),  # 450 ms: missed, 250 ms late
        turn(0, 3, due=10.6, sent=10.85, done=10.90),  # a 50 ms round trip queued behind turn 2: 300 ms, missed
        turn(0, 4, due=10.8, sent=10.90, done=10.95),  # 150 ms: caught up
        turn(0, 5, due=11.0, done=11.2),  # exactly one period: not missed
        turn(0, 6, due=11.2, done=11.21, status=500),  # failed: missed, no latency
        turn(1, 2, due=10.4, sent=None, done=12.4, status=0, budget=0, output_len=0),  # unsent at the cutoff
        turn(1, 3, due=10.6, done=10.61, budget=16, output_len=16, sglang_s=0.004),
        turn(1, 4, due=10.8, done=10.81, budget=16, output_len=3, sglang_s=0.006),  # short output
    ]
    s = rc.turn_stats(turns, period, warmup_s=0.2, seconds=2.2)
    assert s.turns == 9 and s.missed == 4 and s.miss_rate == round(4 / 9, 5)
    assert s.unsent_turns == 1 and s.turn_errors == 1
    # latencies of the answered and unsent turns: 50, 450, 300, 150, 200, 2000 (lower bound), 10, 10
    assert s.max_ms == 2000.0 and s.p50_ms == 150.0 and s.p99_ms == 2000.0
    assert s.max_lateness_ms == 1800.0 and s.mean_lateness_ms == pytest.approx((250 + 100 + 1800) / 3, abs=0.01)
    assert s.output_tokens == 1 * 5 + 16 + 3 and s.short_outputs == 1
    assert s.turns_per_s == round(7 / 2.0, 1)
    # listening (budget 1): 50, 450, 300, 150, 200 -> 200; the unsent budget-0 turn; speaking: 10, 10
    assert s.p50_by_budget_ms == {"0": 2000.0, "1": 200.0, "16": 10.0}
    assert s.p50_sglang_ms == 4.0  # over the answered turns that report SGLang's own time


def test_turns_due_cover_the_level_and_no_more():
    assert rc.turns_due(0.0, 1.0, 0.1) == 10  # due 0.0 .. 0.9
    assert rc.turns_due(0.05, 1.0, 0.1) == 10  # due 0.05 .. 0.95
    assert rc.turns_due(0.0999, 0.1, 0.1) == 1
    assert rc.turns_due(0.3, 0.2, 0.1) == 0


def test_turn_plan_draws_in_vocab_ids_and_speaks_at_the_share():
    import random

    rng = random.Random("0:16:3")
    plans = [rc.plan_turn(rng, WORKLOAD) for _ in range(4000)]
    assert all(len(ids) == 98 and min(ids) >= rc.FIRST_INPUT_ID and max(ids) < VOCAB for ids, _ in plans)
    budgets = [b for _, b in plans]
    assert set(budgets) == {1, 16} and 0.27 < budgets.count(16) / len(budgets) < 0.33
    again = random.Random("0:16:3")
    assert [rc.plan_turn(again, WORKLOAD) for _ in range(5)] == plans[:5]  # same key, same turns (both servers)


def test_pacer_sends_on_the_open_loop_schedule_and_right_after_a_late_turn():
    period, calls = 0.05, []

    async def run():
        async def send():
            k = len(calls)
            calls.append([time.monotonic(), None])
            await asyncio.sleep(0.12 if k == 2 else 0.002)  # turn 2 overruns by more than two periods
            calls[-1][1] = time.monotonic()
            return 1, 200, 1, None

        first = time.monotonic() + 0.05
        return first, await rc.pace(send, first, 9, period, first + 10, session=7, to_unix=1000.0)

    first, records = asyncio.run(run())
    assert [r.turn for r in records] == list(range(9)) and {r.session for r in records} == {7}
    assert [r.due for r in records] == [first + k * period + 1000.0 for k in range(9)]
    assert all(r.sent >= r.due for r in records)  # never early
    assert all(calls[k][0] >= calls[k - 1][1] for k in range(1, 9))  # one in flight at a time
    done_2 = calls[2][1] + 1000.0
    assert records[3].sent - done_2 < 0.01 and records[3].sent - records[3].due > 0.05  # sent when 2 returned
    for k in (0, 1, 2, 6, 7, 8):  # on time before the overrun and once caught up: the schedule did not shift
        assert records[k].sent - records[k].due < 0.03, k


def test_pacer_records_turns_still_unsent_at_the_cutoff():
    async def run():
        async def send():
            await asyncio.sleep(0.3)
            return 16, 200, 16, None

        first = time.monotonic()
        return first, await rc.pace(send, first, 4, 0.05, first + 0.2, session=0, to_unix=0.0)

    first, records = asyncio.run(run())
    assert records[0].ok and not records[0].unsent
    assert [r.unsent for r in records[1:]] == [True] * 3
    assert all(r.done == first + 0.2 and r.missed(0.05) for r in records[1:])  # latency: a lower bound


def test_gpu_busy_ratio_is_the_mean_of_nvidia_smi_samples(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/bash\nwhile true; do printf '25\\n[N/A]\\n75\\n'; sleep 0.05; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    now = time.time()
    assert rc.gpu_busy_ratio(now, now + 0.5) == pytest.approx(0.5, abs=0.05)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    now = time.time()
    assert rc.gpu_busy_ratio(now, now + 0.05) is None


def test_upstream_runs_on_pristine_sglang_and_exactly_the_reverted_patches_come_back(tmp_path):
    # A private copy of the files our patches touch: the real install is what concurrent tests run on.
    from sglang_microturn.patchset import patching
    installed, patches = patching.installed_sglang(), patching.load_patches()
    copy = patching.PatchTarget(tmp_path, installed.version)
    for rel in {fp.path for p in patches for fp in p.files}:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(patching.pristine_source(rel, installed, patches))
    for patch in patches[:-1]:  # the last one stays off: it must still be off afterwards
        patching.apply(patch, copy)
    files = sorted(tmp_path.rglob("*.py"))
    before = {f: f.read_bytes() for f in files}
    states = rc.patch_states(copy, patches)
    assert list(states.values()) == ["applied"] * (len(patches) - 1) + ["not applied"]
    with rc.pristine_sglang(copy, patches):
        assert set(rc.patch_states(copy, patches).values()) == {"not applied"}
        assert all(f.read_text() == patching.pristine_source(str(f.relative_to(tmp_path)), copy, patches)
                   for f in files)
    assert rc.patch_states(copy, patches) == states and {f: f.read_bytes() for f in files} == before
    with pytest.raises(KeyboardInterrupt), rc.pristine_sglang(copy, patches):
        raise KeyboardInterrupt  # an interrupted level still puts the patches back
    assert rc.patch_states(copy, patches) == states


# ------------------------------------------------------------------------------------------ stand-in server


class StandIn:
    """/microturn/* and SGLang's streaming-session endpoints in one aiohttp app on a thread. Opens of ours
    past `open_capacity` get 429 + Retry-After; while more than `slow_above` sessions are open, every turn takes
    `slow_s`, else `fast_s`. Requests are checked as the real servers would (and stricter): a bad one gets a 4xx,
    which the benchmark counts as an error. Each ours session's first append logs a GC stall line."""

    def __init__(self, stall_log_path: Path, open_capacity=3, slow_above=2, fast_s=0.002, slow_s=0.25):
        self.stall_log_path, self.open_capacity, self.slow_above = stall_log_path, open_capacity, slow_above
        self.fast_s, self.slow_s = fast_s, slow_s
        self.sessions: dict[str, dict] = {}
        self.bad_requests: list[str] = []

    def _open_count(self, kind=None):
        return sum(s["open"] and kind in (None, s["kind"]) for s in self.sessions.values())

    def _bad(self, status, message):
        self.bad_requests.append(message)
        return web.json_response({"error": {"code": status, "message": message}}, status=status)

    async def _turn(self, session, input_ids, budget):
        if session["in_flight"]:
            return self._bad(409, "an append is already in flight")
        if len(input_ids) != 98 or not all(rc.FIRST_INPUT_ID <= i < VOCAB for i in input_ids) or budget not in (1, 16):
            return self._bad(400, f"bad turn: {len(input_ids)} ids, budget {budget}")
        session["in_flight"] = True
        delay = self.slow_s if self._open_count() > self.slow_above else self.fast_s
        await asyncio.sleep(delay)
        session["in_flight"] = False
        session["length"] += len(input_ids) + budget
        session["turns"] += 1
        session["misses"] += delay * 1e3 > session.get("deadline_ms", 1e9)
        return [5] * budget

    async def open_ours(self, request):
        body = await request.json()
        if body.get("ignore_eos") is not True or not isinstance(body.get("deadline_ms"), int):
            return self._bad(400, f"bad open {body}")
        if self._open_count("ours") >= self.open_capacity:
            return web.json_response({"error": {"code": 429, "message": "at capacity"}}, status=429,
                                     headers={"Retry-After": "1"})
        sid = uuid.uuid4().hex
        self.sessions[sid] = {"kind": "ours", "open": True, "in_flight": False, "length": 0, "turns": 0, "misses": 0,
                              "deadline_ms": body["deadline_ms"]}
        return web.json_response({"session_id": sid, "kv_budget_free": 1000})

    async def append(self, request):
        body = await request.json()
        session = self.sessions.get(body.get("session_id"))
        if session is None or not session["open"]:
            return self._bad(404, "unknown session")
        if body.get("expected_length") != session["length"]:
            return self._bad(412, f"expected_length {body.get('expected_length')} != {session['length']}")
        if session["turns"] == 0:
            with open(self.stall_log_path, "a") as f:
                f.write(stall_log.format_line(stall_log.Stall("gc", "gen2", 30, time.time(), os.getpid())) + "\n")
        out = await self._turn(session, body["input_ids"], body["output_budget"])
        if isinstance(out, web.Response):
            return out
        return web.json_response({"output_ids": out, "committed_length": session["length"],
                                  "server_length": session["length"], "sglang_latency_s": 0.003})

    async def status(self, request):
        session = self.sessions[request.match_info["sid"]]
        return web.json_response({"length": session["length"],
                                  "deadline": {"misses": session["misses"], "turns": session["turns"]}})

    async def close_ours(self, request):
        self.sessions[(await request.json())["session_id"]]["open"] = False
        return web.json_response({"state": "closed"})

    async def open_upstream(self, request):
        body = await request.json()
        if body != {"capacity_of_str_len": 0, "streaming": True}:
            return self._bad(400, f"bad open_session {body}")
        sid = uuid.uuid4().hex
        self.sessions[sid] = {"kind": "upstream", "open": True, "in_flight": False, "length": 0, "turns": 0,
                              "misses": 0}
        return web.json_response(sid)

    async def generate(self, request):
        body = await request.json()
        session = self.sessions.get(body.get("session_params", {}).get("id"))
        params = body.get("sampling_params", {})
        if session is None or params.get("temperature") != 0 or params.get("ignore_eos") is not True:
            return self._bad(400, f"bad generate {params}")
        out = await self._turn(session, body["input_ids"], params["max_new_tokens"])
        if isinstance(out, web.Response):
            return out
        return web.json_response({"output_ids": out, "meta_info": {"completion_tokens": len(out),
                                                                   "e2e_latency": 0.005}})

    async def close_upstream(self, request):
        self.sessions[(await request.json())["session_id"]]["open"] = False
        return web.json_response(None)

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.post("/microturn/open", self.open_ours), web.post("/microturn/append", self.append),
                        web.get("/microturn/sessions/{sid}", self.status), web.post("/microturn/close", self.close_ours),
                        web.post("/open_session", self.open_upstream), web.post("/generate", self.generate),
                        web.post("/close_session", self.close_upstream)])
        return app


@pytest.fixture
def stand_in(tmp_path):
    (tmp_path / "server.log").write_text("[stand-in] up\n")  # a server's log exists from its start
    server = StandIn(tmp_path / "server.log")
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(server.app())
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield server
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.run_until_complete(runner.cleanup())
    loop.close()


def run_script(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "benchmarks.realtime_capacity", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------------------ end to end


def test_both_servers_end_to_end_against_the_stand_in(stand_in, tmp_path):
    out = tmp_path / "result.json"
    proc = run_script("--url-ours", stand_in.url, "--url-upstream", stand_in.url,
                      "--server-log-ours", str(stand_in.stall_log_path), "--server-pid-ours", str(os.getpid()),
                      "--levels", "4,1,8", "--seconds", "1",
                      "--warmup-s", "0.2", "--period-ms", "100", "--client-procs", "2", "--fresh-sessions", "2",
                      "--fresh-seconds", "0.5", "--drain-s", "0.3", "--min-turns", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert stand_in.bad_requests == []
    result = json.loads(out.read_text())
    assert {"card", "git_commit", "command", "capacity_sessions", "levels", "fresh", "workload",
            "capacity_rule"} <= result.keys()
    assert result["capacity_sessions"] == {"ours": 1, "upstream": 1}
    levels = {(lv["server"], lv["sessions"]): lv for lv in result["levels"]}
    assert list(levels) == [("ours", 1), ("ours", 4), ("upstream", 1), ("upstream", 4)]  # 8: escalation stopped
    assert all(lv["errors"] == 0 and lv["short_outputs"] == 0 for lv in result["levels"])
    assert result["transport"] == "http" and {lv["transport"] for lv in result["levels"]} == {"http"}

    one, four = levels["ours", 1], levels["ours", 4]
    assert one["turns"] == 8 and one["miss_rate"] == 0 and one["passes"]  # 10 turns due, first 2 are warm-up
    assert (four["admitted_sessions"], four["refused_opens"], four["turns"]) == (3, 1, 24)
    assert four["miss_rate"] > 0.2 and four["p99_ms"] > 100 and not four["passes"]
    assert (one["server_misses"], four["server_misses"] == four["server_turns"] > 0) == (0, True)
    assert one["server_turns"] == 10  # the server counts the warm-up turns too
    assert (one["gc_pauses"], four["gc_pauses"], one["compiles"]) == (1, 3, 0)  # each session's first append
    # --server-pid-ours is this test's process: its tree (the stand-in, and the benchmark run below it with its
    # client processes) is read; /proc counts in clock ticks, so one process alone may read 0 over a short level
    cpu = one["server_cpu_ms_per_turn"]
    assert "http" in cpu and min(cpu.values()) >= 0 and sum(cpu.values()) > 0
    assert set(one["p50_by_budget_ms"]) <= {"1", "16"}
    assert one["p50_sglang_ms"] == 3.0 and levels["upstream", 1]["p50_sglang_ms"] == 5.0  # each API's field
    up = levels["upstream", 4]
    assert (up["admitted_sessions"], up["refused_opens"], up["server_misses"], up["gc_pauses"]) == (4, 0, None, None)
    assert up["server_cpu_ms_per_turn"] is None  # given by URL without a pid
    assert up["miss_rate"] > 0.2

    assert set(result["fresh"]) == {"ours", "upstream"}
    for fresh in result["fresh"].values():
        assert (fresh["sessions"], fresh["warmup_s"], fresh["turns"]) == (2, 0.0, 10)  # nothing excluded
        assert fresh["miss_rate"] == 0
    assert result["workload"]["levels"] == [1, 4, 8] and result["workload"]["chunk"] == 98
    png = out.with_suffix(".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in proc.stdout and not png.exists()
    else:
        assert png.stat().st_size > 0


class ShardConn:
    """The parent's end of a client process's pipe, for run_shard in this process: takes "ready", gives the start."""

    def __init__(self, lead_s=0.2):
        self.sent, self.lead_s = [], lead_s

    def send(self, message):
        self.sent.append(message)

    def recv(self):
        return time.time() + self.lead_s


def test_ws_transport_runs_a_shard_over_one_websocket_per_session(server, monkeypatch):
    from fake_sglang_http import VOCAB as FAKE_VOCAB

    url, tm = server
    monkeypatch.setenv("MICROTURN_MAX_SESSIONS", "2")  # read when the API's registry is made: on the first call
    http_calls = []
    real_call = rc.call

    async def spy(http, method, url, body=None, headers=None):
        http_calls.append((method, url.removeprefix(server[0])))
        return await real_call(http, method, url, body, headers)

    monkeypatch.setattr(rc, "call", spy)
    workload = rc.Workload(period_s=0.1, chunk=98, speak_tokens=16, listen_tokens=1, speak_share=0.3,
                           vocab=FAKE_VOCAB)
    plans = [rc.SessionPlan(i, 0.03 * i) for i in range(3)]
    job = rc.ShardJob("ours", url, "0:ws", plans, seconds=0.6, drain_s=0.3, workload=workload, transport="ws")
    assert rc.session_type("ours", "ws") is rc.OursWsSession and rc.session_type("ours", "http") is rc.OursSession
    assert rc.session_type("upstream", "ws") is rc.UpstreamSession  # upstream has no WebSocket
    conn = ShardConn()
    result = asyncio.run(rc.run_shard(job, conn))

    assert conn.sent == [("ready", 2)]
    assert (result.opened, result.refused, result.open_errors) == (2, 1, 0)  # the third open: an error event, 429
    assert len(result.turns) == 2 * 6 and {t.session for t in result.turns} == {0, 1}  # 6 due in 0.6 s each
    assert all(t.ok and t.status == 200 and t.output_len == t.budget for t in result.turns)
    assert all(t.sglang_s == 0.002 for t in result.turns)  # SGLang's own time, through the WS reply
    assert {t.budget for t in result.turns} <= {1, 16}
    assert result.server_counts is not None and result.server_counts[1] == 12  # the server counted every turn
    # Over HTTP only the deadline counts (one status call per session); opens, appends and closes went over WS.
    assert sorted(m for m, _ in http_calls) == ["GET", "GET"]
    assert all(path.startswith("/microturn/sessions/") for _, path in http_calls)
    committed = sorted(sum(98 + t.budget for t in result.turns if t.session == s) for s in (0, 1))
    assert sorted(tm.closed_lengths) == committed  # both closed, each at the length its appends committed


def test_both_transports_in_one_run_on_one_server(server, tmp_path):
    url, tm = server
    out = tmp_path / "ws.json"
    proc = run_script("--transport", "http,ws", "--url-ours", url, "--servers", "ours", "--levels", "1,3",
                      "--seconds", "0.6", "--warmup-s", "0.2", "--period-ms", "100", "--client-procs", "2",
                      "--fresh-sessions", "2", "--fresh-seconds", "0.4", "--drain-s", "0.3", "--min-turns", "0",
                      "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["transport"] == "http,ws" and result["workload"]["transport"] == ["http", "ws"]
    assert set(result["capacity_sessions"]) == {"ours", "ours/ws"} and "http_parser" in result
    levels = result["levels"]
    assert [(lv["server"], lv["transport"], lv["sessions"]) for lv in levels] == [
        ("ours", "http", 1), ("ours", "http", 3), ("ours", "ws", 1), ("ours", "ws", 3)]
    assert list(result["fresh"]) == ["ours"] and result["fresh"]["ours"]["transport"] == "http"  # fresh once
    for lv in [*levels, result["fresh"]["ours"]]:
        assert lv["admitted_sessions"] == lv["sessions"] and lv["errors"] == 0 and lv["short_outputs"] == 0
        assert lv["turns"] > 0 and lv["server_turns"] >= lv["turns"]  # deadline counts read over HTTP
    assert len(tm.closed_lengths) == 2 + (1 + 3) * 2  # every session closed, over its WebSocket for ws
    assert "ours/ws" in proc.stdout + proc.stderr  # the summary lines name the transport


def test_ws_transport_through_a_gateway_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "ws.json"
    proc = run_script("--transport", "ws", "--gateway-ours", "--url-ours", "http://127.0.0.1:9", "--out", str(out))
    assert proc.returncode == 2
    assert "--transport ws cannot go through --gateway-ours" in proc.stderr and "WebSocket" in proc.stderr
    assert not out.exists() and not out.with_suffix(".png").exists()
    assert rc.parse_args(["--transport", "ws", "--url-ours", "http://127.0.0.1:9"]).transports == ["ws"]
    assert rc.parse_args([]).transports == ["http"]
    for bad in ("grpc", "http,http", ""):
        with pytest.raises(SystemExit):
            rc.parse_args(["--transport", bad])
    with pytest.raises(SystemExit):
        rc.parse_args(["--transport", "grpc"])


def test_plot_from_a_result_file(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed here; the JSON is tested above")
    result = {"card": "cpu", "capacity_sessions": {"ours": 16, "upstream": 1},
              "workload": {"preset": "small", "period_ms": 200, "chunk": 98, "speak_tokens": 16, "listen_tokens": 1},
              "levels": [{"server": s, "sessions": n, "p99_ms": p99, "miss_rate": miss}
                         for s, n, p99, miss in [("ours", 1, 20, 0), ("ours", 16, 100, 0), ("ours", 32, 600, 0.4),
                                                 ("ours", 64, None, None),  # every open refused: no point
                                                 ("upstream", 1, 30, 0), ("upstream", 16, 200, 0.01)]]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    proc = run_script("--plot", str(path))
    assert proc.returncode == 0, proc.stderr
    assert path.with_suffix(".png").stat().st_size > 10_000


def _result(levels, capacity, **extra):
    return {"card": "NVIDIA H200", "command": "python3 -m benchmarks.realtime_capacity ...", "git_commit": "abc",
            "capacity_sessions": capacity, "capacity_rule": "rule", "model": {"preset": "small"},
            "workload": {"preset": "small", "period_ms": 200, "chunk": 98, "speak_tokens": 16, "listen_tokens": 1},
            "levels": [{"server": s, "sessions": n, "p99_ms": p99, "miss_rate": miss} for s, n, p99, miss in levels],
            **extra}


def test_merge_puts_each_runs_ours_under_its_label_and_plots_them_together(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps(_result([("ours", 1, 20, 0), ("ours", 128, 90, 0)], {"ours": 128},
                                      fresh={"ours": {"sessions": 16}})))
    two = tmp_path / "two.json"
    two.write_text(json.dumps(_result([("ours", 1, 22, 0), ("ours", 256, 120, 0), ("upstream", 1, 30, 0)],
                                      {"ours": 256, "upstream": 1})))
    up = tmp_path / "up.json"
    up.write_text(json.dumps(_result([("upstream", 1, 30, 0), ("upstream", 32, 200, 0.02)], {"upstream": 1})))
    out = tmp_path / "merged.json"
    proc = run_script("--out", str(out), "--merge", f"upstream 0.5.17={up}", "--merge", f"1 worker={one}",
                      "--merge", f"2 workers + gateway={two}")
    assert proc.returncode == 0, proc.stderr
    merged = json.loads(out.read_text())
    assert merged["capacity_sessions"] == {"upstream 0.5.17": 1, "1 worker": 128, "2 workers + gateway": 256,
                                           "2 workers + gateway upstream": 1}
    assert [(lv["server"], lv["sessions"]) for lv in merged["levels"]] == [
        ("upstream 0.5.17", 1), ("upstream 0.5.17", 32), ("1 worker", 1), ("1 worker", 128),
        ("2 workers + gateway", 1), ("2 workers + gateway", 256), ("2 workers + gateway upstream", 1)]
    assert merged["fresh"] == {"1 worker": {"sessions": 16}}
    assert merged["runs"]["1 worker"]["command"].startswith("python3 -m benchmarks.realtime_capacity")
    assert {"card", "git_commit", "command", "workload", "capacity_rule"} <= merged.keys()
    assert (merged["card"], merged["git_commit"]) == ("NVIDIA H200", "abc")  # the runs' own, whatever runs the merge
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_merge_of_a_missing_file_or_without_out_is_refused_and_writes_nothing(tmp_path):
    out = tmp_path / "merged.json"
    proc = run_script("--out", str(out), "--merge", f"a={tmp_path / 'absent.json'}")
    assert proc.returncode == 2 and "--merge" in proc.stderr and not out.exists()
    real = tmp_path / "r.json"
    real.write_text(json.dumps(_result([("ours", 1, 20, 0)], {"ours": 1})))
    proc = run_script("--merge", f"a={real}")
    assert proc.returncode == 2 and "--merge needs --out" in proc.stderr
    assert list(tmp_path.iterdir()) == [real]
