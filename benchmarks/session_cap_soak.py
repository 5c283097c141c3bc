"""GPU soak of the session cap (issue 15, item 1): idle /microturn sessions must never wedge plain requests.

Starts `sglang-microturn serve` with a small `--max-running-requests` (so the request pool has few rows), then
opens /microturn sessions that never expire (`idle_timeout: 0`), each left idle after a 2-token append (so it
keeps its row), one after another up to the cap and `--beyond` opens past it, and serves a plain `/generate`
after every open. Passes when every plain request is answered 200 within `--plain-timeout` seconds, every
open past the cap is a 429 naming MICROTURN_MAX_SESSIONS, the number opened is the cap the rows give, and
after closing them all a new session opens and appends again. Writes a JSON record.

    python3 -m benchmarks.session_cap_soak --out benchmarks/results/session_cap_soak_h200.json
"""

from __future__ import annotations

import re
import sys
import time

from benchmarks.run_record import write_result
from benchmarks.servers import benchmark_parser, serve_argv
from sglang_microturn.cli.server_process import ServerProcess


def expected_cap(rows: int) -> int:
    """MICROTURN_MAX_SESSIONS's default for `rows` request-pool rows (server/api_handlers.session_cap)."""
    return max(1, rows - max(1, rows // 8))


def run(args) -> dict:
    argv = serve_argv(args.port, "--max-running-requests", str(args.rows), *args.sglang_args)
    opened, refused, plain, checks = [], [], [], {}
    with ServerProcess(argv, args.port, args.log) as server:
        def plain_generate() -> None:
            t0 = time.perf_counter()
            try:
                status, _ = server.post("/generate", {"input_ids": [100, 101, 102, 103], "sampling_params": {
                    "max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}, timeout=args.plain_timeout)
            except OSError as e:  # no answer within --plain-timeout: the wedge this soak looks for
                status = f"no answer: {type(e).__name__}"
            plain.append({"status": status, "ms": round((time.perf_counter() - t0) * 1e3, 1)})

        for k in range(args.rows + args.beyond):
            status, reply = server.post("/microturn/open", {"idle_timeout": 0, "output_budget": 0})
            if status == 200:
                sid = reply["session_id"]
                status, out = server.post("/microturn/append", {"session_id": sid, "input_ids": [100 + k, 7]})
                opened.append({"session_id": sid, "append_status": status})
            else:
                refused.append({"status": status, "message": (reply or {}).get("error", {}).get("message", "")})
            plain_generate()
        for s in opened:
            server.post("/microturn/close", {"session_id": s["session_id"]})
        status, reply = server.post("/microturn/open", {"output_budget": 1})
        again = status == 200 and server.post("/microturn/append", {"session_id": reply["session_id"],
                                                                    "input_ids": [5, 6]})[0] == 200
    # SGLang may give the pool fewer rows than --max-running-requests asks (memory): the 429 names the cap used
    named = re.search(r"maximum of (\d+) open sessions", refused[0]["message"]) if refused else None
    cap = int(named.group(1)) if named else None
    checks["opened_the_cap"] = cap is not None and len(opened) == cap <= expected_cap(args.rows) and all(
        s["append_status"] == 200 for s in opened)
    checks["every_open_past_the_cap_is_429"] = bool(refused) and all(
        r["status"] == 429 and "MICROTURN_MAX_SESSIONS" in r["message"] for r in refused)
    checks["every_plain_generate_served"] = all(p["status"] == 200 for p in plain)
    checks["opens_again_after_closing"] = again
    checks["clean_shutdown"] = server.shutdown["clean"]
    return {
        "rows": args.rows, "cap": cap, "opened": len(opened), "refused": len(refused),
        "plain_ms_max": max((p["ms"] for p in plain), default=None),
        "plain": plain, "refused_first": refused[:2], "checks": checks, "passed": all(checks.values()),
    }


def main() -> int:
    p = benchmark_parser(__doc__, log="/tmp/session_cap_soak_server.log")
    p.add_argument("--rows", type=int, default=32, help="--max-running-requests: rows of the request pool")
    p.add_argument("--beyond", type=int, default=16, help="opens attempted past the cap")
    p.add_argument("--plain-timeout", type=float, default=30.0)
    args = p.parse_args()
    result = run(args)
    write_result(args.out, result)
    print(f"rows {result['rows']} cap {result['cap']}: opened {result['opened']}, refused {result['refused']}, "
          f"plain /generate max {result['plain_ms_max']} ms; checks {result['checks']}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
