"""GPU smoke run: `sglang-microturn serve` with the default model, one streaming session, three appends.

Checks that each turn reuses the whole previous turn (cached_tokens == previous prompt + completion), that the
plugin loaded in the server processes, and that the server shuts down cleanly. Writes a JSON record.

    python3 -m benchmarks.smoke_session --out benchmarks/results/smoke_<card>.json
"""

from __future__ import annotations

import sys
import time

from benchmarks.run_record import write_result
from benchmarks.servers import benchmark_parser, serve_argv
from sglang_microturn.cli.server_process import ServerProcess

PLUGIN_LINE = "plugin registered:"


def run(args) -> dict:
    argv = serve_argv(args.port, *args.sglang_args)
    turns, checks = [], {}
    with ServerProcess(argv, args.port, args.log) as server:
        status, sid = server.post("/open_session", {"capacity_of_str_len": 0, "streaming": True})
        assert status == 200, (status, sid)
        prev_len = None
        for k in range(args.turns):
            chunk = [100 + 16 * k + i for i in range(args.chunk)]
            t0 = time.perf_counter()
            status, out = server.post("/generate", {
                "input_ids": chunk,
                "session_params": {"id": sid},
                "sampling_params": {"max_new_tokens": args.out_tokens, "temperature": 0, "ignore_eos": True},
            })
            latency_ms = (time.perf_counter() - t0) * 1e3
            assert status == 200, (status, out)
            meta = out["meta_info"]
            turns.append({
                "turn": k, "latency_ms": round(latency_ms, 2), "prompt_tokens": meta["prompt_tokens"],
                "cached_tokens": meta["cached_tokens"], "completion_tokens": meta["completion_tokens"],
                "output_ids": out.get("output_ids"),
            })
            expected = 0 if prev_len is None else prev_len
            checks[f"turn{k}_cached_tokens_equals_previous_length"] = meta["cached_tokens"] == expected
            prev_len = meta["prompt_tokens"] + meta["completion_tokens"]
        status, _ = server.post("/close_session", {"session_id": sid})
        checks["close_session_ok"] = status == 200
    log = open(args.log).read()
    checks["plugin_line_in_launcher_and_scheduler"] = log.count(PLUGIN_LINE) >= 2
    checks["clean_shutdown"] = server.shutdown["clean"]
    return {
        "startup_s": round(server.startup_s, 1),
        "shutdown": server.shutdown,
        "turns": turns,
        "checks": checks,
        "passed": all(checks.values()),
        "plugin_lines": [line for line in log.splitlines() if PLUGIN_LINE in line][:4],
    }


def main() -> int:
    p = benchmark_parser(__doc__, log="/tmp/smoke_server.log")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--out-tokens", type=int, default=8)
    args = p.parse_args()
    result = run(args)
    write_result(args.out, result)
    for t in result["turns"]:
        print(f"turn {t['turn']}: {t['latency_ms']:7.1f} ms  prompt {t['prompt_tokens']:4d}  "
              f"cached {t['cached_tokens']:4d}  completion {t['completion_tokens']}")
    print(f"startup {result['startup_s']} s, shutdown {result['shutdown']}, checks {result['checks']}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
