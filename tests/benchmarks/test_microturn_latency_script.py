"""benchmarks/microturn_latency.py's bookkeeping on CPU: warm-up turns are not recorded, slow turns of several
sessions that overlap are one stall event, and the compiles and collections of the measured window are read
back from a server log written by stall_log."""

import asyncio

from sglang_microturn.server import stall_log
from benchmarks import microturn_latency as bench
from benchmarks import workloads


def test_warmup_turns_are_run_but_not_recorded():
    log = workloads.TurnLog(turns=5, warmup=2)
    for session in range(3):
        for k in range(5):
            log.add(k, 100.0 + k, 1000.0 if k < 2 else 10.0 + k)  # slow warm-up turns
    assert [len(p) for p in log.by_position] == [3, 3, 3] and len(log.turns) == 9
    summary = workloads.summarize(log, t0=100.0)
    assert summary["turns"] == 9 and summary["warmup_turns_per_session"] == 2
    assert summary["wall_s"] == 2.0  # recorded turns start at 102-104 s and last 12-14 ms: the warm-up is out
    assert summary["p99_ms"] == 14.0 and summary["stall_events"] == 0  # the warm-up's 1000 ms are gone


def test_overlapping_slow_turns_are_one_stall_event():
    turns = [(10.0, 600.0), (10.1, 550.0), (10.3, 300.0),  # three sessions held up by one stall
             (12.0, 250.0),  # another, later
             (13.0, 150.0)]  # under the micro-turn: not a stall
    events = workloads.stall_events(turns)
    assert [(e["turns"], e["max_ms"]) for e in events] == [(3, 600.0), (1, 250.0)]
    log = workloads.TurnLog(turns=1, warmup=0)
    for start, ms in turns:
        log.add(0, start, ms)
    summary = workloads.summarize(log, t0=9.0)
    assert summary["turns_over_200ms"] == 4 and summary["stall_events"] == 2
    assert summary["first_stall_events"][0] == {"at_s": 1.0, "turns": 3, "max_ms": 600.0}


def test_server_stalls_in_the_measured_window(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("\n".join([
        "[scheduler] loading weights",
        stall_log.format_line(stall_log.Stall("compile", "microturn_kernels.aligned_attention._split_partials_kernel",
                                              400, 50.0, 11)),
        stall_log.format_line(stall_log.Stall("compile", "sglang.fused_moe.fused_moe_kernel", 610, 105.5, 11)),
        "[scheduler] Decode batch, #running-req: 32",
        stall_log.format_line(stall_log.Stall("gc", "gen2", 230, 150.25, 12)),
        stall_log.format_line(stall_log.Stall("compile", "mod.late", 100, 300.0, 11)),
    ]) + "\n")
    assert workloads.stalls_between(str(log), 100.0, 200.0) == [
        {"kind": "compile", "what": "sglang.fused_moe.fused_moe_kernel", "ms": 610.0, "at_s": 5.5, "pid": 11},
        {"kind": "gc", "what": "gen2", "ms": 230.0, "at_s": 50.25, "pid": 12}]


def test_freeze_gc_posts_to_sglangs_endpoint():
    seen = []

    async def handle(reader, writer):
        seen.append((await reader.readuntil(b"\r\n")).decode().strip())
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnull")
        await writer.drain()
        writer.close()

    async def run():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            await bench.freeze_gc(f"http://127.0.0.1:{port}")

    asyncio.run(run())
    assert seen == ["POST /freeze_gc HTTP/1.1"]
