"""Client workloads the benchmarks share: the closed-loop micro-turn latency run of our API (`run_ours`), its
bookkeeping (warm-up turns, stall events, the server's own stall lines), and synthetic user input.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import numpy as np

from sglang_microturn.client import MicroTurnClient
from sglang_microturn.format.dmel import DMelStream, is_silent
from sglang_microturn.format.layout import DEFAULT_LAYOUT, InputEvents
from sglang_microturn.server import stall_log

CHUNK, OUT_TOKENS = 16, 8
MICRO_TURN_MS = 200


class TurnLog:
    """Every recorded turn of one scenario: latencies by turn position, and (start unix time, latency ms)."""

    def __init__(self, turns: int, warmup: int):
        self.warmup, self.by_position, self.turns = warmup, [[] for _ in range(turns - warmup)], []

    def add(self, position: int, start: float, latency_ms: float) -> None:
        if position >= self.warmup:
            self.by_position[position - self.warmup].append(latency_ms)
            self.turns.append((start, latency_ms))


def stall_events(turns: list[tuple[float, float]], threshold_ms: float = MICRO_TURN_MS) -> list[dict]:
    """Turns slower than threshold_ms grouped into events: slow turns whose [start, end] intervals overlap
    (several sessions waiting on one server stall) form one event."""
    slow = sorted((start, start + ms / 1e3, ms) for start, ms in turns if ms > threshold_ms)
    events: list[dict] = []
    for start, end, ms in slow:
        if events and start <= events[-1]["end"]:
            e = events[-1]
            e["end"], e["turns"], e["max_ms"] = max(e["end"], end), e["turns"] + 1, max(e["max_ms"], ms)
        else:
            events.append({"start": start, "end": end, "turns": 1, "max_ms": ms})
    return events


def stalls_between(log_path: str, t0: float, t1: float) -> list[dict]:
    """The compiles and long collections our server logged (stall_log) that ended within [t0, t1] (unix time)."""
    found = []
    with open(log_path, errors="replace") as f:
        for line in f:
            stall = stall_log.parse_line(line)
            if stall and t0 <= stall.at <= t1:
                found.append({"kind": stall.kind, "what": stall.what, "ms": stall.ms, "at_s": round(stall.at - t0, 3),
                              "pid": stall.pid})
    return found


def summarize(log: TurnLog, t0: float) -> dict:
    """Latency statistics of the recorded turns; t0 (unix time) is where the scenario's clock starts. wall_s
    spans the recorded turns only (first start to last end), so throughput leaves the warm-up out."""
    latencies_by_position = log.by_position
    wall_s = max(start + ms / 1e3 for start, ms in log.turns) - min(start for start, _ in log.turns)
    flat = sorted(x for pos in latencies_by_position for x in pos)
    n = len(latencies_by_position)
    tenth = max(1, n // 10)
    first = statistics.mean(x for pos in latencies_by_position[:tenth] for x in pos)
    last = statistics.mean(x for pos in latencies_by_position[-tenth:] for x in pos)
    events = stall_events(log.turns)
    return {
        "turns": len(flat),
        "warmup_turns_per_session": log.warmup,
        "p50_ms": round(flat[len(flat) // 2], 2),
        "p99_ms": round(flat[min(len(flat) - 1, int(len(flat) * 0.99))], 2),
        "mean_ms": round(statistics.mean(flat), 2),
        "last_over_first_tenth": round(last / first, 3),
        "wall_s": round(wall_s, 1),
        f"turns_over_{MICRO_TURN_MS}ms": sum(x > MICRO_TURN_MS for x in flat),
        "stall_events": len(events),
        "first_stall_events": [{"at_s": round(e["start"] - t0, 3), "turns": e["turns"],
                                "max_ms": round(e["max_ms"], 1)} for e in events[:10]],
    }


def chunks_for(session_index: int, turns: int, vocab: int) -> list[list[int]]:
    rng = random.Random(1000 + session_index)
    return [[rng.randrange(100, vocab) for _ in range(CHUNK)] for _ in range(turns)]


async def run_ours(url: str, sessions: int, turns: int, vocab: int, warmup: int, server_log: str) -> dict:
    client = MicroTurnClient(url, timeout_s=300)
    opened = [await client.open(output_budget=OUT_TOKENS, ignore_eos=True) for _ in range(sessions)]
    log = TurnLog(turns, warmup)
    mismatches = 0

    async def one(i, session):
        nonlocal mismatches
        for k, chunk in enumerate(chunks_for(i, turns, vocab)):
            t = time.time()
            reply = await session.append(chunk)
            log.add(k, t, (time.time() - t) * 1e3)
            mismatches += reply["server_length"] != reply["committed_length"]

    t0 = time.time()
    await asyncio.gather(*(one(i, s) for i, s in enumerate(opened)))
    t1 = time.time()
    for s in opened:
        await s.close()
    await client.close()
    return {**summarize(log, t0), "server_vs_registry_length_mismatches": mismatches,
            "server_stalls": stalls_between(server_log, t0, t1)}


def synthetic_turns(n: int, seed: int = 0) -> list[InputEvents]:
    """n micro-turns of user input: speech-like audio in bursts, some typed text, some silence."""
    rng = np.random.default_rng(seed)
    spec = DEFAULT_LAYOUT.spec
    stream = DMelStream()
    t = np.arange(n * spec.samples_per_turn) / spec.sample_rate
    burst = (np.sin(2 * np.pi * 0.35 * t) > 0.2).astype(np.float64)  # talk ~40% of the time
    pcm = burst * (0.3 * np.sin(2 * np.pi * 180 * t * (1 + 0.1 * np.sin(3 * t))) + rng.normal(0, 0.05, len(t)))
    words = [b"hi", b"", b"", b"wait", b"", b"ok so", b""]
    events = []
    for k in range(n):
        codes = stream.push(pcm[k * spec.samples_per_turn:(k + 1) * spec.samples_per_turn])
        events.append(InputEvents(audio=None if is_silent(codes) else codes, text=words[k % len(words)]))
    return events
