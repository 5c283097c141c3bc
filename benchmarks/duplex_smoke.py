"""GPU check of the duplex features on the real server: micro-turns sent as audio (the server's dMel front-end
and layout), barge-in (WS response.cancel through patch 0012, under multi-step decode and overlap scheduling)
and the WebSocket transport, against `sglang-microturn serve` with the default model.

1. audio: --turns micro-turns of PCM (a tone that wanders, with noise) as `input.audio`, paced on the
   period's clock, over one WebSocket. Every reply's input_ids must be the client-side build (DMelStream and
   the layout), and the session's committed sequence (GET ?tokens=1) the concatenation of the replies.
2. barge-in: --cancels turns of a second session (plain ids, --cancel-budget output tokens, ignore_eos) with a
   response.cancel sent --cancel-after-ms after each append. Each turn must end cancelled with fewer tokens
   than its budget, or have finished first; the committed sequence must be exactly what the replies reported
   (nothing lost, nothing extra), and each next turn must reuse it (cached_tokens).

    python3 -m benchmarks.duplex_smoke --out benchmarks/results/duplex_smoke_h200.json
    python3 -m benchmarks.duplex_smoke --url http://127.0.0.1:30000 --out /tmp/duplex.json   # a running server
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

import aiohttp
import numpy as np

from benchmarks.run_record import write_result
from benchmarks.servers import benchmark_parser, serve_argv
from sglang_microturn.cli.server_process import ServerProcess
from sglang_microturn.client import MicroTurnWebSocket
from sglang_microturn.format.dmel import DMelStream
from sglang_microturn.format.layout import Control, InputEvents, MicroTurnLayout

LAYOUT = MicroTurnLayout()
SPEC = LAYOUT.spec


def voice(turns: int, seed: int = 0) -> np.ndarray:
    """int16 PCM of `turns` periods: a tone whose pitch wanders, with noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(turns * SPEC.samples_per_turn) / SPEC.sample_rate
    wave = 0.4 * np.sin(2 * np.pi * (300 + 200 * np.sin(3 * t)) * t) + 0.05 * rng.standard_normal(len(t))
    return np.clip(wave * 32768, -32768, 32767).astype(np.int16)


async def committed_tokens(url: str, session_id: str) -> list[int]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/microturn/sessions/{session_id}", params={"tokens": "1"}) as r:
            return (await r.json())["tokens"]


async def audio_turns(url: str, turns: int) -> dict:
    pcm, n = voice(turns), SPEC.samples_per_turn
    stream, previous, replies, latencies = DMelStream(), None, [], []
    ids_match = True
    async with await MicroTurnWebSocket.open(url, output_budget=SPEC.out_budget, stop_ids=[Control.YIELD]) as ws:
        start = time.monotonic()
        for k in range(turns):
            await asyncio.sleep(max(0.0, start + k * SPEC.period_ms / 1e3 - time.monotonic()))
            chunk = pcm[k * n:(k + 1) * n]
            sent = time.monotonic()
            reply = await ws.append_input(chunk)
            latencies.append(round((time.monotonic() - sent) * 1e3, 2))
            want = LAYOUT.append_ids(InputEvents(audio=stream.push(chunk)), previous, k)
            ids_match &= reply["input_ids"] == want
            previous = reply["output_ids"]
            replies.append(reply)
        tokens = await committed_tokens(url, ws.session_id)
        await ws.close()
    built = [t for r in replies for t in r["input_ids"] + r["output_ids"]]
    return {"turns": turns, "latency_ms": latencies, "checks": {
        "input_ids_are_the_client_side_build": ids_match,
        "committed_sequence_is_the_replies": tokens == built,
        "every_reply_has_output_text": all(isinstance(r["output"]["text"], str) for r in replies)}}


async def cancel_turns(url: str, turns: int, budget: int, after_ms: float) -> dict:
    records, sequence, reuse = [], [], True
    async with await MicroTurnWebSocket.open(url, output_budget=budget, ignore_eos=True) as ws:
        for k in range(turns):
            ids = [100 + (7 * k + i) % 500 for i in range(64)]
            turn = asyncio.ensure_future(ws.append(ids))
            await asyncio.sleep(after_ms / 1e3)
            cancelled = await ws.cancel()
            reply = await turn
            reason = reply["finish_reason"].get("type")
            records.append({"cancel_found_a_running_turn": cancelled, "finish": reason,
                            "output_tokens": len(reply["output_ids"]), "cached_tokens": reply["cached_tokens"]})
            if k:  # the turn started from the committed sequence (the last token's KV may still be missing)
                reuse &= (reply["cached_tokens"] or 0) >= len(sequence) - 1
            sequence += ids + reply["output_ids"]
        tokens = await committed_tokens(url, ws.session_id)
        await ws.close()
    stopped = [r for r in records if r["finish"] == "cancelled"]
    return {"turns": records, "checks": {
        "some_turns_stopped_by_cancel": bool(stopped),
        "stopped_turns_kept_fewer_tokens_than_their_budget": all(0 < r["output_tokens"] < budget for r in stopped),
        "other_turns_finished_whole": all(r["output_tokens"] == budget for r in records if r not in stopped),
        "committed_sequence_is_the_replies": tokens == sequence,
        "next_turns_reuse_the_committed_kv": reuse}}


async def run_all(url: str, args) -> dict:
    audio = await audio_turns(url, args.turns)
    cancel = await cancel_turns(url, args.cancels, args.cancel_budget, args.cancel_after_ms)
    checks = {**{f"audio_{k}": v for k, v in audio["checks"].items()},
              **{f"cancel_{k}": v for k, v in cancel["checks"].items()}}
    return {"audio": audio, "cancel": cancel, "checks": checks, "passed": all(checks.values())}


def main() -> int:
    p = benchmark_parser(__doc__, log="/tmp/duplex_smoke_server.log")
    p.add_argument("--url", help="a running server (default: start `sglang-microturn serve`)")
    p.add_argument("--turns", type=int, default=25)
    p.add_argument("--cancels", type=int, default=8)
    p.add_argument("--cancel-budget", type=int, default=256)
    p.add_argument("--cancel-after-ms", type=float, default=20.0)
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            url = stack.enter_context(ServerProcess(serve_argv(args.port, *args.sglang_args), args.port,
                                                    args.log)).url
        result = asyncio.run(run_all(url.rstrip("/"), args))
    write_result(args.out, result)
    print(f"audio p50 {sorted(result['audio']['latency_ms'])[len(result['audio']['latency_ms']) // 2]} ms; "
          f"cancel turns {[(r['finish'], r['output_tokens']) for r in result['cancel']['turns']]}")
    print(f"checks {result['checks']}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
