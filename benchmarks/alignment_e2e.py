"""GPU check of issue 7: trainer-sampler alignment end to end, and what alignment mode costs.

1. Alignment, random shapes (issue 16). On the alignment-mode server, --random-sessions sessions per serving path,
   --sessions at a time, each of --random-turns turns whose chunk length (1..300 input ids) and output budget
   (0..16: 0 = listen only) are drawn at random per turn (--random-seed), greedy, ignore_eos, return_logprob:
     microturn  through /microturn/append (our API)
     session    through SGLang's plain session API (/open_session + /generate with session_params), the
                client rebuilding its sequence from input ids + output_ids and pairing them with
                meta_info.output_token_logprobs (a listen-only turn must report none: patch 0007)
   Each wave's records are then re-scored ALL AT ONCE as one-shot prefills (/generate, logprob_start_len 0),
   so the re-scores share batches and cross chunked-prefill boundaries (8 x 4-6k tokens > 8192). Reported per
   path (`random_shapes`): compared positions, logprob mismatches, token-identity flags (the re-score names
   another token than the record: patch 0008; `sampled_last_vocab_id` counts the positions that bug hit),
   context-length disagreements; and the one-shot re-score
   against the reference trainer (`random_shapes.reference`). Target: 0 of each, >= 20,000 compared
   positions per serving path (defaults: 80 sessions x 34 turns x ~8 tokens ~ 21,800).
1b. Alignment, fixed layout shapes. `sglang-microturn serve --alignment-mode` (the small preset, the serve default) serves --sessions
   concurrent micro-turn sessions of --turns turns each through the /microturn API (layout micro-turns as in
   model_alignment_check.py: pad fill + input block with dMel audio / text + <|out|>, then out_budget = 16
   generated tokens, greedy, ignore_eos so every turn samples its full budget, return_logprob). Every
   session becomes an alignment record (sglang_microturn/alignment/record.py, saved under --log-dir/records)
   and is re-scored the two ways `sglang-microturn align` does (sglang_microturn/alignment/align.py):
     server     one prefill of the whole session on the same server (/generate, logprob_start_len 0)
     reference  the PyTorch reference in aligned mode on this GPU, without SGLang (after the server stops)
   Target: 0 mismatched tokens on both paths (bitwise equal logprobs).
   Seeded sampling (temperature > 0): --sampled-sessions more sessions at temperature 0.8, each with its own
   `seed`, run twice: all at once, then one at a time (other batches around every step). Target: the two
   runs sample the same tokens with the same logprobs, and the first run's records re-score bitwise through
   the server prefill like the greedy ones.
2. Overhead. The micro-turn workload of microturn_latency.py (16 random input ids + 8 generated per turn,
   closed loop) on alignment mode and on the default mode (`sglang-microturn serve`, no flags): throughput at
   --throughput-sessions sessions and p50 latency of one session, after unrecorded warm-up turns. Target:
   within 5 %. Both servers log their compiles and long collections (stall_log); each scenario lists them.

Two server starts (~3 min each: prefill CUDA graphs stay on, as `serve` runs, so that the check covers them;
--cuda-graph-max-bs-decode 64); --skip-overhead skips part 2 and the second start.

    python3 -m benchmarks.alignment_e2e --out benchmarks/results/alignment_e2e_h100.json --log-dir /tmp
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.run_record import write_result
from benchmarks.servers import benchmark_parser, microturn_exe
from benchmarks.workloads import run_ours, synthetic_turns
from sglang_microturn.cli.server_process import ServerProcess

from sglang_microturn.server import stall_log
from sglang_microturn.alignment.align import PathReport, compare, reference_logprobs, server_logprobs
from sglang_microturn.alignment.record import AlignmentRecord, GeneratedToken, record_from_turns, write_record
from sglang_microturn.client import MicroTurnClient
from sglang_microturn.format.layout import DEFAULT_LAYOUT

OVERHEAD_TARGET = 0.05  # alignment mode within 5 % of the default mode
# Both servers' flags beyond `serve`'s defaults: prefill CUDA graphs stay on (the check must cover the path users
# get); decode graphs up to 64 rows (the check's sessions) capture sooner.
E2E_FLAGS = ["--cuda-graph-max-bs-decode", "64"]
# Unrecorded first turns of every overhead session: the first time a batch shape appears a server compiles
# kernels for it (Triton JIT, ~0.5 s); that is start-up cost, not the mode's cost.
WARMUP_TURNS = 20
SAMPLING_TEMPERATURE = 0.8


async def collect_records(url: str, sessions: int, turns: int, model_path: str, temperature: float = 0.0,
                          seed_base: int | None = None, concurrent: bool = True) -> list[AlignmentRecord]:
    """Serve `sessions` layout sessions of `turns` micro-turns (all at once, or one after another); one
    alignment record each. With seed_base, session i samples with seed seed_base + i."""
    client = MicroTurnClient(url, timeout_s=300)
    budget = DEFAULT_LAYOUT.spec.out_budget

    async def one(i: int) -> AlignmentRecord:
        seed = None if seed_base is None else seed_base + i
        session = await client.open(output_budget=budget, ignore_eos=True, temperature=temperature, seed=seed)
        prev = None
        for k, events in enumerate(synthetic_turns(turns, seed=i)):
            reply = await session.append(DEFAULT_LAYOUT.append_ids(events, prev, turn=k), return_logprob=True)
            prev = reply["output_ids"]
        await session.close()
        return record_from_turns(session.turns, model_path)

    try:
        if concurrent:
            return list(await asyncio.gather(*(one(i) for i in range(sessions))))
        return [await one(i) for i in range(sessions)]
    finally:
        await client.close()


CHUNK_RANGE = (1, 300)  # input ids per random turn
BUDGET_RANGE = (0, 16)  # output budget per random turn; 0 = listen only
RANDOM_PATHS = ("microturn", "session")


@dataclass(frozen=True)
class TurnShape:
    input_ids: list[int]
    budget: int


def random_shapes(rng: random.Random, turns: int) -> list[TurnShape]:
    """`turns` turns of random length (CHUNK_RANGE) and budget (BUDGET_RANGE); input ids from the layout's input
    blocks (typed text and dMel: valid inputs of every chunk, never a control id such as BOS)."""
    vocab = DEFAULT_LAYOUT.vocab
    ids = range(vocab.text_in.start, vocab.dmel.stop)
    return [TurnShape([rng.choice(ids) for _ in range(rng.randint(*CHUNK_RANGE))], rng.randint(*BUDGET_RANGE))
            for _ in range(turns)]


def _post(url: str, body: dict, timeout_s: float = 600.0):
    """The reply's JSON; None for an empty body (SGLang's /close_session answers 200 with none)."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        body = resp.read()
    return json.loads(body) if body else None


