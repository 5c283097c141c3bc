"""MoE decode: microturn gather + GEMV kernels vs SGLang 0.5.17's fused MoE, side by side in one run.

    python3 -m benchmarks.moe_decode --out benchmarks/results/moe_decode_<card>.json
    python3 -m benchmarks.moe_decode --sweep --out benchmarks/results/moe_sweep_<card>.json

Needs CUDA and SGLang (exit 2 without CUDA). Per shape (E, top-k, D hidden, I width) and M tokens, times with
CUDA graphs (N calls captured in one graph, median over replays): SGLang's `fused_experts` called as its
Triton MoE runner calls it (its tuned config for this card when SGLang ships one, else its default), our
`moe_gemv`, and our aligned entry point. Routing is random with a fixed seed and rotates among several sets
per graph so consecutive calls touch different experts (only touched experts are read at small M). Also
measures the card's pure-read and copy bandwidth, correctness at real shapes (vs an fp32 reference), bitwise
batch invariance, and the alignment mode's cost at prefill sizes. Writes JSON; prints a table.

--sweep instead times, per shape and decode M, SGLang and a grid of MoeGemvConfig tiles (one kernel's fields
varied at a time around the table config, then the best of each merged), checks each config once (fp32
reference error, bitwise batch invariance), and rewrites the JSON after every step within --budget-s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks import moe_timing
from benchmarks.moe_shapes import DOWN_FIELDS, FLAG_FIELDS, GATE_UP_FIELDS, selected_shapes, sweep_candidates
from benchmarks.moe_timing import (
    CALLS_PER_GRAPH, REPLAYS, ROUTING_SETS, expert_weights, read_kernel, setup_sglang, time_graph,
)
from benchmarks.run_record import write_result

DECODE_M = [1, 2, 4, 8, 16, 32]
PREFILL_M = [128, 1024]  # alignment-mode cost at prefill sizes
DEVICE = "cuda"  # the sweep's tensors; tests/benchmarks/test_moe_sweep.py dry-runs its plumbing on the CPU


# ------------------------------------------------------------------------------------------ timing
def time_eager(fn, reps=3) -> float:
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def measure_bandwidth() -> dict:
    import triton

    n = 2 * 1024**3  # 4 GiB of bf16
    x = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    results = {"buffer_bytes": n * 2}
    best = 0.0
    for block, steps, warps in [(4096, 4, 8), (8192, 2, 8), (2048, 8, 4)]:
        grid = triton.cdiv(n, block * steps)
        partial = torch.empty(grid, device="cuda", dtype=torch.float32)
        us = time_graph(lambda i: read_kernel[(grid,)](x, partial, n, BLOCK=block, STEPS=steps, num_warps=warps),
                        calls=4, replays=5)  # fmt: skip
        tbps = n * 2 / us / 1e6
        results[f"triton_read_B{block}_S{steps}_W{warps}_TBps"] = round(tbps, 3)
        best = max(best, tbps)
    out = torch.empty(1, device="cuda", dtype=torch.float32)
    row = x.view(1, -1)
    us = time_graph(lambda i: torch.sum(row, dim=1, dtype=torch.float32, out=out), calls=4, replays=5)
    results["torch_sum_read_TBps"] = round(n * 2 / us / 1e6, 3)
    best = max(best, results["torch_sum_read_TBps"])
    half = x[: n // 2]
    dst = torch.empty_like(half)
    us = time_graph(lambda i: dst.copy_(half), calls=4, replays=5)
    results["copy_TBps_read_plus_write"] = round(2 * half.numel() * 2 / us / 1e6, 3)
    results["pure_read_TBps"] = round(best, 3)
    del x, dst
    torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------------------- one shape
def routing(M, E, K, seed):
    return moe_timing.routing(M, E, K, seed, device=DEVICE)


def bench_shape(E, K, D, I, args, bw_read) -> dict:
    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe import fused_experts
    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config import get_moe_configs
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from microturn_kernels.moe_gemv import moe_gemv, moe_gemv_aligned, moe_gemv_config
    from microturn_kernels.moe_reference import moe_reference

    w13, w2, expert_bytes, cfg = expert_weights(E, K, D, I)
    tuned = get_moe_configs(E, I, None)
    row = {
        "E": E, "K": K, "D": D, "I": I, "expert_bytes": expert_bytes,
        "sglang_config": "tuned" if tuned else "default (no tuned file for this card)",
        "ours_config": moe_gemv_config(D, I).__dict__, "decode": [], "prefill_aligned": [],
    }  # fmt: skip

    for M in DECODE_M:
        x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
        sets = [routing(M, E, K, seed=1000 * M + s) for s in range(ROUTING_SETS)]
        topk = [StandardTopKOutput(w, i, l) for w, i, l in sets]
        distinct = statistics.mean(len(torch.unique(i)) for _, i, _ in sets)
        read_bytes = distinct * expert_bytes

        def sglang_call(i):
            return fused_experts(hidden_states=x, w1=w13, w2=w2, topk_output=topk[i % ROUTING_SETS], moe_runner_config=cfg)

        outs = [torch.empty_like(x) for _ in range(ROUTING_SETS)]

        def ours_call(i):
            w, ids, _ = sets[i % ROUTING_SETS]
            return moe_gemv(x, w13, w2, w, ids, out=outs[i % ROUTING_SETS])

        def aligned_call(i):
            w, ids, _ = sets[i % ROUTING_SETS]
            return moe_gemv_aligned(x, w13, w2, w, ids, out=outs[i % ROUTING_SETS])

        t_sgl = time_graph(sglang_call)
        t_ours = time_graph(ours_call)
        t_al = time_graph(aligned_call)
        entry = {
            "M": M, "distinct_experts": distinct, "read_MB": round(read_bytes / 1e6, 2),
            "sglang_us": round(t_sgl, 2), "ours_us": round(t_ours, 2), "aligned_us": round(t_al, 2),
            "speedup_vs_sglang": round(t_sgl / t_ours, 3),
            "ours_read_TBps": round(read_bytes / t_ours / 1e6, 3),
            "sglang_read_TBps": round(read_bytes / t_sgl / 1e6, 3),
            "ours_pct_of_pure_read": round(100 * read_bytes / t_ours / 1e6 / bw_read, 1),
        }  # fmt: skip
        row["decode"].append(entry)
        print(f"  E={E} K={K} D={D} I={I} M={M}: sglang {t_sgl:.1f} us, ours {t_ours:.1f} us", flush=True)

    # correctness at real shapes: ours and SGLang vs the fp32 reference, a few tokens
    M = 16
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    w, ids, logits = routing(M, E, K, seed=7)
    ours = moe_gemv(x, w13, w2, w, ids)
    sgl = fused_experts(hidden_states=x, w1=w13, w2=w2, topk_output=StandardTopKOutput(w, ids, logits), moe_runner_config=cfg)
    sub = slice(0, 2)
    ref32 = moe_reference(x[sub], w13, w2, w[sub], ids[sub], kernel_rounding=False, out_dtype=torch.float32)
    refk = moe_reference(x[sub], w13, w2, w[sub], ids[sub], kernel_rounding=True, out_dtype=torch.float32)

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    alone = [torch.equal(moe_gemv(x[m : m + 1], w13, w2, w[m : m + 1], ids[m : m + 1]), ours[m : m + 1]) for m in range(M)]
    reps = PREFILL_M[0] // M
    big = moe_gemv_aligned(x.repeat(reps, 1), w13, w2, w.repeat(reps, 1), ids.repeat(reps, 1))
    row["correctness"] = {
        "ours_rel_err_vs_fp32": rel(ours[sub], ref32),
        "sglang_rel_err_vs_fp32": rel(sgl[sub], ref32),
        "ours_rel_err_vs_kernel_rounding_ref": rel(ours[sub], refk),
        "ours_max_abs_err_vs_kernel_rounding_ref": float((ours[sub].float() - refk).abs().max()),
        "ours_vs_sglang_rel": rel(ours, sgl.float()),
        "batch_invariant_tokens": f"{sum(alone)}/{M}",
        "aligned_M128_equals_decode": bool(torch.equal(big[-M:], ours)),
    }
    del ref32, refk

    # alignment mode's cost at prefill sizes: our kernels vs SGLang's grouped GEMM (eager, large M)
    for M in PREFILL_M:
        x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
        w, ids, logits = routing(M, E, K, seed=M)
        tk = StandardTopKOutput(w, ids, logits)
        t_sgl = time_eager(lambda: fused_experts(hidden_states=x, w1=w13, w2=w2, topk_output=tk, moe_runner_config=cfg))
        t_al = time_eager(lambda: moe_gemv_aligned(x, w13, w2, w, ids))
        row["prefill_aligned"].append({"M": M, "sglang_us": round(t_sgl, 1), "aligned_us": round(t_al, 1),
                                       "cost_x": round(t_al / t_sgl, 2)})  # fmt: skip
        print(f"  prefill M={M}: sglang {t_sgl:.0f} us, aligned {t_al:.0f} us", flush=True)

    del w13, w2
    torch.cuda.empty_cache()
    return row



# ------------------------------------------------------------------------------------------ sweep
# Fields of MoeGemvConfig that belong to each kernel, and the launch-level flags. The sweep varies one group
# at a time around the shape's table config (the other groups fixed), so a few dozen timings cover it; the
# best of each group are then merged into one config per shape and timed at every M.
SWEEP_M_FOR_RANKING = [1, 2, 4, 8, 16]  # a config's score: geometric mean of its time / default's over these
SWEEP_REPLAYS = 5


def merge_best(base, timed):
    """The base config with each group's fields taken from that group's best-scoring config, if it beat base.

    timed: list of (group, config, score) with score = geometric-mean time ratio to base (lower is better).
    """
    from dataclasses import replace

    merged = {}
    for group, fields in (("gate_up", GATE_UP_FIELDS), ("down", DOWN_FIELDS), ("flags", FLAG_FIELDS)):
        scored = [(score, cfg) for g, cfg, score in timed if g == group and score is not None and score < 1.0]
        if scored:
            best = min(scored, key=lambda sc: sc[0])[1]
            merged.update({f: getattr(best, f) for f in fields})
    return replace(base, **merged)


def check_config(cfg, x, w13, w2, sets, ref32, moe_gemv) -> dict:
    """Eager run at the check batch: error vs the fp32 reference (first 2 tokens), bitwise batch invariance
    (first and last token alone vs in the batch), bitwise equality with the default config's output."""
    w, ids, _ = sets[0]
    out = moe_gemv(x, w13, w2, w, ids, config=cfg)
    last = x.shape[0] - 1
    alone = [torch.equal(moe_gemv(x[m : m + 1], w13, w2, w[m : m + 1], ids[m : m + 1], config=cfg), out[m : m + 1])
             for m in (0, last)]  # fmt: skip
    torch.cuda.synchronize()
    rel = float((out[:2].float() - ref32).norm() / ref32.norm())
    return {"rel_err_vs_fp32": rel, "batch_invariant": all(alone), "ok": rel < 1e-2 and all(alone), "out": out}


