"""Real-time capacity: how many live micro-turn sessions a server keeps on a real 200 ms clock.

Workload. N sessions, each on its own real-time clock (open loop, random phases in [0, period)): turn k of a
session is due at start + phase + k * period whether or not turn k-1 has returned, but a session never has
two appends in flight (the server allows one), so a turn due while the previous one still runs is sent the
moment that one returns. Every turn appends --chunk (98) random input ids (ids 100 and up, as
microturn_latency.py picks them: above the control ids) and generates --speak-tokens (16) tokens with
probability --speak-share (0.3, "speaking"), else --listen-tokens (1, "listening"); greedy, ignore_eos. A level
runs --seconds (15) per level; each session's first --warmup-s (2) of turns are not counted. The random draws
depend only on --seed, the level and the session, so every server gets the very same turns.

Latency of a turn = its output's arrival - its due time, so waiting behind a late previous turn counts. A
turn is missed when its output arrives after the next turn is due (latency > period), fails, or was still
unsent when the level's --drain-s after its end ran out (such a turn's latency is taken as the cutoff - due, a
lower bound). Lateness = latency - period, over missed turns.

Capacity of a server: the largest level such that it and every smaller level admitted every session, had no
errors, a miss rate < 0.1 % and a p99 latency < 150 ms; 0 if none. A server's levels stop escalating after a
level misses more than --stop-miss-rate (0.2) of its turns.

Servers, one after the other on the GPU, each started fresh, both on the `small` (or --preset bench) micro-turn
checkpoint without its shared expert, so that upstream serves the same weights as a Qwen3-MoE:
  ours      `sglang-microturn serve` with its defaults (+ --ours-flags): /microturn/open with a deadline, then
            /microturn/append with expected_length; its per-session deadline counts (GET
            /microturn/sessions/<id>, field `deadline`) are summed per level as server_misses / server_turns
            (measured from the append's receipt, so a lower bound of the client's misses, and over the
            warm-up turns too); Triton compiles and long GC pauses come from its stall log. With --transport ws
            each session is one WebSocket (WS /microturn/ws: session.update, then one input.append per turn with
            expected_length, session.close) instead of an HTTP request per call; the deadline counts are still
            read over HTTP. --transport http,ws measures ours over both in turn on the one server (its fresh
            check over the first), as the series "ours" and "ours/ws", each with its server CPU per turn.
            Not through a gateway (--gateway-ours): SGLang Model Gateway forwards no WebSocket
  upstream  unpatched SGLang 0.5.17 (`python -m sglang.launch_server`, no plugin, Triton attention, pytorch
            sampling, + --upstream-flags): /open_session + /generate with session_params. Our patches are
            reverted in the installed SGLang while it runs and re-applied after it stops (--upstream-sglang
            installed keeps them); a run killed meanwhile leaves SGLang pristine, and `serve` then refuses to
            start with one line naming the fix (`sglang-microturn patch apply`)
Before its levels, each server first runs a "fresh server" check: --fresh-sessions (16) sessions for
--fresh-seconds (10), nothing excluded as warm-up (what the first users of a just-started server get).
GPU busy ratio: mean of nvidia-smi's utilization.gpu over the level / 100 (null without nvidia-smi).
Server CPU per turn (`server_cpu_ms_per_turn`): CPU milliseconds each server process (the HTTP process, the
scheduler, the detokenizer) spent over the level per answered turn, from /proc (benchmarks/server_cpu.py);
for a server given by URL only with --server-pid-ours. Each level also gives the p50 of each output budget
(`p50_by_budget_ms`: listening and speaking turns apart).

The load generator shards the sessions over --client-procs processes, each with its own event loop and a
keep-alive aiohttp connector, so at 256+ sessions the client is not what limits.

    MICROTURN_GIT_COMMIT=<sha> bash benchmarks/on_device.sh "python -m benchmarks.realtime_capacity --preset small"
    python -m benchmarks.realtime_capacity --url-ours http://127.0.0.1:30000 --servers ours --levels 16,32
    python -m benchmarks.realtime_capacity --plot benchmarks/results/realtime_capacity_small_h200.json

Writes JSON (--out, default benchmarks/results/realtime_capacity_<preset>_h200.json) and a PNG beside it
(p99 latency and miss rate vs sessions, one line per server, the thresholds drawn).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import multiprocessing
import os
import random
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from tqdm import tqdm

from benchmarks import server_cpu
from benchmarks.run_record import write_result
from benchmarks.servers import microturn_exe
from benchmarks.workloads import stalls_between
from sglang_microturn import protocol
from sglang_microturn.client import MicroTurnClientError, MicroTurnWebSocket
from sglang_microturn.patchset import patching
from sglang_microturn.server import stall_log
from sglang_microturn.model.checkpoints import ensure_checkpoint, preset
from sglang_microturn.cli.server_process import ServerProcess

MAX_MISS_RATE = 0.001
MAX_P99_MS = 150.0
CAPACITY_RULE = (f"largest level such that it and every smaller level admitted every session, had no errors, "
                 f"a miss rate < {MAX_MISS_RATE:.1%} and a p99 latency < {MAX_P99_MS:.0f} ms; 0 if none")
FIRST_INPUT_ID = 100  # as microturn_latency.chunks_for: clear of the control ids (NUM_CONTROL_IDS = 8)
START_LEAD_S = 0.5  # from "every client process is ready" to the level's start: the start time must reach all
REQUEST_TIMEOUT_S = 120.0  # a turn slower than this is a hung server, not a latency
SERVERS = ("ours", "upstream")
TRANSPORTS = ("http", "ws")  # how ours is driven; upstream has no WebSocket: always HTTP


# ------------------------------------------------------------------------------------------ the workload


@dataclass(frozen=True)
class Workload:
    period_s: float
    chunk: int
    speak_tokens: int
    listen_tokens: int
    speak_share: float
    vocab: int


def plan_turn(rng: random.Random, workload: Workload) -> tuple[list[int], int]:
    """The next turn of a session: its input ids and its output budget."""
    budget = workload.speak_tokens if rng.random() < workload.speak_share else workload.listen_tokens
    return [rng.randrange(FIRST_INPUT_ID, workload.vocab) for _ in range(workload.chunk)], budget


def turns_due(phase_s: float, seconds: float, period_s: float) -> int:
    """How many turns a session with this phase has due within a level of `seconds`."""
    return max(0, math.ceil((seconds - phase_s) / period_s - 1e-9))


@dataclass(frozen=True)
class SessionPlan:
    index: int  # within the level: seeds the session's turns
    phase_s: float


@dataclass(frozen=True)
class ShardJob:
    """What one client process runs of one level."""

    server: str  # "ours" or "upstream": which API
    url: str
    seed_key: str  # the same for every server, so they all get the same turns
    sessions: list[SessionPlan]
    seconds: float
    drain_s: float
    workload: Workload
    gateway: bool = False  # ours is SGLang Model Gateway: calls in their gateway form (sglang_microturn/protocol.py)
    transport: str = "http"  # "ws": ours over WS /microturn/ws, one connection per session


# ------------------------------------------------------------------------------------------ turns and levels


@dataclass(frozen=True)
class TurnRecord:
    """One turn as the client saw it; times are unix seconds."""

    session: int
    turn: int
    budget: int
    due: float
    sent: float | None  # None: still unsent when the level's drain time ran out
    done: float  # when the output arrived; for an unsent turn, the cutoff (its latency is then a lower bound)
    status: int  # HTTP status; 0: no answer (connection error, timeout) or unsent
    output_len: int
    sglang_s: float | None = None  # SGLang's own time for the turn (meta_info.e2e_latency), None if not reported

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def unsent(self) -> bool:
        return self.sent is None

    @property
    def latency_ms(self) -> float:
        return (self.done - self.due) * 1e3

    def missed(self, period_s: float) -> bool:
        return not self.ok or self.latency_ms > period_s * 1e3


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of sorted values; None when there are none."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


@dataclass
class TurnStats:
    """Latency and miss accounting over a level's counted turns (those due from --warmup-s on)."""

    turns: int
    missed: int
    miss_rate: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_lateness_ms: float | None
    max_lateness_ms: float | None
    unsent_turns: int
    turn_errors: int  # answered with a non-2xx status, or not answered at all
    turns_per_s: float  # counted turns answered 2xx, per second of the counted window
    output_tokens: int
    short_outputs: int  # answered turns with fewer or more outputs than their budget (ignore_eos: a bug)
    # p50 of the counted turns of each output budget ("1": listening, "16": speaking in the default mix): a
    # median moved by one kind of turn shows here
    p50_by_budget_ms: dict[str, float | None] = field(default_factory=dict)
    # p50 of SGLang's own time per answered turn (its tokenizer manager in to out, meta_info.e2e_latency); what
    # p50_ms adds to it is HTTP, the client and (ours) the micro-turn API. None: the server reported none
    p50_sglang_ms: float | None = None


