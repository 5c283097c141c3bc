"""GPU check of multi-step decode (patch 0011): the tokens of a run of k decode steps are the tokens of k
single steps.

One `sglang-microturn serve` (default: alignment mode, whose kernels are batch-invariant, so sessions may share
batches freely) runs the same scripted sessions twice: once without logprobs, where the scheduler runs up to
`--num-continuous-decode-steps` steps per iteration, and once with `return_logprob`, which makes every batch
that holds such a turn take one step at a time (Scheduler.decode_num_steps). Greedy; random chunk sizes and
output budgets; in a second round each session stops at a token id that the first round saw it emit
mid-turn, so stops land inside runs. Every turn's output ids and committed lengths must be equal.

    python3 -m benchmarks.multistep_check --out benchmarks/results/multistep_check_h200.json [-- serve flags]
"""

from __future__ import annotations

import asyncio
import random
import sys

from benchmarks.run_record import write_result
from benchmarks.servers import benchmark_parser, serve_argv
from sglang_microturn.cli.server_process import ServerProcess
from sglang_microturn.client import MicroTurnClient
from sglang_microturn.model.checkpoints import preset

FIRST_INPUT_ID = 100  # clear of the control ids, as the other benchmarks


def scripts(sessions: int, turns: int, vocab: int, seed: int) -> list[list[tuple[list[int], int]]]:
    """Per session, its turns: (input ids, output budget); chunks of 1..120 ids, budgets 1..16."""
    rng = random.Random(seed)
    return [[([rng.randrange(FIRST_INPUT_ID, vocab) for _ in range(rng.randint(1, 120))], rng.randint(1, 16))
             for _ in range(turns)] for _ in range(sessions)]


async def play(url: str, plan, logprob: bool, stop_ids: list[list[int]]) -> list[list[dict]]:
    """Every session of `plan` at once, its turns in order; each turn's output ids and committed length."""
    async with MicroTurnClient(url, timeout_s=120) as client:
        async def one(turns, stops):
            session = await client.open(output_budget=16, stop_ids=stops, temperature=0.0)
            out = []
            for ids, budget in turns:
                reply = await session.append(ids, budget, return_logprob=logprob)
                out.append({"output_ids": reply["output_ids"], "committed_length": reply["committed_length"]})
            await session.close()
            return out
        return await asyncio.gather(*(one(t, s) for t, s in zip(plan, stop_ids)))


def mid_turn_stop(rounds: list[dict]) -> list[int]:
    """A token a session emitted in the middle of a long turn: stopping there ends a run early."""
    for turn in rounds:
        ids = turn["output_ids"]
        if len(ids) >= 8:
            return [ids[len(ids) // 2]]
    return []


def compare(multi, single) -> dict:
    turns = sum(len(s) for s in multi)
    differ = [(i, j) for i, (a, b) in enumerate(zip(multi, single)) for j, (x, y) in enumerate(zip(a, b)) if x != y]
    return {"turns": turns, "tokens": sum(len(t["output_ids"]) for s in multi for t in s),
            "turns_that_differ": len(differ), "first_differences": differ[:5]}


def run(args) -> dict:
    argv = serve_argv(args.port, *args.sglang_args)
    plan = scripts(args.sessions, args.turns, args.vocab, args.seed)
    url = f"http://127.0.0.1:{args.port}"
    rounds = {}
    with ServerProcess(argv, args.port, args.log) as server:
        no_stops = [[] for _ in plan]
        multi = asyncio.run(play(url, plan, False, no_stops))
        single = asyncio.run(play(url, plan, True, no_stops))
        rounds["no_stop_ids"] = compare(multi, single)
        stops = [mid_turn_stop(s) for s in single]
        multi = asyncio.run(play(url, plan, False, stops))
        single = asyncio.run(play(url, plan, True, stops))
        rounds["stop_inside_runs"] = compare(multi, single) | {
            "sessions_with_a_stop_id": sum(bool(s) for s in stops),
            "turns_ended_by_the_stop": sum(bool(s) and t["output_ids"][-1:] == s
                                           for st, s in zip(single, stops) for t in st)}
    passed = all(r["turns_that_differ"] == 0 for r in rounds.values())
    return {"serve_argv": argv[1:], "sessions": args.sessions, "turns_per_session": args.turns, "rounds": rounds,
            "shutdown": server.shutdown, "passed": passed}


def main() -> int:
    p = benchmark_parser(__doc__, log="/tmp/multistep_check_server.log")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--turns", type=int, default=30)
    p.add_argument("--vocab", type=int, default=None, help="input ids are drawn below this (default: the default"
                   " model's vocabulary)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not args.sglang_args:
        args.sglang_args = ["--alignment-mode"]
    if args.vocab is None:
        args.vocab = preset("small").vocab_size  # serve's default model
    result = run(args)
    write_result(args.out, result)
    for name, r in result["rounds"].items():
        print(f"{name}: {r}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