def sweep_shape(E, K, D, I, bw_read, deadline, record) -> dict:
    """Times SGLang and every candidate config at each decode M; `record()` saves progress after each M.

    Stops starting new timings past `deadline` (time.time()); whatever was measured stays in the row.
    """
    from dataclasses import asdict

    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe import fused_experts
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from microturn_kernels.moe_gemv import moe_gemv, moe_gemv_config
    from microturn_kernels.moe_reference import moe_reference

    w13, w2, expert_bytes, moe_cfg = expert_weights(E, K, D, I, device=DEVICE)
    base = moe_gemv_config(D, I)
    row = {"E": E, "K": K, "D": D, "I": I, "expert_bytes": expert_bytes, "default_config": asdict(base),
           "configs": [], "decode": []}  # fmt: skip

    # Check every candidate once (compiles it too); a config that fails to compile or launch is dropped.
    x8 = torch.randn(8, D, device=DEVICE, dtype=torch.bfloat16)
    sets8 = [routing(8, E, K, seed=77)]
    ref32 = moe_reference(x8[:2], w13, w2, sets8[0][0][:2], sets8[0][1][:2], kernel_rounding=False,
                          out_dtype=torch.float32)  # fmt: skip
    candidates, base_out = [], None
    for group, cfg in sweep_candidates(base):
        entry = {"id": len(row["configs"]), "group": group, **asdict(cfg)}
        if time.time() > deadline:
            entry["error"] = "skipped: time budget spent"
            row["configs"].append(entry)
            continue
        try:
            check = check_config(cfg, x8, w13, w2, sets8, ref32, moe_gemv)
            out = check.pop("out")
            base_out = out if base_out is None else base_out
            entry.update(check, bitwise_equal_default=bool(torch.equal(out, base_out)))
            if check["ok"]:
                candidates.append((entry["id"], group, cfg))
        except Exception as exc:  # e.g. out of shared memory or registers for this tile: skip the config
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            torch.cuda.synchronize()
        row["configs"].append(entry)
    record()

    def time_configs(x, sets, configs):
        outs = [torch.empty_like(x) for _ in range(ROUTING_SETS)]
        times = {}
        for cid, _, cfg in configs:
            if time.time() > deadline:
                break

            def ours_call(i, cfg=cfg):
                w, ids, _ = sets[i % ROUTING_SETS]
                return moe_gemv(x, w13, w2, w, ids, out=outs[i % ROUTING_SETS], config=cfg)

            try:
                times[cid] = round(time_graph(ours_call, replays=SWEEP_REPLAYS), 2)
            except Exception as exc:
                times[cid] = f"{type(exc).__name__}: {str(exc)[:200]}"
                torch.cuda.synchronize()
        return times

    data = {}  # M -> (x, routing sets), kept for timing the merged config
    for M in DECODE_M:
        x = torch.randn(M, D, device=DEVICE, dtype=torch.bfloat16)
        sets = [routing(M, E, K, seed=1000 * M + s) for s in range(ROUTING_SETS)]
        topk = [StandardTopKOutput(w, i, l) for w, i, l in sets]
        read_bytes = statistics.mean(len(torch.unique(i)) for _, i, _ in sets) * expert_bytes
        data[M] = (x, sets)
        t_sgl = time_graph(lambda i: fused_experts(hidden_states=x, w1=w13, w2=w2, topk_output=topk[i % ROUTING_SETS],
                                                   moe_runner_config=moe_cfg), replays=SWEEP_REPLAYS)  # fmt: skip
        times = time_configs(x, sets, candidates)
        row["decode"].append({"M": M, "read_MB": round(read_bytes / 1e6, 2), "sglang_us": round(t_sgl, 2),
                              "config_us": times})  # fmt: skip
        record()
        print(f"  sweep E={E} M={M}: sglang {t_sgl:.1f} us, {len(times)} configs, "
              f"best {min((t for t in times.values() if isinstance(t, float)), default=None)} us", flush=True)

    # Score each config against the default over the ranking Ms, merge the best of each group, time it.
    def score(cid):
        ratios = []
        for d in row["decode"]:
            t, t0 = d["config_us"].get(cid), d["config_us"].get(0)
            if d["M"] in SWEEP_M_FOR_RANKING and isinstance(t, float) and isinstance(t0, float):
                ratios.append(t / t0)
        return statistics.geometric_mean(ratios) if len(ratios) == len(SWEEP_M_FOR_RANKING) else None

    timed = [(group, cfg, score(cid)) for cid, group, cfg in candidates]
    for (cid, _, _), (_, _, sc) in zip(candidates, timed):
        row["configs"][cid]["score_vs_default"] = None if sc is None else round(sc, 4)
    merged = merge_best(base, timed)
    known = {cfg: cid for cid, _, cfg in candidates}
    if merged not in known and time.time() < deadline:
        entry = {"id": len(row["configs"]), "group": "merged", **asdict(merged)}
        try:
            check = check_config(merged, x8, w13, w2, sets8, ref32, moe_gemv)
            check.pop("out")
            entry.update(check)
            if check["ok"]:
                for d in row["decode"]:
                    d["config_us"].update(time_configs(*data[d["M"]], [(entry["id"], "merged", merged)]))
                known[merged] = entry["id"]
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        row["configs"].append(entry)
    row["merged_config_id"] = known.get(merged)

    for d in row["decode"]:
        ok = {cid: t for cid, t in d["config_us"].items() if isinstance(t, float)}
        if not ok:
            continue
        best = min(ok, key=ok.get)
        d["best"] = {"config_id": best, "us": ok[best], "speedup_vs_sglang": round(d["sglang_us"] / ok[best], 3),
                     "pct_of_pure_read": round(100 * d["read_MB"] / ok[best] / bw_read, 1)}  # fmt: skip
        for name, cid in (("default", 0), ("merged", row["merged_config_id"])):
            if isinstance(d["config_us"].get(cid), float):
                t = d["config_us"][cid]
                d[name] = {"us": t, "speedup_vs_sglang": round(d["sglang_us"] / t, 3),
                           "pct_of_pure_read": round(100 * d["read_MB"] / t / bw_read, 1)}  # fmt: skip
    row["deployable"] = deployable_summary(row)
    return row