def turn_stats(turns: list[TurnRecord], period_s: float, warmup_s: float, seconds: float) -> TurnStats:
    counted = [t for t in turns if t.turn * period_s >= warmup_s - 1e-9]
    answered = [t for t in counted if t.ok]
    # Unsent turns enter the percentiles at their lower bound: leaving them out would flatter an overloaded
    # level. Failed turns have no output arrival, so no latency; they count as missed.
    latencies = sorted(t.latency_ms for t in counted if t.ok or t.unsent)
    missed = [t for t in counted if t.missed(period_s)]
    lateness = [t.latency_ms - period_s * 1e3 for t in missed if t.ok or t.unsent]
    return TurnStats(
        turns=len(counted),
        missed=len(missed),
        miss_rate=round(len(missed) / len(counted), 5) if counted else None,
        p50_ms=_ms(percentile(latencies, 0.5)),
        p90_ms=_ms(percentile(latencies, 0.9)),
        p99_ms=_ms(percentile(latencies, 0.99)),
        max_ms=_ms(latencies[-1] if latencies else None),
        mean_lateness_ms=_ms(statistics.mean(lateness) if lateness else None),
        max_lateness_ms=_ms(max(lateness, default=None)),
        unsent_turns=sum(t.unsent for t in counted),
        turn_errors=sum(not t.ok and not t.unsent for t in counted),
        turns_per_s=round(len(answered) / max(seconds - warmup_s, 1e-9), 1),
        output_tokens=sum(t.output_len for t in answered),
        short_outputs=sum(t.output_len != t.budget for t in answered),
        p50_by_budget_ms={str(b): _ms(percentile(sorted(t.latency_ms for t in counted
                                                        if t.budget == b and (t.ok or t.unsent)), 0.5))
                          for b in sorted({t.budget for t in counted})},
        p50_sglang_ms=_ms(percentile(sorted(t.sglang_s * 1e3 for t in answered if t.sglang_s is not None), 0.5)),
    )


