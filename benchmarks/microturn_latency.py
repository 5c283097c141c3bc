"""Micro-turn latency vs session length and concurrency: ours vs upstream SGLang 0.5.17 vs stateless re-send.

Every micro-turn appends 16 random input ids and generates 8 tokens; sessions run closed-loop (next turn as
soon as the previous returns), as in ../shared/notes/baselines.md. Side by side in one run, same card, same
default model, same SGLang flags:
  model      the `small` micro-turn preset without its shared expert (so upstream can serve it as Qwen3-MoE)
  ours       `sglang-microturn serve` (plugin: MoE GEMV dispatch, /microturn API); turns go through
             POST /microturn/append
  upstream   `python -m sglang.launch_server` without our plugin (SGLANG_PLUGINS excludes it), Triton
             attention; turns go through /generate with session_params (SGLang's streaming sessions)
  stateless  the upstream server; every turn re-sends the whole history to /generate (radix cache on)

    python3 -m benchmarks.microturn_latency --out benchmarks/results/microturn_latency_h100.json

Reported per scenario: p50 / p99 latency (client round trip), mean of the last tenth of turn positions over
the first tenth (growth with session length), wall time, and the stalls: turns over the 200 ms micro-turn,
grouped into events (overlapping slow turns of several sessions are one server stall). Each session's first
--warmup-turns turns (default 20, the same on every side) run but are not recorded: they compile the kernel
variants a fresh server has not seen yet. Our server logs its Triton compiles and long garbage collections
(stall_log, MICROTURN_LOG_STALLS=1), and each scenario lists those that happened while it was measured, so a
stall can be told apart from a compile or a collection. Both servers run with --disable-prefill-cuda-graph (prefill
graph capture costs ~75 s of startup per server; the comparison is like for like).

--freeze-gc asks every server (SGLang's /freeze_gc: scheduler and tokenizer manager) to move what its heap holds
to the permanent generation before each scenario, as SGLang advises against collection jitter.

"ours" is `sglang-microturn serve` with its defaults (what users run); --with-aligned adds "ours_aligned",
the same server with --attention-backend microturn_aligned.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from benchmarks.run_record import write_result
from benchmarks.servers import COMMON_FLAGS, benchmark_parser, microturn_exe
from benchmarks.workloads import CHUNK, OUT_TOKENS, TurnLog, chunks_for, run_ours, summarize
from sglang_microturn.cli.server_process import ServerProcess
from sglang_microturn.client import HTTPConnection
from sglang_microturn.model.checkpoints import ensure_checkpoint, preset
from sglang_microturn.server import stall_log


async def run_upstream(url: str, sessions: int, turns: int, vocab: int, warmup: int, stateless: bool) -> dict:
    log = TurnLog(turns, warmup)
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
            t = time.time()
            out = await conn.request("POST", "/generate", body)
            log.add(k, t, (time.time() - t) * 1e3)
            history += chunk + list(out["output_ids"])
        if sid is not None:
            await conn.request("POST", "/close_session", {"session_id": sid})
        await conn.close()

    t0 = time.time()
    await asyncio.gather(*(one(i) for i in range(sessions)))
    return summarize(log, t0)


async def freeze_gc(url: str) -> None:
    conn = HTTPConnection(url, timeout_s=60)
    try:
        await conn.request("POST", "/freeze_gc")
    finally:
        await conn.close()


def scenarios(args) -> list[tuple[int, int]]:
    return [(1, args.long_turns), (8, args.turns), (32, args.turns)]


def main() -> int:
    p = benchmark_parser(__doc__, sglang_args=False)
    p.add_argument("--long-turns", type=int, default=3000, help="turns of the 1-session scenario")
    p.add_argument("--turns", type=int, default=300, help="turns per session with 8 and 32 sessions")
    p.add_argument("--stateless-turns", type=int, default=300)
    p.add_argument("--warmup-turns", type=int, default=20, help="unrecorded first turns of every session")
    p.add_argument("--freeze-gc", action="store_true", help="POST /freeze_gc to each server before each scenario")
    p.add_argument("--with-aligned", action="store_true",
                   help="also measure ours with --attention-backend microturn_aligned")
    args = p.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    exe = microturn_exe()
    # The serve default without its shared expert: then upstream SGLang serves the very same checkpoint as a
    # Qwen3-MoE (architecture overridden), so both sides run one model.
    spec = preset("small", shared_expert_width=0)
    model, args.vocab = str(ensure_checkpoint(spec)), spec.vocab_size
    results: dict = {"chunk_tokens": CHUNK, "output_tokens": OUT_TOKENS, "flags": COMMON_FLAGS,
                     "warmup_turns": args.warmup_turns, "freeze_gc": args.freeze_gc, "ours": {}, "upstream": {},
                     "stateless": {}}
    w = args.warmup_turns

    ours_env = dict(os.environ, **{stall_log.ENV: "1"})
    variants = {"ours": []} | ({"ours_aligned": ["--attention-backend", "microturn_aligned"]}
                               if args.with_aligned else {})
    for name, extra in variants.items():
        argv = [exe, "serve", "--model-path", model, "--port", str(args.port), *extra, *COMMON_FLAGS]
        log_path = f"{args.log_dir}/server_{name}.log"
        results[name] = {}
        with ServerProcess(argv, args.port, log_path, env=ours_env) as srv:
            results[f"{name}_startup_s"] = round(srv.startup_s, 1)
            for sessions, turns in scenarios(args):
                if args.freeze_gc:
                    asyncio.run(freeze_gc(url))
                r = asyncio.run(run_ours(url, sessions, turns + w, args.vocab, w, log_path))
                results[name][f"{sessions}x{turns}"] = r
                print(f"{name:12s} {sessions:2d} x {turns:4d}: {r}", flush=True)

    env = dict(os.environ, SGLANG_PLUGINS="none-upstream-baseline")  # loads no plugin, ours included
    up_argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", model,
               "--json-model-override-args", json.dumps({"architectures": ["Qwen3MoeForCausalLM"]}),
               "--port", str(args.port), "--enable-streaming-session", "--attention-backend", "triton",
               "--sampling-backend", "pytorch", *COMMON_FLAGS]
    with ServerProcess(up_argv, args.port, f"{args.log_dir}/server_upstream.log", env=env) as srv:
        results["upstream_startup_s"] = round(srv.startup_s, 1)
        for sessions, turns in scenarios(args):
            if args.freeze_gc:
                asyncio.run(freeze_gc(url))
            r = asyncio.run(run_upstream(url, sessions, turns + w, args.vocab, w, stateless=False))
            results["upstream"][f"{sessions}x{turns}"] = r
            print(f"upstream  {sessions:2d} x {turns:4d}: {r}", flush=True)
        for sessions, turns in [(1, args.stateless_turns), (8, args.stateless_turns // 2)]:
            r = asyncio.run(run_upstream(url, sessions, turns + w, args.vocab, w, stateless=True))
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
    for name in variants:
        results[f"ratios_{name}_over_upstream"] = {
            k: {m: round(results[name][k][m] / up[k][m], 3) for m in ("p50_ms", "p99_ms", "last_over_first_tenth")}
            for k in results[name]
        }
    write_result(args.out, results)
    print("targets:", results["targets"])
    for name in variants:
        print(f"{name} / upstream:", results[f"ratios_{name}_over_upstream"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