def deployable_summary(row) -> dict:
    """What one config per shape (the merged one, else the table's) achieves: the issue's targets per shape and
    the largest M up to which it is never slower than SGLang (input for MICROTURN_MOE_GEMV_MAX_TOKENS)."""
    name = "merged" if all("merged" in d for d in row["decode"]) else "default"
    points = [(d["M"], d[name]) for d in row["decode"] if name in d]
    wins_up_to = 0
    for M, p in points:
        if p["speedup_vs_sglang"] < 1.0:
            break
        wins_up_to = M
    return {
        "config": name,
        "never_slower_than_sglang_up_to_M": wins_up_to,
        "speedup_M1": next((p["speedup_vs_sglang"] for M, p in points if M == 1), None),
        "min_pct_of_pure_read_M1_to_8": min((p["pct_of_pure_read"] for M, p in points if M <= 8), default=None),
    }


def run_sweep(args) -> int:
    """--sweep: bandwidth, then per shape SGLang and the config grid at every decode M; JSON after each step."""
    import triton

    import sglang

    t_start = time.time()
    result = {
        "benchmark": "moe_decode_sweep",
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "sglang": sglang.__version__},
        "method": f"CUDA graph of {CALLS_PER_GRAPH} calls rotating {ROUTING_SETS} random routings, median of "
        f"{SWEEP_REPLAYS} replays; config ids index shapes[].configs; score = geometric mean over M in "
        f"{SWEEP_M_FOR_RANKING} of time / default config's time",
        "complete": False,
        "shapes": [],
    }

    def record():
        result["wall_s"] = round(time.time() - t_start, 1)
        write_result(args.out, result)

    result["bandwidth"] = measure_bandwidth()
    record()
    print(f"bandwidth: {result['bandwidth']}", flush=True)
    shapes = selected_shapes(args)
    for n, shape in enumerate(shapes):
        # Each shape gets an equal share of the time left, so a slow one cannot starve the rest.
        deadline = time.time() + (t_start + args.budget_s - time.time()) / (len(shapes) - n)
        try:
            result["shapes"].append(sweep_shape(*shape, result["bandwidth"]["pure_read_TBps"], deadline, record))
        except Exception as exc:  # keep the other shapes' numbers (a sticky CUDA error fails the rest too)
            result["shapes"].append({"shape": shape, "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
        record()
    result["complete"] = True
    record()
    print_sweep(result)
    print(f"wrote {args.out} ({result['wall_s']} s)")
    return 0


def print_sweep(result) -> None:
    print(f"\n{'shape (E,K,D,I)':<20}{'M':>4}{'sglang':>9}{'default':>9}{'merged':>9}{'best':>9}{'id':>4}"
          f"{'x sgl':>7}{'%read':>7}")  # fmt: skip
    for r in result["shapes"]:
        if "decode" not in r:
            print(f"{str(r.get('shape')):<20} failed: {r.get('error')}")
            continue
        for d in r["decode"]:
            b = d.get("best", {})
            print(f"{r['E']},{r['K']},{r['D']},{r['I']:<9}{d['M']:>4}{d['sglang_us']:>9}"
                  f"{d.get('default', {}).get('us', '-'):>9}{d.get('merged', {}).get('us', '-'):>9}"
                  f"{b.get('us', '-'):>9}{b.get('config_id', '-'):>4}{b.get('speedup_vs_sglang', '-'):>7}"
                  f"{b.get('pct_of_pure_read', '-'):>7}")  # fmt: skip
        merged = r.get("merged_config_id")
        print(f"  merged config (id {merged}): {r['configs'][merged] if merged is not None else 'none'}")
        print(f"  one config per shape: {r['deployable']}")

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON path, e.g. benchmarks/results/moe_decode_h100.json")
    parser.add_argument("--sweep", action="store_true",
                        help="instead of the benchmark: time SGLang and a grid of tile configs at every decode M")
    parser.add_argument("--budget-s", type=float, default=210.0, help="--sweep stops new timings after this")
    parser.add_argument("--shapes", default="all", help="comma-separated shape indices 0,1,2 (default all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_decode.py: no CUDA device; this benchmark runs on a GPU only", file=sys.stderr)
        return 2
    setup_sglang()
    if args.sweep:
        return run_sweep(args)
    t_start = time.time()
    bw = measure_bandwidth()
    print(f"bandwidth: {bw}", flush=True)
    rows = [bench_shape(*s, args, bw["pure_read_TBps"]) for s in selected_shapes(args)]

    first = rows[0]["decode"][0] if rows and rows[0]["E"] == 128 else None
    targets = {
        "speedup_M1_first_shape_ge_1.5": None if first is None else first["speedup_vs_sglang"] >= 1.5,
        "never_slower_M_le_16": all(d["speedup_vs_sglang"] >= 1.0 for r in rows for d in r["decode"] if d["M"] <= 16),
        "pct_pure_read_ge_90_M1_to_8": all(d["ours_pct_of_pure_read"] >= 90 for r in rows for d in r["decode"] if d["M"] <= 8),
    }  # fmt: skip
    import triton

    import sglang

    result = {
        "benchmark": "moe_decode",
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "sglang": sglang.__version__},
        "method": f"CUDA graph of {CALLS_PER_GRAPH} calls rotating {ROUTING_SETS} random routings, median of "
        f"{REPLAYS} replays; read TB/s = distinct experts' weight bytes / time; prefill rows eager, median of 3",
        "bandwidth": bw,
        "shapes": rows,
        "targets": targets,
        "wall_s": round(time.time() - t_start, 1),
    }
    out = write_result(args.out, result)

    print(f"\n{torch.cuda.get_device_name()}: pure read {bw['pure_read_TBps']} TB/s, copy {bw['copy_TBps_read_plus_write']} TB/s")
    print(f"{'shape (E,K,D,I)':<22}{'M':>4}{'sglang us':>11}{'ours us':>9}{'aligned':>9}{'speedup':>9}{'TB/s':>7}{'%read':>7}")
    for r in rows:
        for d in r["decode"]:
            shape = f"{r['E']},{r['K']},{r['D']},{r['I']}"
            print(f"{shape:<22}{d['M']:>4}{d['sglang_us']:>11}{d['ours_us']:>9}{d['aligned_us']:>9}"
                  f"{d['speedup_vs_sglang']:>9}{d['ours_read_TBps']:>7}{d['ours_pct_of_pure_read']:>7}")  # fmt: skip
        for p in r["prefill_aligned"]:
            print(f"{'':<22}{p['M']:>4}{p['sglang_us']:>11}{'':>9}{p['aligned_us']:>9}  aligned cost x{p['cost_x']}")
        print(f"{'':<22}correctness: {r['correctness']}")
    print(f"targets: {targets}\nwrote {out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