async def microturn_record(client: MicroTurnClient, shapes: list[TurnShape], model_path: str) -> tuple:
    """One random-shape session through /microturn/append. Returns (record, context disagreements)."""
    session = await client.open(output_budget=0, ignore_eos=True)
    disagreements = 0
    for shape in shapes:
        reply = await session.append(shape.input_ids, shape.budget, return_logprob=True)
        disagreements += reply["server_length"] != reply["committed_length"]
    await session.close()
    return record_from_turns(session.turns, model_path), disagreements


async def session_record(url: str, shapes: list[TurnShape], model_path: str) -> tuple:
    """One random-shape session through SGLang's plain session API, rebuilt as a client must: its input ids, then
    output_ids, each paired with meta_info.output_token_logprobs. Returns (record, disagreements): turns whose
    logprob entries do not name exactly output_ids, or whose prompt_tokens is not the rebuilt length."""
    sid = await asyncio.to_thread(_post, url + "/open_session", {"capacity_of_str_len": 0, "streaming": True})
    seq: list[int] = []
    generated: list[GeneratedToken] = []
    disagreements = 0
    for shape in shapes:
        reply = await asyncio.to_thread(_post, url + "/generate", {
            "input_ids": shape.input_ids, "session_params": {"id": sid}, "return_logprob": True,
            "sampling_params": {"max_new_tokens": shape.budget, "temperature": 0, "ignore_eos": True}})
        meta, out = reply["meta_info"], list(reply["output_ids"])
        seq += shape.input_ids
        lps = meta.get("output_token_logprobs") or []
        disagreements += [int(e[1]) for e in lps] != out or meta["prompt_tokens"] != len(seq)
        for tok, entry in zip(out, lps):
            generated.append(GeneratedToken(len(seq), tok, float(entry[0])))
            seq.append(tok)
    await asyncio.to_thread(_post, url + "/close_session", {"session_id": sid})
    return AlignmentRecord(seq, generated, model_path), disagreements


