"""Micro-turn latency vs session length and concurrency: ours vs upstream SGLang 0.5.17 vs stateless re-send.

Every micro-turn appends 16 random input ids and generates 8 tokens; sessions run closed-loop (next turn as
soon as the previous returns), as in ../shared/notes/baselines.md. Side by side in one run, same card, same
default model, same SGLang flags:
  model      the `small` micro-turn preset without its shared expert (so upstream can serve it as Qwen3-MoE)
  ours       `sglang-microturn serve` (plugin: aligned split-KV attention, MoE GEMV dispatch, /microturn API);
             turns go through POST /microturn/append
  upstream   `python -m sglang.launch_server` without our plugin (SGLANG_PLUGINS excludes it), Triton
             attention; turns go through /generate with session_params (SGLang's streaming sessions)
  stateless  the upstream server; every turn re-sends the whole history to /generate (radix cache on)

    python3 benchmarks/microturn_latency.py --out benchmarks/results/microturn_latency_h100.json

Reported per scenario: p50 / p99 latency (client round trip), mean of the last tenth of turn positions over
the first tenth (growth with session length), wall time. Both servers run with --disable-prefill-cuda-graph
(prefill graph capture costs ~75 s of startup per server; the comparison is like for like).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_record import write_result  # noqa: E402
from sglang_microturn.server_process import ServerProcess  # noqa: E402

from sglang_microturn.checkpoints import ensure_checkpoint, preset  # noqa: E402
from sglang_microturn.client import HTTPConnection, MicroTurnClient  # noqa: E402

CHUNK, OUT_TOKENS = 16, 8
COMMON_FLAGS = ["--disable-prefill-cuda-graph", "--cuda-graph-max-bs-decode", "64"]


def summarize(latencies_by_position: list[list[float]], wall_s: float) -> dict:
    """latencies_by_position[k] = the k-th turn's latencies (ms) across sessions."""
    flat = sorted(x for pos in latencies_by_position for x in pos)
    n = len(latencies_by_position)
    tenth = max(1, n // 10)
    first = statistics.mean(x for pos in latencies_by_position[:tenth] for x in pos)
    last = statistics.mean(x for pos in latencies_by_position[-tenth:] for x in pos)
    return {
        "turns": len(flat),
        "p50_ms": round(flat[len(flat) // 2], 2),
        "p99_ms": round(flat[min(len(flat) - 1, int(len(flat) * 0.99))], 2),
        "mean_ms": round(statistics.mean(flat), 2),
        "last_over_first_tenth": round(last / first, 3),
        "wall_s": round(wall_s, 1),
    }


def chunks_for(session_index: int, turns: int, vocab: int) -> list[list[int]]:
    rng = random.Random(1000 + session_index)
    return [[rng.randrange(100, vocab) for _ in range(CHUNK)] for _ in range(turns)]


async def run_ours(url: str, sessions: int, turns: int, vocab: int) -> dict:
    client = MicroTurnClient(url, timeout_s=300)
    opened = [await client.open(output_budget=OUT_TOKENS, ignore_eos=True) for _ in range(sessions)]
    latencies = [[] for _ in range(turns)]
    mismatches = 0

    async def one(i, session):
        nonlocal mismatches
        for k, chunk in enumerate(chunks_for(i, turns, vocab)):
            reply = await session.append(chunk)
            latencies[k].append(session.turns[-1].latency_ms)
            mismatches += reply["server_length"] != reply["committed_length"]

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, s) for i, s in enumerate(opened)))
    wall = time.perf_counter() - t0
    for s in opened:
        await s.close()
    client.close()
    return {**summarize(latencies, wall), "server_vs_registry_length_mismatches": mismatches}


async def run_upstream(url: str, sessions: int, turns: int, vocab: int, stateless: bool) -> dict:
    latencies = [[] for _ in range(turns)]
    params = {"max_new_tokens": OUT_TOKENS, "temperature": 0, "ignore_eos": True}

    async def one(i):
        conn = HTTPConnection(url, timeout_s=300)
        sid = None if stateless else await conn.request(
            "POST", "/open_session", {"capacity_of_str_len": 0, "streaming": True})
        history: list[int] = []
        for k, chunk in enumerate(chunks_for(i, turns, vocab)):
            body = {"sampling_params": params}
            if stateless:
                body["input_ids"] = history + chunk
            else:
                body.update(input_ids=chunk, session_params={"id": sid})
            t = time.perf_counter()
            out = await conn.request("POST", "/generate", body)
            latencies[k].append((time.perf_counter() - t) * 1e3)
            history += chunk + list(out["output_ids"])
        if sid is not None:
            await conn.request("POST", "/close_session", {"session_id": sid})
        conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(sessions)))
    return summarize(latencies, time.perf_counter() - t0)


