"""Soak: many concurrent micro-turn sessions with injected faults; nothing acknowledged is lost, no KV leaks.

`sglang-microturn serve` runs with SGLang's strict memory checks (busy and idle). Each session appends 16
random ids + 8 outputs per micro-turn, closed-loop, and injects at random:
  disconnect   the append's connection is dropped 0-40 ms after sending (a queued or a running turn): the
               server must either commit the whole turn or roll it back; the client re-reads the session
  concurrent   a second append for the same session on another connection: exactly one of the two commits,
               the other gets 409 (in flight) or 412 (expected_length is stale)
After the turns: every session's server-side sequence (GET ?tokens=1) must equal what its client saw
acknowledged; then one session is grown until an append gets 429, opening another session must get 429
too, closing that session must let an open through; all sessions close and the server must stay healthy
through an idle period (SGLang's idle memory check raises on any leaked KV slot).

    python3 -m benchmarks.microturn_soak --sessions 32 --turns 3000 --out benchmarks/results/soak_h100.json
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import time
import urllib.request

from benchmarks.run_record import write_result
from benchmarks.servers import benchmark_parser, serve_argv
from sglang_microturn.cli.server_process import ServerProcess

from sglang_microturn.model.checkpoints import preset
from sglang_microturn.client import (
    HTTPConnection,
    LengthMismatchError,
    MicroTurnClient,
    OverBudgetError,
    SessionBusyError,
)

CHUNK, OUT_TOKENS = 16, 8
# What SGLang's invariant checker and a crashing process print (sglang/srt/managers/scheduler_components/).
LOG_ERRORS = ("memory leak detected", "KV double free", "use-after-free", "Traceback")


class SessionDriver:
    """One session: its acknowledged sequence and the faults it injected.

    Every append carries `expected_length` = the acknowledged length. A dropped append whose request reaches
    the server later can then only commit while the session is still at that length; the client learns of
    it from the next append's 412 and re-reads the session, which must hold the acknowledged sequence plus
    that whole turn, never a part of one."""

    def __init__(self, url: str, session, seed: int, vocab: int, p_disconnect: float, p_concurrent: float):
        self.url, self.session, self.rng, self.vocab = url, session, random.Random(seed), vocab
        self.p_disconnect, self.p_concurrent = p_disconnect, p_concurrent
        self.acked: list[int] = []
        self.dropped: list[list[int]] = []  # chunks of appends whose response was never seen
        self.counts = {"appends": 0, "disconnects": 0, "dropped_turns_committed": 0, "concurrent": 0,
                       "concurrent_rejected": 0, "concurrent_met_late_drop": 0, "resyncs": 0, "errors": 0}
        self.errors: list[str] = []

    def fail(self, what: str) -> None:
        self.counts["errors"] += 1
        if len(self.errors) < 5:
            self.errors.append(what)

    def chunk(self) -> list[int]:
        return [self.rng.randrange(100, self.vocab) for _ in range(CHUNK)]

    def body(self, chunk):
        return {"session_id": self.session.session_id, "input_ids": chunk, "expected_length": len(self.acked)}

    def check_reply(self, chunk, reply) -> None:
        self.acked += chunk + reply["output_ids"]
        if reply["committed_length"] != len(self.acked) or reply["server_length"] != len(self.acked):
            self.fail(f"lengths: acked {len(self.acked)} reply {reply['committed_length']}/{reply['server_length']}")

    async def server_tokens(self) -> list[int]:
        return (await self.session.status(tokens=True))["tokens"]

    async def resync(self) -> None:
        """Adopt dropped appends the server committed: each must be one whole turn, in order."""
        self.counts["resyncs"] += 1
        tokens = await self.server_tokens()
        while len(tokens) > len(self.acked):
            if tokens[: len(self.acked)] != self.acked:
                self.fail("server sequence diverged from the acknowledged one")
                break
            extra = tokens[len(self.acked):]
            chunk = next((c for c in self.dropped if extra[:CHUNK] == c), None)
            n_out = min(OUT_TOKENS, len(extra) - CHUNK)
            if chunk is None or n_out < 0:
                self.fail(f"server holds {len(extra)} tokens the client never sent as a whole turn")
                break
            self.dropped.remove(chunk)
            self.acked = tokens[: len(self.acked) + CHUNK + n_out]
            self.counts["dropped_turns_committed"] += 1
        if len(tokens) < len(self.acked):
            self.fail(f"server lost acknowledged tokens: {len(tokens)} < {len(self.acked)}")

    async def append(self, chunk, output_budget=None) -> None:
        """Append; a late copy of a dropped append may still be running (409: wait) or have committed (412:
        re-read). Anything else is an error."""
        for _ in range(500):
            try:
                reply = await self.session.append(chunk, output_budget, expected_length=len(self.acked))
            except SessionBusyError:
                await asyncio.sleep(0.01)
                continue
            except LengthMismatchError:
                await self.resync()
                continue
            self.check_reply(chunk, reply)
            return
        self.fail("append kept failing with 409/412")

    async def disconnect(self) -> None:
        self.counts["disconnects"] += 1
        chunk = self.chunk()
        conn = HTTPConnection(self.url)
        task = asyncio.ensure_future(conn.request("POST", "/microturn/append", self.body(chunk)))
        await asyncio.sleep(self.rng.uniform(0, 0.04))
        if task.done() and not task.cancelled() and task.exception() is None:
            await conn.close()  # finished before we could drop it: an ordinary acknowledged append
            self.check_reply(chunk, task.result())
            return
        task.cancel()  # aiohttp closes the request's connection: the server sees the disconnect
        with contextlib.suppress(BaseException):
            await task
        await conn.close()
        self.dropped.append(chunk)
        await self.settle()
        await self.resync()

    async def settle(self) -> None:
        """Let the server resolve an in-flight dropped turn (commit or roll back), if it has one."""
        for _ in range(500):
            if not (await self.session.status())["in_flight"]:
                return
            await asyncio.sleep(0.01)

    async def concurrent(self) -> None:
        """Two appends at once: one commits; the other gets 409 (in flight) or 412 (it saw the new length)."""
        self.counts["concurrent"] += 1
        first, second = self.chunk(), self.chunk()
        other = HTTPConnection(self.url)
        results = await asyncio.gather(self.session.append(first, expected_length=len(self.acked)),
                                       other.request("POST", "/microturn/append", self.body(second)),
                                       return_exceptions=True)
        await other.close()
        if all(isinstance(r, SessionBusyError) for r in results):
            # Both met a dropped append that reached the server after our last look (legal: it runs, then
            # commits or rolls back); wait it out, adopt it if it committed, and try the pair again.
            self.counts["concurrent_met_late_drop"] += 1
            await self.settle()
            await self.resync()
            return await self.concurrent()
        replies = [(c, r) for c, r in zip((first, second), results) if isinstance(r, dict)]
        rejected = [r for r in results if isinstance(r, (SessionBusyError, LengthMismatchError))]
        self.counts["concurrent_rejected"] += len(rejected)
        if len(replies) != 1 or len(rejected) != 1:
            self.fail(f"concurrent: {len(replies)} committed, results {results}")
        for chunk, reply in replies:
            self.check_reply(chunk, reply)

    async def run(self, turns: int) -> None:
        for _ in range(turns):
            self.counts["appends"] += 1
            x = self.rng.random()
            try:
                if x < self.p_disconnect:
                    await self.disconnect()
                elif x < self.p_disconnect + self.p_concurrent:
                    await self.concurrent()
                else:
                    await self.append(self.chunk())
            except Exception as e:  # noqa: BLE001 - recorded, the soak goes on
                self.fail(f"{type(e).__name__}: {e}")
                self.acked = await self.server_tokens()
        await self.append([101], output_budget=0)  # a last append: a 412 here surfaces any late dropped turn


async def budget_phase(client: MicroTurnClient, drivers: list[SessionDriver], chunk_tokens: int) -> dict:
    """Grow the sessions round-robin until the KV budget refuses an append; then opens must fail until one
    closes. Round-robin, so that no session reaches the model's context length first (that is a 400, not
    the budget): after the main phase the budget's free room is ~600 tokens per session plus what
    rolled-back turns left unused."""
    out = {"appends_until_429": 0}
    big = [101] * chunk_tokens
    refused = None
    while refused is None and out["appends_until_429"] <= 100_000:
        driver = drivers[out["appends_until_429"] % len(drivers)]
        try:
            reply = await driver.session.append(big, output_budget=0, expected_length=len(driver.acked))
            driver.acked += big + reply["output_ids"]
            out["appends_until_429"] += 1
        except OverBudgetError as e:
            out["append_429"] = e.message
            refused = driver
    out["unchanged_after_429"] = refused is not None and await refused.server_tokens() == refused.acked
    try:
        await client.open()
        out["open_429"] = False
    except OverBudgetError:
        out["open_429"] = True
    await drivers[0].session.close()
    probe = await client.open()
    out["open_after_close_ok"] = True
    await probe.close()
    return out


async def soak(url: str, args) -> dict:
    client = MicroTurnClient(url, timeout_s=300)
    sessions = [await client.open(output_budget=OUT_TOKENS, ignore_eos=True) for _ in range(args.sessions)]
    drivers = [SessionDriver(url, s, 7 + i, args.vocab, args.p_disconnect, args.p_concurrent)
               for i, s in enumerate(sessions)]
    t0 = time.perf_counter()
    await asyncio.gather(*(d.run(args.turns) for d in drivers))
    wall = time.perf_counter() - t0
    equal = 0
    for d in drivers:
        if await d.server_tokens() == d.acked:
            equal += 1
        else:
            d.fail("final server sequence differs from the acknowledged one")
    try:
        budget = await budget_phase(client, drivers, args.budget_chunk)
    except Exception as e:  # noqa: BLE001 - the main phase's verdict is still recorded
        budget = {"error": f"{type(e).__name__}: {e}"}
    for d in drivers[1:]:
        await d.session.close()
    await client.close()
    totals = {k: sum(d.counts[k] for d in drivers) for k in drivers[0].counts}
    return {"wall_s": round(wall, 1), "sessions_equal_to_acknowledged": equal, "totals": totals,
            "budget": budget, "errors": [e for d in drivers for e in d.errors][:20]}


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


def main() -> int:
    p = benchmark_parser(__doc__, log="/tmp/server_soak.log")
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--turns", type=int, default=3000)
    p.add_argument("--p-disconnect", type=float, default=0.02)
    p.add_argument("--p-concurrent", type=float, default=0.01)
    p.add_argument("--kv-budget", type=int, default=None,
                   help="MICROTURN_SESSION_KV_TOKENS for the server (default: sessions * (turns * 24 + 600))")
    p.add_argument("--budget-chunk", type=int, default=512)
    p.add_argument("--idle-s", type=float, default=5.0, help="idle time at the end (SGLang's idle memory check)")
    args = p.parse_args()
    args.vocab = preset("small").vocab_size  # the serve default's vocabulary
    # Room for every session's turns plus one micro-turn of headroom each: the main phase never hits the
    # budget, and the budget phase reaches it long before one session reaches the context length.
    budget = args.kv_budget or args.sessions * (args.turns * (CHUNK + OUT_TOKENS) + 600)
    env = dict(os.environ, SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY="1",
               SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE="1", MICROTURN_SESSION_KV_TOKENS=str(budget))
    argv = serve_argv(args.port, "--disable-prefill-cuda-graph", *args.sglang_args)
    url = f"http://127.0.0.1:{args.port}"
    with ServerProcess(argv, args.port, args.log, env=env) as srv:
        result = asyncio.run(soak(url, args))
        time.sleep(args.idle_s)
        result["healthy_after_idle"] = healthy(url)
        result["startup_s"] = round(srv.startup_s, 1)
    log = open(args.log).read()
    result["server_log_errors"] = [line for line in log.splitlines() if any(m in line for m in LOG_ERRORS)][:10]
    result["kv_budget_tokens"] = budget
    result["config"] = {k: getattr(args, k) for k in ("sessions", "turns", "p_disconnect", "p_concurrent")}
    budget_ok = all(result["budget"].get(k) for k in ("append_429", "unchanged_after_429", "open_429",
                                                       "open_after_close_ok"))
    result["passed"] = (result["sessions_equal_to_acknowledged"] == args.sessions and not result["errors"]
                        and budget_ok and result["healthy_after_idle"] and not result["server_log_errors"])
    write_result(args.out, result)
    print({k: result[k] for k in ("passed", "wall_s", "sessions_equal_to_acknowledged", "totals", "budget",
                                  "healthy_after_idle", "errors", "server_log_errors")})
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