def rescore(url: str, record: AlignmentRecord) -> list:
    """One-shot prefill of the whole sequence: input_token_logprobs, one (logprob, token id, ...) per position."""
    reply = _post(url + "/generate", {"input_ids": record.sequence, "return_logprob": True, "logprob_start_len": 0,
                                      "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    return reply["meta_info"]["input_token_logprobs"]


def flag_positions(record: AlignmentRecord, entries: list) -> dict:
    """A record against its one-shot re-score: logprob mismatches (bitwise) and token-identity flags."""
    last_id = DEFAULT_LAYOUT.vocab.size - 1  # what SGLang 0.5.17 named token 0 in a re-score (patch 0008)
    out = {"compared": len(record.generated), "mismatched": 0, "token_flagged": 0, "max_abs_diff": 0.0,
           "sampled_last_vocab_id": sum(g.token_id == last_id for g in record.generated), "first_flags": []}
    if len(entries) != len(record.sequence):
        out.update(mismatched=len(record.generated), max_abs_diff=math.inf,
                   first_flags=[{"rescore_length": len(entries), "sequence_length": len(record.sequence)}])
        return out
    for g in record.generated:
        lp, tok = entries[g.position][0], entries[g.position][1]
        value_differs, token_differs = lp != g.logprob, tok != g.token_id
        out["mismatched"] += value_differs
        out["token_flagged"] += token_differs
        if lp is not None:
            out["max_abs_diff"] = max(out["max_abs_diff"], abs(lp - g.logprob))
        if (value_differs or token_differs) and len(out["first_flags"]) < 10:
            out["first_flags"].append({"position": g.position, "token_id": g.token_id, "recorded": g.logprob,
                                       "rescored": lp, "rescored_token": tok})
    return out


def sum_flags(parts: list[dict]) -> dict:
    total = {"sessions": len(parts), "compared": 0, "mismatched": 0, "token_flagged": 0, "max_abs_diff": 0.0,
             "sampled_last_vocab_id": 0, "sessions_flagged": 0, "first_flags": []}
    for p in parts:
        for key in ("compared", "mismatched", "token_flagged", "sampled_last_vocab_id"):
            total[key] += p[key]
        total["max_abs_diff"] = max(total["max_abs_diff"], p["max_abs_diff"])
        total["sessions_flagged"] += bool(p["mismatched"] or p["token_flagged"])
        total["first_flags"] += p["first_flags"][: 10 - len(total["first_flags"])]
    return total


async def collect_random(url: str, sessions: int, concurrency: int, turns: int, seed: int,
                         model_path: str) -> dict:
    """Part 1: `sessions` random-shape sessions per path, `concurrency` at a time; after each wave, its records
    re-scored all at once. Returns {path: {"records", "flags", "disagreements"}}."""
    client = MicroTurnClient(url, timeout_s=600)
    out = {path: {"records": [], "flags": [], "disagreements": 0} for path in RANDOM_PATHS}
    try:
        for path in RANDOM_PATHS:
            rng = random.Random(f"{seed}-{path}")
            for start in range(0, sessions, concurrency):
                wave = [random_shapes(rng, turns) for _ in range(min(concurrency, sessions - start))]
                if path == "microturn":
                    done = await asyncio.gather(*(microturn_record(client, w, model_path) for w in wave))
                else:
                    done = await asyncio.gather(*(session_record(url, w, model_path) for w in wave))
                records = [r for r, _ in done]
                rescored = await asyncio.gather(*(asyncio.to_thread(rescore, url, r) for r in records))
                out[path]["records"] += records
                out[path]["flags"] += [flag_positions(r, e) for r, e in zip(records, rescored)]
                out[path]["disagreements"] += sum(d for _, d in done)
    finally:
        await client.close()
    return out


def random_summary(collected: dict) -> dict:
    """Per serving path: its flags against the one-shot re-score, and its context disagreements."""
    summary = {}
    for path, c in collected.items():
        summary[path] = {**sum_flags(c["flags"]), "context_disagreements": c["disagreements"],
                         "sequence_tokens": sum(len(r.sequence) for r in c["records"])}
    return summary


def replay_differences(first: list[AlignmentRecord], second: list[AlignmentRecord]) -> dict:
    """Two runs of the same seeded sessions: sessions whose sequence or sampled logprobs differ."""
    differing = [i for i, (a, b) in enumerate(zip(first, second))
                 if a.sequence != b.sequence or [g.logprob for g in a.generated] != [g.logprob for g in b.generated]]
    return {"sessions": len(first), "sampled_tokens": sum(len(r.generated) for r in first),
            "sessions_that_differ": differing}


def aggregate(reports: list[PathReport]) -> dict:
    """One path's reports over all sessions."""
    return {
        "compared": sum(r.compared for r in reports),
        "mismatched": sum(r.mismatched for r in reports),
        "max_abs_diff": max((r.max_abs_diff for r in reports), default=0.0),
        "sessions_with_mismatches": sum(1 for r in reports if r.mismatched),
        "first_mismatches": [m for r in reports for m in r.first_mismatches][:10],
    }


def overhead(default: dict, aligned: dict, sessions_key: str, single_key: str) -> dict:
    """Throughput (turns/s over the many-session scenario) and 1-session p50, aligned relative to default."""
    def turns_per_s(r):
        return r["turns"] / r["wall_s"]

    throughput_ratio = turns_per_s(aligned[sessions_key]) / turns_per_s(default[sessions_key])
    p50_ratio = aligned[single_key]["p50_ms"] / default[single_key]["p50_ms"]
    return {
        "throughput_aligned_over_default": round(throughput_ratio, 3),
        "p50_aligned_over_default": round(p50_ratio, 3),
        "throughput_within_target": throughput_ratio >= 1 - OVERHEAD_TARGET,
        "p50_within_target": p50_ratio <= 1 + OVERHEAD_TARGET,
    }


def measure_overhead(url: str, args, server_log: str) -> dict:
    vocab = DEFAULT_LAYOUT.vocab.size
    out = {}
    for sessions, turns in ((1, args.latency_turns), (args.throughput_sessions, args.throughput_turns)):
        out[f"{sessions}x{turns}"] = r = asyncio.run(
            run_ours(url, sessions, turns + WARMUP_TURNS, vocab, WARMUP_TURNS, server_log))
        print(f"  {sessions:2d} x {turns:4d}: {r}", flush=True)
    return out


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; pass 0 to skip")
    return value


def main() -> int:
    p = benchmark_parser(__doc__)
    p.add_argument("--sessions", type=int, default=8, help="concurrent sessions for the alignment check")
    p.add_argument("--turns", type=int, default=200, help="micro-turns per session for the alignment check")
    p.add_argument("--latency-turns", type=int, default=200, help="turns of the 1-session latency scenario")
    p.add_argument("--throughput-sessions", type=int, default=32)
    p.add_argument("--throughput-turns", type=int, default=50)
    p.add_argument("--sampled-sessions", type=non_negative_int, default=4,
                   help="seeded sessions at temperature > 0, each run twice (0: skip)")
    p.add_argument("--random-sessions", type=non_negative_int, default=80,
                   help="random-shape sessions per serving path, --sessions at a time (0: skip)")
    p.add_argument("--random-turns", type=int, default=34, help="turns per random-shape session")
    p.add_argument("--random-seed", type=int, default=16)
    p.add_argument("--model-path", default=None, help="default: the serve default (small preset)")
    p.add_argument("--overhead-only", action="store_true", help="skip the alignment check (part 1)")
    p.add_argument("--skip-overhead", action="store_true",
                   help="skip part 2 (and the default-mode server): realtime_capacity.py compares the two modes")
    args = p.parse_args()

    from sglang_microturn.model.default_model import ensure_default_checkpoint

    exe = microturn_exe()
    model_path = args.model_path or str(ensure_default_checkpoint())
    url = f"http://127.0.0.1:{args.port}"
    log_dir = Path(args.log_dir)
    (log_dir / "records").mkdir(parents=True, exist_ok=True)
    base = [exe, "serve", "--model-path", model_path, "--port", str(args.port), *E2E_FLAGS, *args.sglang_args]
    result: dict = {"model_path": model_path, "flags": E2E_FLAGS + args.sglang_args,
                    "sessions": args.sessions, "turns": args.turns}

    env = dict(os.environ, **{stall_log.ENV: "1"})
    print("alignment mode server", flush=True)
    log = str(log_dir / "server_aligned.log")
    with ServerProcess([*base, "--alignment-mode"], args.port, log, env=env) as server:
        result["aligned_startup_s"] = round(server.startup_s, 1)
        if not args.overhead_only and args.random_sessions:
            random_collected = check_random(url, args, model_path, result)
        if not args.overhead_only:
            records, server_reports = check_server(url, args, model_path, log_dir, result)
            if args.sampled_sessions:
                check_seeded_sampling(url, args, model_path, result)
        if not args.skip_overhead:
            result["overhead_aligned"] = measure_overhead(url, args, log)
    result["aligned_clean_shutdown"] = server.shutdown.get("clean")
    if not args.overhead_only:
        check_reference(records, server_reports, model_path, result)
        if args.random_sessions:
            check_random_reference(random_collected, model_path, result)

    result["checks"] = {}
    if not args.skip_overhead:
        print("default mode server", flush=True)
        log = str(log_dir / "server_default.log")
        with ServerProcess(base, args.port, log, env=env) as server:
            result["default_startup_s"] = round(server.startup_s, 1)
            result["overhead_default"] = measure_overhead(url, args, log)
        result["overhead"] = overhead(result["overhead_default"], result["overhead_aligned"],
                                      f"{args.throughput_sessions}x{args.throughput_turns}",
                                      f"1x{args.latency_turns}")
        result["checks"].update({
            "overhead_throughput_within_5pct": result["overhead"]["throughput_within_target"],
            "overhead_p50_within_5pct": result["overhead"]["p50_within_target"],
        })
    if not args.overhead_only:
        result["checks"].update({
            "server_prefill_bitwise": result["alignment"]["server"]["mismatched"] == 0,
            "reference_bitwise": result["alignment"]["reference"]["mismatched"] == 0,
            "at_least_16000_sampled_tokens": result["sampled_tokens"] >= 16000,
        })
        if args.random_sessions:
            rs = result["random_shapes"]
            for path in RANDOM_PATHS:
                result["checks"].update({
                    f"random_{path}_bitwise": rs[path]["mismatched"] == 0,
                    f"random_{path}_no_token_flags": rs[path]["token_flagged"] == 0,
                    f"random_{path}_context_agrees": rs[path]["context_disagreements"] == 0,
                    f"random_{path}_at_least_20000_positions": rs[path]["compared"] >= 20000,
                })
            result["checks"]["random_reference_bitwise"] = rs["reference"]["mismatched"] == 0
        if args.sampled_sessions:
            seeded = result["seeded_sampling"]
            result["checks"].update({
                "seeded_sampling_replays": not seeded["replay"]["sessions_that_differ"],
                "seeded_sampling_server_prefill_bitwise": seeded["server"]["mismatched"] == 0,
            })
    write_result(args.out, result)
    print("overhead:", result.get("overhead"))
    print("checks:", result["checks"])
    bitwise = ("server_prefill_bitwise", "reference_bitwise", "seeded_sampling_replays",
               "seeded_sampling_server_prefill_bitwise", "random_reference_bitwise",
               *(f"random_{path}_{what}" for path in RANDOM_PATHS
                 for what in ("bitwise", "no_token_flags", "context_agrees")))
    return 0 if all(result["checks"].get(name, True) for name in bitwise) else 1


def check_server(url: str, args, model_path: str, log_dir: Path, result: dict):
    """Part 1 on the running alignment-mode server: collect the sessions, re-score each as one prefill."""
    t0 = time.perf_counter()
    records = asyncio.run(collect_records(url, args.sessions, args.turns, model_path))
    result["collect_s"] = round(time.perf_counter() - t0, 1)
    for i, rec in enumerate(records):
        write_record(log_dir / "records" / f"session_{i}.json", rec)
    result["sampled_tokens"] = sum(len(r.generated) for r in records)
    result["sequence_tokens"] = [len(r.sequence) for r in records]
    print(f"  {result['sampled_tokens']} sampled tokens in {result['collect_s']} s", flush=True)
    t0 = time.perf_counter()
    server_reports = [compare("server", r, server_logprobs(r, url)) for r in records]
    result["server_rescore_s"] = round(time.perf_counter() - t0, 1)
    return records, server_reports


def check_random(url: str, args, model_path: str, result: dict) -> dict:
    """Part 1, random shapes, on the running alignment-mode server."""
    t0 = time.perf_counter()
    collected = asyncio.run(collect_random(url, args.random_sessions, args.sessions, args.random_turns,
                                           args.random_seed, model_path))
    result["random_shapes"] = {"chunk_range": CHUNK_RANGE, "budget_range": BUDGET_RANGE,
                               "sessions_per_path": args.random_sessions, "concurrency": args.sessions,
                               "turns": args.random_turns, "seed": args.random_seed,
                               "collect_and_rescore_s": round(time.perf_counter() - t0, 1),
                               **random_summary(collected)}
    for path in RANDOM_PATHS:
        r = result["random_shapes"][path]
        print(f"  random {path}: compared {r['compared']} mismatched {r['mismatched']} token flags "
              f"{r['token_flagged']} context disagreements {r['context_disagreements']}", flush=True)
    return collected


def check_random_reference(collected: dict, model_path: str, result: dict) -> None:
    """The one-shot re-score path against the trainer: every random record through the reference."""
    reports = [compare("reference", r, reference_logprobs(r, model_path, "cuda"))
               for c in collected.values() for r in c["records"]]
    result["random_shapes"]["reference"] = aggregate(reports)


def check_seeded_sampling(url: str, args, model_path: str, result: dict) -> None:
    """Part 1, temperature > 0: the seeded sessions twice (together, then alone), and a server re-score."""
    n, turns = args.sampled_sessions, args.turns
    together = asyncio.run(collect_records(url, n, turns, model_path, SAMPLING_TEMPERATURE, seed_base=7000))
    alone = asyncio.run(collect_records(url, n, turns, model_path, SAMPLING_TEMPERATURE, seed_base=7000,
                                        concurrent=False))
    result["seeded_sampling"] = {
        "temperature": SAMPLING_TEMPERATURE,
        "replay": replay_differences(together, alone),
        "server": aggregate([compare("server", r, server_logprobs(r, url)) for r in together]),
    }
    print(f"  seeded sampling: {result['seeded_sampling']}", flush=True)


def check_reference(records, server_reports, model_path: str, result: dict) -> None:
    """Part 1, trainer side, once the server is gone and the GPU is free."""
    t0 = time.perf_counter()
    reference_reports = [compare("reference", r, reference_logprobs(r, model_path, "cuda")) for r in records]
    result["reference_rescore_s"] = round(time.perf_counter() - t0, 1)
    result["alignment"] = {"server": aggregate(server_reports), "reference": aggregate(reference_reports)}
    for path, agg in result["alignment"].items():
        print(f"  {path}: compared {agg['compared']} mismatched {agg['mismatched']} max |diff| "
              f"{agg['max_abs_diff']:.3g}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