def scenarios(args) -> list[tuple[int, int]]:
    return [(1, args.long_turns), (8, args.turns), (32, args.turns)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--log-dir", default="/tmp")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--long-turns", type=int, default=3000, help="turns of the 1-session scenario")
    p.add_argument("--turns", type=int, default=300, help="turns per session with 8 and 32 sessions")
    p.add_argument("--stateless-turns", type=int, default=300)
    args = p.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    exe = shutil.which("sglang-microturn") or sys.exit("sglang-microturn is not on PATH")
    # The serve default without its shared expert: then upstream SGLang serves the very same checkpoint as a
    # Qwen3-MoE (architecture overridden), so both sides run one model.
    spec = preset("small", shared_expert_width=0)
    model, args.vocab = str(ensure_checkpoint(spec)), spec.vocab_size
    results: dict = {"chunk_tokens": CHUNK, "output_tokens": OUT_TOKENS, "flags": COMMON_FLAGS, "ours": {},
                     "upstream": {}, "stateless": {}}

    ours_argv = [exe, "serve", "--model-path", model, "--port", str(args.port), "--attention-backend",
                 "microturn_aligned", *COMMON_FLAGS]
    with ServerProcess(ours_argv, args.port, f"{args.log_dir}/server_ours.log") as srv:
        results["ours_startup_s"] = round(srv.startup_s, 1)
        for sessions, turns in scenarios(args):
            r = asyncio.run(run_ours(url, sessions, turns, args.vocab))
            results["ours"][f"{sessions}x{turns}"] = r
            print(f"ours      {sessions:2d} x {turns:4d}: {r}", flush=True)

    env = dict(os.environ, SGLANG_PLUGINS="none-upstream-baseline")  # loads no plugin, ours included
    up_argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", model,
               "--json-model-override-args", json.dumps({"architectures": ["Qwen3MoeForCausalLM"]}),
               "--port", str(args.port), "--enable-streaming-session", "--attention-backend", "triton",
               "--sampling-backend", "pytorch", *COMMON_FLAGS]
    with ServerProcess(up_argv, args.port, f"{args.log_dir}/server_upstream.log", env=env) as srv:
        results["upstream_startup_s"] = round(srv.startup_s, 1)
        for sessions, turns in scenarios(args):
            r = asyncio.run(run_upstream(url, sessions, turns, args.vocab, stateless=False))
            results["upstream"][f"{sessions}x{turns}"] = r
            print(f"upstream  {sessions:2d} x {turns:4d}: {r}", flush=True)
        for sessions, turns in [(1, args.stateless_turns), (8, args.stateless_turns // 2)]:
            r = asyncio.run(run_upstream(url, sessions, turns, args.vocab, stateless=True))
            results["stateless"][f"{sessions}x{turns}"] = r
            print(f"stateless {sessions:2d} x {turns:4d}: {r}", flush=True)

    long_key = f"1x{args.long_turns}"
    many_key = f"32x{args.turns}"
    ours, up = results["ours"], results["upstream"]
    results["targets"] = {
        "last_over_first_le_1.05_over_long_session": ours[long_key]["last_over_first_tenth"] <= 1.05,
        "p99_32_sessions_under_100ms": ours[many_key]["p99_ms"] < 100,
        "one_session_p50_no_regression": ours[long_key]["p50_ms"] <= up[long_key]["p50_ms"] * 1.05,
    }
    results["ratios_ours_over_upstream"] = {
        k: {m: round(ours[k][m] / up[k][m], 3) for m in ("p50_ms", "p99_ms", "last_over_first_tenth")} for k in ours
    }
    write_result(args.out, results)
    print("targets:", results["targets"])
    print("ours / upstream:", results["ratios_ours_over_upstream"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