@dataclass(kw_only=True)
class LevelRecord(TurnStats):
    """One level (or fresh-server check) on one server: its turn statistics plus what the sessions' opens,
    the server's own deadline counts, its stall log and the GPU reported over the level."""

    server: str
    transport: str  # "http" or "ws" (WS /microturn/ws, ours only)
    sessions: int
    admitted_sessions: int
    refused_opens: int  # /microturn/open answered 429: the server is at its real-time capacity
    errors: int  # failed opens (other than 429) + turn_errors
    seconds: float
    warmup_s: float
    server_misses: int | None  # None: the server reports no per-session deadline counts (upstream)
    server_turns: int | None
    compiles: int | None  # None: the server logs no stalls (upstream loads no plugin) or its log is not known
    gc_pauses: int | None
    stalls: list[dict] | None
    gpu_busy_ratio: float | None
    # CPU ms per answered turn of each server process over the level (benchmarks/server_cpu.py); None: the
    # server was not started here (its processes are not known) or /proc is not there
    server_cpu_ms_per_turn: dict[str, float] | None = None

    @property
    def passes(self) -> bool:
        return (self.admitted_sessions == self.sessions and self.errors == 0 and self.turns > 0
                and self.miss_rate < MAX_MISS_RATE and self.p99_ms < MAX_P99_MS)

    def to_json(self) -> dict:
        return {**asdict(self), "passes": self.passes}


def level_seconds(args, sessions: int) -> float:
    """A level's length: --seconds, longer where its sessions would otherwise give fewer than --min-turns
    counted turns (one session at 8 s gives 30: too few for a p50 to compare within 5 %)."""
    return max(args.seconds, args.warmup_s + args.min_turns * args.period_ms / 1e3 / sessions)


def capacity(records: list[LevelRecord]) -> int:
    """The largest level that passes with every smaller level passing too; 0 if none."""
    best = 0
    for record in sorted(records, key=lambda r: r.sessions):
        if not record.passes:
            break
        best = record.sessions
    return best


# ------------------------------------------------------------------------------------------ client side


async def call(http: aiohttp.ClientSession, method: str, url: str, body: dict | None = None,
               headers: dict | None = None) -> tuple[int, object]:
    """(HTTP status, JSON body or None); status 0 when no answer came (connection error, timeout)."""
    try:
        async with http.request(method, url, json=body, headers=headers) as resp:
            raw = await resp.read()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return 0, None
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, None


def _ok(status: int) -> bool:
    return 200 <= status < 300


class OursSession:
    """A /microturn session. Tracks the committed length, which every append states as expected_length. Through
    a gateway, every call goes in its gateway form with the session's routing key."""

    def __init__(self, http: aiohttp.ClientSession, url: str, session_id: str, routing_key: str, gateway: bool):
        self.http, self.url, self.session_id, self.length = http, url, session_id, 0
        self.routing_key, self.gateway = routing_key, gateway

    @staticmethod
    async def _call(http, url: str, gateway: bool, routing_key: str, op: str, body: dict) -> tuple[int, object]:
        method, path, payload = (protocol.gateway_request if gateway else protocol.direct_request)(op, body)
        return await call(http, method, url + path, payload, {protocol.ROUTING_KEY_HEADER: routing_key})

    async def _request(self, op: str, body: dict) -> tuple[int, object]:
        return await self._call(self.http, self.url, self.gateway, self.routing_key, op, body)

    @classmethod
    async def open(cls, http, url: str, workload: Workload, gateway: bool = False) -> tuple[OursSession | None, int]:
        key = secrets.token_hex(16)
        status, reply = await cls._call(http, url, gateway, key, "open", {
            "output_budget": workload.listen_tokens, "ignore_eos": True,
            "deadline_ms": round(workload.period_s * 1e3)})
        return (cls(http, url, reply["session_id"], key, gateway) if _ok(status) else None), status

    async def turn(self, input_ids: list[int], budget: int) -> tuple[int, int, float | None]:
        """(status, output length, SGLang's own time for the turn)"""
        status, reply = await self._request("append", {
            "session_id": self.session_id, "input_ids": input_ids, "output_budget": budget,
            "expected_length": self.length})
        if not _ok(status):
            return status, 0, None
        self.length = reply["committed_length"]
        return status, len(reply["output_ids"]), reply.get("sglang_latency_s")

    async def deadline_counts(self) -> tuple[int, int] | None:
        """(misses, turns) the server counted against the session's deadline; None if it reports none."""
        status, reply = await self._request("status", {"session_id": self.session_id})
        deadline = reply.get("deadline") if _ok(status) and isinstance(reply, dict) else None
        if not isinstance(deadline, dict):
            return None
        misses, turns = deadline.get("misses"), deadline.get("turns")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (misses, turns)):
            return None
        return misses, turns

    async def close(self) -> None:
        await self._request("close", {"session_id": self.session_id})


class UpstreamSession:
    """An SGLang streaming session driven through /generate with session_params."""

    def __init__(self, http: aiohttp.ClientSession, url: str, session_id: str):
        self.http, self.url, self.session_id = http, url, session_id

    @classmethod
    async def open(cls, http, url: str, workload: Workload) -> tuple[UpstreamSession | None, int]:
        status, sid = await call(http, "POST", url + "/open_session", {"capacity_of_str_len": 0, "streaming": True})
        return (cls(http, url, sid) if _ok(status) and isinstance(sid, str) else None), status

    async def turn(self, input_ids: list[int], budget: int) -> tuple[int, int, float | None]:
        status, reply = await call(self.http, "POST", self.url + "/generate", {
            "input_ids": input_ids, "session_params": {"id": self.session_id},
            "sampling_params": {"max_new_tokens": budget, "temperature": 0, "ignore_eos": True}})
        if not _ok(status) or not isinstance(reply, dict):
            return status, 0, None
        return status, len(reply.get("output_ids") or []), (reply.get("meta_info") or {}).get("e2e_latency")

    async def deadline_counts(self) -> None:
        return None  # upstream keeps no per-session deadline

    async def close(self) -> None:
        await call(self.http, "POST", self.url + "/close_session", {"session_id": self.session_id})


class OursWsSession(OursSession):
    """A /microturn session over WS /microturn/ws: one connection for its open, appends (each with the committed
    length as expected_length) and close. Its deadline counts are read over HTTP, as OursSession reads them.
    Never through a gateway (SGLang Model Gateway forwards no WebSocket)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, ws: MicroTurnWebSocket, routing_key: str):
        super().__init__(http, url, ws.session_id, routing_key, gateway=False)
        self.ws = ws

    @classmethod
    async def open(cls, http, url: str, workload: Workload, gateway: bool = False) -> tuple[OursWsSession | None, int]:
        if gateway:
            raise ValueError("SGLang Model Gateway forwards no WebSocket: --transport ws goes to a worker directly")
        try:
            ws = await MicroTurnWebSocket.open(url, timeout_s=REQUEST_TIMEOUT_S, output_budget=workload.listen_tokens,
                                               ignore_eos=True, deadline_ms=round(workload.period_s * 1e3))
        except MicroTurnClientError as e:
            return None, _status_of(e)
        return cls(http, url, ws, secrets.token_hex(16)), 200

    async def turn(self, input_ids: list[int], budget: int) -> tuple[int, int, float | None]:
        """(status, output length, SGLang's time); an error event gives its HTTP status, a lost connection or
        timeout 0"""
        try:
            reply = await self.ws.append(input_ids, budget, expected_length=self.length)
        except MicroTurnClientError as e:
            return _status_of(e), 0, None
        self.length = reply["committed_length"]
        return 200, len(reply["output_ids"]), reply.get("sglang_latency_s")

    async def close(self) -> None:
        with contextlib.suppress(MicroTurnClientError):  # as OursSession's close: its answer is not waited on
            await self.ws.close()


def _status_of(error: MicroTurnClientError) -> int:
    """The HTTP status of a typed error event; 0 for no answer (lost connection, timeout), as call() gives."""
    return getattr(error, "status", 0) or 0


SESSION_TYPES = {"ours": OursSession, "upstream": UpstreamSession}


def session_type(server: str, transport: str) -> type:
    """The session class that drives `server` over `transport` (upstream: HTTP whatever the transport)."""
    return OursWsSession if server == "ours" and transport == "ws" else SESSION_TYPES[server]


def transports_of(server: str, args) -> list[str]:
    """The transports a server is measured over, in turn: ours over each of --transport, upstream over HTTP."""
    return args.transports if server == "ours" else ["http"]


def series(server: str, transport: str) -> str:
    """A measured series' name: the server, with its transport when that is not HTTP ("ours/ws")."""
    return server if transport == "http" else f"{server}/{transport}"


async def pace(send: Callable[[], Awaitable[tuple[int, int, int, float | None]]], first_due: float, turns: int,
               period_s: float, cutoff: float, session: int, to_unix: float) -> list[TurnRecord]:
    """Run one session's turns open loop on the monotonic clock: turn k is sent at first_due + k * period_s,
    or as soon as turn k-1 returns if that is later. `send()` runs the next turn: (budget, status, output
    length, SGLang's own time or None). Turns not sent by `cutoff` are recorded unsent. `to_unix` turns
    monotonic times into unix ones."""
    records = []
    for k in range(turns):
        due = first_due + k * period_s
        now = time.monotonic()
        if now >= cutoff:
            records += [TurnRecord(session, j, 0, first_due + j * period_s + to_unix, None, cutoff + to_unix, 0, 0)
                        for j in range(k, turns)]
            break
        if due > now:
            await asyncio.sleep(due - now)
        sent = time.monotonic()
        budget, status, output_len, sglang_s = await send()
        records.append(TurnRecord(session, k, budget, due + to_unix, sent + to_unix, time.monotonic() + to_unix,
                                  status, output_len, sglang_s))
    return records


@dataclass
class ShardResult:
    opened: int
    refused: int  # 429 on open
    open_errors: int
    turns: list[TurnRecord]
    server_counts: tuple[int, int] | None  # (misses, turns) summed over the shard's sessions


async def run_shard(job: ShardJob, conn) -> ShardResult:
    """Open the shard's sessions, report ready, wait for the start time, run every session, then read the
    server's deadline counts and close the sessions."""
    connector = aiohttp.TCPConnector(limit=max(1, len(job.sessions)))  # one in-flight request per session
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        kind = session_type(job.server, job.transport)
        extra = {"gateway": True} if job.gateway else {}
        opened = await asyncio.gather(*(kind.open(http, job.url, job.workload, **extra) for _ in job.sessions))
        live = [(plan, s) for plan, (s, _) in zip(job.sessions, opened) if s is not None]
        statuses = [status for s, status in opened if s is None]
        conn.send(("ready", len(live)))
        start_unix = conn.recv()  # blocks the loop, on which nothing runs before the start anyway
        to_unix = time.time() - time.monotonic()
        start = start_unix - to_unix
        cutoff = start + job.seconds + job.drain_s

        def sender(plan: SessionPlan, session):
            rng = random.Random(f"{job.seed_key}:{plan.index}")

            async def send():
                input_ids, budget = plan_turn(rng, job.workload)
                return (budget, *await session.turn(input_ids, budget))

            return send

        period = job.workload.period_s
        paced = await asyncio.gather(*(
            pace(sender(plan, s), start + plan.phase_s, turns_due(plan.phase_s, job.seconds, period), period,
                 cutoff, plan.index, to_unix) for plan, s in live))
        counts = await asyncio.gather(*(s.deadline_counts() for _, s in live))
        await asyncio.gather(*(s.close() for _, s in live))
    server_counts = None if None in counts else (sum(c[0] for c in counts), sum(c[1] for c in counts))
    return ShardResult(len(live), statuses.count(429), len(statuses) - statuses.count(429),
                       [t for records in paced for t in records], server_counts)


def client_process(conn) -> None:
    """A client process: runs the shard jobs it is sent until it is sent None."""
    while (job := conn.recv()) is not None:
        try:
            conn.send(("done", asyncio.run(run_shard(job, conn))))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class ClientProcessError(RuntimeError):
    pass


class ClientPool:
    """The load generator's processes: started once per run, owned by the parent until close(). Each runs
    its shard of every level on its own event loop."""

    def __init__(self, procs: int):
        # spawn, not fork: a child forked from a parent with threads (tqdm's monitor, a caller's) can inherit a
        # lock one of them held; a spawned child starts clean
        ctx = multiprocessing.get_context("spawn")
        self._conns, self._procs = [], []
        for _ in range(procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=client_process, args=(child,), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def size(self) -> int:
        return len(self._procs)

    def _recv(self, conn, timeout_s: float, expect: str):
        if not conn.poll(timeout_s):
            raise ClientProcessError(f"a client process sent no {expect!r} within {timeout_s:.0f} s")
        tag, payload = conn.recv()
        if tag != expect:
            raise ClientProcessError(f"a client process failed:\n{payload}")
        return payload

    def open(self, jobs: list[ShardJob], timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        """Send each process its job; return once every one has opened its sessions."""
        for conn, job in zip(self._conns, jobs, strict=True):
            conn.send(job)
        for conn in self._conns:
            self._recv(conn, timeout_s, "ready")

    def start(self, start_unix: float) -> None:
        for conn in self._conns:
            conn.send(start_unix)

    def results(self, timeout_s: float) -> list[ShardResult]:
        return [self._recv(conn, timeout_s, "done") for conn in self._conns]

    def close(self) -> None:
        for conn, proc in zip(self._conns, self._procs):
            with contextlib.suppress(OSError):
                conn.send(None)
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ server side


def _sleep_until(unix: float) -> None:
    time.sleep(max(0.0, unix - time.time()))


def gpu_busy_ratio(start: float, end: float) -> float | None:
    """Mean of nvidia-smi's utilization.gpu (share of time a kernel ran) sampled every 100 ms over
    [start, end] (unix; blocks until end), as 0..1, over all GPUs it lists. None without nvidia-smi."""
    _sleep_until(start)
    exe = shutil.which("nvidia-smi")
    if exe is None:
        _sleep_until(end)
        return None
    argv = [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
    if shutil.which("stdbuf"):  # into a pipe its stdout is block-buffered: samples would die with it unflushed
        argv = ["stdbuf", "-oL", *argv]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        _sleep_until(end)
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    samples = []
    for line in out.split():
        with contextlib.suppress(ValueError):  # "[N/A]" on cards that do not report it
            samples.append(float(line))
    return round(statistics.mean(samples) / 100, 4) if samples else None


@dataclass
class Server:
    name: str
    url: str
    stall_log: str | None  # the log its stall lines go to; None: it logs none, or it is not ours to read
    started_here: bool
    argv: list[str] | None = None
    startup_s: float | None = None
    sglang_patches: dict[str, str] | None = None  # each of our patches' state in SGLang while it ran
    shutdown: dict | None = None
    pid: int | None = None  # its HTTP process, when started here (benchmarks/server_cpu.py reads its tree)


def stall_counts(server: Server, t0: float, t1: float) -> dict:
    """The compiles and long GC pauses the server's stall log reported within [t0, t1] (unix)."""
    if server.stall_log is None:
        return {"compiles": None, "gc_pauses": None, "stalls": None}
    found = stalls_between(server.stall_log, t0, t1)
    return {"compiles": sum(s["kind"] == "compile" for s in found),
            "gc_pauses": sum(s["kind"] == "gc" for s in found), "stalls": found}


def model_spec(preset_name: str):
    # Without its shared expert the checkpoint is a valid Qwen3-MoE: upstream serves the very same weights.
    return preset(preset_name, shared_expert_width=0)


def server_command(name: str, args, model: str) -> tuple[list[str], dict]:
    """argv and environment that start server `name` on the model at `model`."""
    port = ["--port", str(args.port)]
    if name == "ours":
        return ([microturn_exe(), "serve", "--model-path", model, *port, *shlex.split(args.ours_flags)],
                dict(os.environ, **{stall_log.ENV: "1"}))
    return ([sys.executable, "-m", "sglang.launch_server", "--model-path", model, *port,
             "--json-model-override-args", json.dumps({"architectures": ["Qwen3MoeForCausalLM"]}),
             "--enable-streaming-session", "--attention-backend", "triton", "--sampling-backend", "pytorch",
             *shlex.split(args.upstream_flags)],
            dict(os.environ, SGLANG_PLUGINS="none-upstream-baseline"))  # a plugin name that loads none, ours included


def patch_states(target: patching.PatchTarget, patches: list[patching.Patch]) -> dict[str, str]:
    return {p.name: patching.state(p, target).value for p in patches}


@contextlib.contextmanager
def pristine_sglang(target: patching.PatchTarget, patches: list[patching.Patch]) -> Iterator[None]:
    """SGLang as shipped inside the block: reverts those of our patches that are applied (last first, as a later
    patch may build on an earlier one's lines) and re-applies exactly those afterwards."""
    reverted = [p for p in reversed(patches) if patching.revert(p, target) is patching.PatchState.APPLIED]
    try:
        yield
    finally:
        for p in reversed(reverted):
            patching.apply(p, target)


@contextlib.contextmanager
def serving(name: str, args) -> Iterator[Server]:
    """Server `name`: the running one given by --url-<name>, else one started fresh and stopped after."""
    url = getattr(args, f"url_{name}")
    if url:
        yield Server(name, url.rstrip("/"), args.server_log_ours if name == "ours" else None, started_here=False,
                     pid=args.server_pid_ours if name == "ours" else None)
        return
    argv, env = server_command(name, args, str(ensure_checkpoint(model_spec(args.preset))))
    log_path = os.path.join(args.log_dir, f"realtime_capacity_server_{name}.log")
    target, patches = patching.installed_sglang(), patching.load_patches()
    pristine = name == "upstream" and args.upstream_sglang == "pristine"
    with pristine_sglang(target, patches) if pristine else contextlib.nullcontext():
        with ServerProcess(argv, args.port, log_path, env=env) as proc:
            server = Server(name, proc.url, log_path if name == "ours" else None, True, argv,
                            round(proc.startup_s, 1), patch_states(target, patches), pid=proc.proc.pid)
            yield server
    server.shutdown = proc.shutdown


# ------------------------------------------------------------------------------------------ a level


def shard_jobs(server: Server, label: str, sessions: int, seconds: float, args, workload: Workload,
               procs: int, transport: str) -> list[ShardJob]:
    """The level's sessions with their random phases, dealt round robin over `procs` client processes."""
    rng = random.Random(f"{args.seed}:{label}:phases")
    plans = [SessionPlan(i, rng.random() * workload.period_s) for i in range(sessions)]
    gateway = server.name == "ours" and args.gateway_ours
    return [ShardJob(server.name, server.url, f"{args.seed}:{label}", plans[p::procs], seconds, args.drain_s,
                     workload, gateway, transport) for p in range(procs)]


def run_level(pool: ClientPool, server: Server, label: str, sessions: int, seconds: float, warmup_s: float,
              args, workload: Workload, transport: str = "http") -> LevelRecord:
    pool.open(shard_jobs(server, label, sessions, seconds, args, workload, pool.size, transport))
    cpu_before = server_cpu.cpu_seconds(server.pid) if server.pid else {}  # after the opens, before the turns
    start = time.time() + START_LEAD_S
    pool.start(start)
    busy = gpu_busy_ratio(start, start + seconds)
    shards = pool.results(timeout_s=seconds + args.drain_s + REQUEST_TIMEOUT_S + 60)
    cpu_after = server_cpu.cpu_seconds(server.pid) if server.pid else {}  # the closes count in, a little
    turns = [t for s in shards for t in s.turns]
    stats = turn_stats(turns, workload.period_s, warmup_s, seconds)
    counts = [s.server_counts for s in shards if s.opened]
    server_counts = (None, None) if not counts or None in counts else tuple(map(sum, zip(*counts)))
    return LevelRecord(
        **asdict(stats), server=server.name, transport=transport, sessions=sessions,
        admitted_sessions=sum(s.opened for s in shards),
        refused_opens=sum(s.refused for s in shards),
        errors=sum(s.open_errors for s in shards) + stats.turn_errors, seconds=seconds, warmup_s=warmup_s,
        server_misses=server_counts[0], server_turns=server_counts[1],
        **stall_counts(server, start, max((t.done for t in turns), default=start + seconds)),
        gpu_busy_ratio=busy,
        server_cpu_ms_per_turn=server_cpu.per_turn_ms(cpu_before, cpu_after, sum(t.ok for t in turns)))


def summary_line(r: LevelRecord) -> str:
    name = series(r.server, r.transport)
    return (f"{name:8s} {r.sessions:4d} sessions ({r.admitted_sessions} admitted): p50 {r.p50_ms} p99 "
            f"{r.p99_ms} ms, miss {r.miss_rate}, {r.turns_per_s} turns/s, errors {r.errors}, compiles "
            f"{r.compiles}, gc {r.gc_pauses}, gpu busy {r.gpu_busy_ratio}"
            + (f", cpu ms/turn {r.server_cpu_ms_per_turn}" if r.server_cpu_ms_per_turn else ""))


# ------------------------------------------------------------------------------------------ plot


def plot(result_path: str | os.PathLike) -> Path | None:
    """Draw the result's p99 latency and miss rate vs sessions beside it (.png); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so no plot; draw it later with: "
              f"python -m benchmarks.realtime_capacity --plot {result_path}")
        return None
    result = json.loads(Path(result_path).read_text())
    fig, (lat, miss) = plt.subplots(1, 2, figsize=(11, 4.2))
    def series_of(level: dict) -> str:
        return series(level["server"], level.get("transport", "http"))

    for name in dict.fromkeys(series_of(level) for level in result["levels"]):
        # A level whose every open was refused measured nothing: no point, rather than a 0 % miss rate.
        rows = sorted((lv for lv in result["levels"] if series_of(lv) == name and lv["miss_rate"] is not None),
                      key=lambda lv: lv["sessions"])
        x = [lv["sessions"] for lv in rows]
        label = f"{name} (capacity {result['capacity_sessions'].get(name)})"
        lat.plot(x, [lv["p99_ms"] for lv in rows], marker="o", label=label)
        miss.plot(x, [100 * lv["miss_rate"] for lv in rows], marker="o", label=label)
    lat.axhline(MAX_P99_MS, color="gray", linestyle="--", label=f"{MAX_P99_MS:.0f} ms")
    miss.axhline(100 * MAX_MISS_RATE, color="gray", linestyle="--", label=f"{MAX_MISS_RATE:.1%}")
    lat.set(xlabel="sessions", ylabel="p99 latency (ms)", yscale="log", title="p99 latency")
    miss.set(xlabel="sessions", ylabel="missed turns (%)", title="miss rate")
    miss.set_yscale("symlog", linthresh=0.01)  # 0 %, the 0.1 % threshold and 60 % all readable on one axis
    miss.set_ylim(bottom=0)
    for ax in (lat, miss):
        ax.legend()
        ax.grid(alpha=0.3)
    knobs = result["workload"]
    fig.suptitle(f"real-time capacity, {result['card']}, preset {knobs['preset']}, {knobs['period_ms']:g} ms "
                 f"micro-turns, {knobs['chunk']} in / {knobs['speak_tokens']} or {knobs['listen_tokens']} out")
    fig.tight_layout()
    png = Path(result_path).with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def merge(runs: dict[str, dict]) -> dict:
    """One result of several runs of this benchmark (label -> result): how `benchmarks/cluster_capacity.sh` puts
    upstream, one worker and the gateway of N workers, measured in one GPU run, into one file and one plot. A run
    of one server is put under its label; a run of both keeps "ours" under the label and the other as
    "LABEL upstream"."""
    merged: dict = {"capacity_sessions": {}, "levels": [], "fresh": {}, "runs": {}}
    for label, run in runs.items():
        alone = len(run["capacity_sessions"]) == 1

        def name(server: str) -> str:
            return label if alone or server == "ours" else f"{label} {server}"

        for server, sessions in run["capacity_sessions"].items():
            merged["capacity_sessions"][name(server)] = sessions
        merged["levels"] += [{**level, "server": name(level["server"])} for level in run["levels"]]
        merged["fresh"].update({name(server): r for server, r in run.get("fresh", {}).items()})
        merged["runs"][label] = {k: run[k] for k in ("command", "git_commit", "date", "servers") if k in run}
    first = next(iter(runs.values()))
    merged.update(capacity_rule=first["capacity_rule"], workload=first["workload"], model=first["model"])
    # The card and commit measured (a merge may run on another machine than the runs); kept when all agree.
    for key in ("card", "git_commit"):
        values = {run.get(key) for run in runs.values()}
        if len(values) == 1 and None not in values:
            merged[key] = values.pop()
    return merged


def _labelled_path(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"--merge takes LABEL=RESULT.json of an existing file, got {text!r}")
    return label, path


# ------------------------------------------------------------------------------------------ main


def _levels(text: str) -> list[int]:
    try:
        levels = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--levels takes comma-separated session counts, got {text!r}") from None
    if levels[0] < 1:
        raise argparse.ArgumentTypeError(f"--levels must be >= 1, got {text!r}")
    return levels


def _transports(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(t not in TRANSPORTS for t in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--transport takes one or more of {', '.join(TRANSPORTS)}, comma-separated,"
                                         f" got {text!r}")
    return names


def _servers(text: str) -> list[str]:
    names = text.split(",")
    if not names or any(n not in SERVERS for n in names):
        raise argparse.ArgumentTypeError(f"--servers takes a comma-separated subset of {','.join(SERVERS)}, got {text!r}")
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.realtime_capacity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plot", metavar="RESULT.json", help="only draw the plot of an earlier result")
    p.add_argument("--merge", metavar="LABEL=RESULT.json", type=_labelled_path, action="append",
                   help="only merge earlier results into --out (and plot it), each run's ours under its label")
    p.add_argument("--preset", choices=["small", "bench"], default="small")
    p.add_argument("--servers", type=_servers, default=list(SERVERS))
    p.add_argument("--levels", type=_levels, default=_levels("1,16,32,64,96,128,192,256"))
    p.add_argument("--seconds", type=float, default=15.0, help="per level")
    p.add_argument("--min-turns", type=int, default=150,
                   help="a level runs long enough to count at least this many turns (small levels run longer)")
    p.add_argument("--warmup-s", type=float, default=2.0, help="each session's first turns not counted")
    p.add_argument("--period-ms", type=float, default=200.0)
    p.add_argument("--chunk", type=int, default=98, help="input ids per turn")
    p.add_argument("--speak-tokens", type=int, default=16)
    p.add_argument("--listen-tokens", type=int, default=1)
    p.add_argument("--speak-share", type=float, default=0.3)
    p.add_argument("--stop-miss-rate", type=float, default=0.2, help="stop a server's levels past this miss rate")
    p.add_argument("--drain-s", type=float, default=5.0,
                   help="after a level's end, how long sessions behind schedule may still send their due turns")
    p.add_argument("--fresh-sessions", type=int, default=16, help="0 skips the fresh-server check")
    p.add_argument("--fresh-seconds", type=float, default=10.0)
    p.add_argument("--client-procs", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--transport", type=_transports, default=["http"],
                   help="how ours is driven: http (a request per call), ws (one WS /microturn/ws connection per "
                        "session), or http,ws (both in turn on the one server); upstream is always HTTP")
    p.add_argument("--ours-flags", default="", help="extra flags for `sglang-microturn serve`, one string")
    p.add_argument("--upstream-flags", default="", help="extra flags for upstream's launch_server, one string")
    p.add_argument("--upstream-sglang", choices=["pristine", "installed"], default="pristine",
                   help="pristine: revert our patches in SGLang while upstream runs; installed: leave SGLang as it is")
    p.add_argument("--url-ours", help="use this running server as ours instead of starting one")
    p.add_argument("--url-upstream", help="use this running server as upstream instead of starting one")
    p.add_argument("--server-log-ours", help="with --url-ours: that server's log, to read its stall lines")
    p.add_argument("--server-pid-ours", type=int, help="with --url-ours: its HTTP process id, so that each "
                   "level reports the CPU time a turn costs each of its processes")
    p.add_argument("--gateway-ours", action="store_true",
                   help="--url-ours is SGLang Model Gateway in front of workers (`sglang-microturn cluster`): calls "
                        "go in their gateway form, each session with its own routing key")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--log-dir", default="/tmp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="default: benchmarks/results/realtime_capacity_<preset>_h200.json")
    args = p.parse_args(argv)
    if args.period_ms <= 0 or args.seconds <= 0 or args.chunk < 1 or not 0 <= args.speak_share <= 1:
        p.error("want --period-ms > 0, --seconds > 0, --chunk >= 1 and --speak-share in [0, 1]")
    if args.client_procs < 1:
        p.error(f"--client-procs must be >= 1, got {args.client_procs}")
    if args.gateway_ours and not args.url_ours:
        p.error("--gateway-ours needs --url-ours (the gateway's URL)")
    args.transports = args.transport
    if args.gateway_ours and "ws" in args.transports:
        p.error("--transport ws cannot go through --gateway-ours: SGLang Model Gateway forwards no WebSocket; "
                "point --url-ours at a worker, or use --transport http")
    if args.merge and not args.out:
        p.error("--merge needs --out")
    if args.server_log_ours and not os.path.isfile(args.server_log_ours):
        p.error(f"--server-log-ours {args.server_log_ours}: no such file")
    args.out = args.out or f"benchmarks/results/realtime_capacity_{args.preset}_h200.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:
        return 0 if plot(args.plot) else 1
    if args.merge:
        path = write_result(args.out, merge({label: json.loads(Path(path).read_text()) for label, path in args.merge}))
        print(f"capacity (sessions): {json.loads(path.read_text())['capacity_sessions']}; wrote {path}")
        plot(path)
        return 0
    spec = model_spec(args.preset)
    workload = Workload(args.period_ms / 1e3, args.chunk, args.speak_tokens, args.listen_tokens,
                        args.speak_share, spec.vocab_size)
    records: dict[str, list[LevelRecord]] = {series(name, t): [] for name in args.servers
                                              for t in transports_of(name, args)}
    fresh: dict[str, dict] = {}
    servers: dict[str, dict] = {}
    total = sum(len(args.levels) * len(transports_of(name, args)) + (args.fresh_sessions > 0) for name in args.servers)
    with ClientPool(args.client_procs) as pool, tqdm(total=total, unit="level") as bar:
        for name in args.servers:
            with serving(name, args) as server:
                for j, transport in enumerate(transports_of(name, args)):
                    key = series(name, transport)
                    if args.fresh_sessions > 0 and j == 0:  # only the first transport finds the server fresh
                        bar.set_description(f"{key} fresh")
                        r = run_level(pool, server, "fresh", args.fresh_sessions, args.fresh_seconds, 0.0, args,
                                      workload, transport)
                        fresh[name] = r.to_json()
                        tqdm.write("fresh " + summary_line(r))
                        bar.update()
                    for i, sessions in enumerate(args.levels):
                        bar.set_description(f"{key} {sessions} sessions")
                        r = run_level(pool, server, str(sessions), sessions, level_seconds(args, sessions),
                                      args.warmup_s, args, workload, transport)
                        records[key].append(r)
                        tqdm.write(summary_line(r))
                        bar.update()
                        if r.miss_rate is None or r.miss_rate > args.stop_miss_rate:
                            bar.update(len(args.levels) - i - 1)  # the levels left are not run
                            break
            servers[name] = asdict(server)
    result = {
        "capacity_sessions": {name: capacity(rs) for name, rs in records.items()},
        "capacity_rule": CAPACITY_RULE,
        "levels": [r.to_json() for rs in records.values() for r in rs],
        "fresh": fresh,
        "workload": {k: v for k, v in vars(args).items() if k != "plot"},
        "model": {"preset": args.preset, "shared_expert_width": 0, "vocab_size": spec.vocab_size},
        "servers": servers,
        # uvicorn (both servers) parses HTTP with httptools when it is installed, else with h11 (pure Python)
        "http_parser": "httptools" if importlib.util.find_spec("httptools") else "h11",
        "transport": ",".join(args.transports),  # ours's; upstream's levels are always "http" (each level says)
        # What was typed: run_record's sys.argv names the file of a `-m` run, which would not import as a script.
        "command": shlex.join([os.path.basename(sys.executable), *sys.orig_argv[1:]]),
    }
    path = write_result(args.out, result)
    print(f"capacity (sessions): {result['capacity_sessions']}; wrote {path}")
    plot(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
