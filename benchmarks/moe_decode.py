"""MoE decode: microturn gather + GEMV kernels vs SGLang 0.5.17's fused MoE, side by side in one run.

    python3 benchmarks/moe_decode.py --out benchmarks/results/moe_decode_<card>.json [--sweep]

Needs CUDA and SGLang (exit 2 without CUDA). Per shape (E, top-k, D hidden, I width) and M tokens, times with
CUDA graphs (N calls captured in one graph, median over replays): SGLang's `fused_experts` called as its
Triton MoE runner calls it (its tuned config for this card when SGLang ships one, else its default), our
`moe_gemv`, and our aligned entry point. Routing is random with a fixed seed and rotates among several sets
per graph so consecutive calls touch different experts (only touched experts are read at small M). Also
measures the card's pure-read and copy bandwidth, correctness at real shapes (vs an fp32 reference), bitwise
batch invariance, and the alignment mode's cost at prefill sizes. Writes JSON; prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_record import write_result  # noqa: E402

SHAPES = [(128, 8, 2048, 768), (8, 2, 4096, 14336), (256, 6, 4096, 2048)]  # (E, K, D, I)
DECODE_M = [1, 2, 4, 8, 16, 32]
PREFILL_M = [128, 1024]  # alignment-mode cost at prefill sizes
ROUTING_SETS = 8
CALLS_PER_GRAPH = 16
REPLAYS = 7


def setup_sglang():
    from sglang.srt.runtime_context import get_context

    get_context().override_server_args().install()
    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel

    init_distributed_environment(
        world_size=1, rank=0, local_rank=0, distributed_init_method="tcp://127.0.0.1:29555", backend="nccl"
    )
    initialize_model_parallel(1)


# ------------------------------------------------------------------------------------------ timing
def time_graph(fn_for_call, calls=CALLS_PER_GRAPH, replays=REPLAYS) -> float:
    """Median microseconds per call: `calls` calls (fn_for_call(i)) captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(min(calls, ROUTING_SETS)):  # compile, autotune caches, torch.compile warm-up
            fn_for_call(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn_for_call(i)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(samples)


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
    import triton.language as tl

    @triton.jit
    def read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, STEPS: tl.constexpr):
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        base = pid.to(tl.int64) * BLOCK * STEPS
        for s in tl.static_range(STEPS):
            offs = base + s * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc, axis=0))

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
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(M, E, device="cuda", generator=g)
    weights, ids = torch.topk(logits.softmax(-1), K, dim=-1)
    return weights.contiguous(), ids.to(torch.int32).contiguous(), logits


def bench_shape(E, K, D, I, args, bw_read) -> dict:
    from sglang.srt.layers.moe.moe_runner.base import MoeRunnerConfig
    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe import fused_experts
    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config import get_moe_configs
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from microturn_kernels.moe_gemv import MoeGemvConfig, moe_gemv, moe_gemv_aligned, moe_gemv_config
    from microturn_kernels.moe_reference import moe_reference

    torch.manual_seed(0)
    w13 = torch.randn(E, 2 * I, D, device="cuda", dtype=torch.bfloat16).mul_(D**-0.5)
    w2 = torch.randn(E, D, I, device="cuda", dtype=torch.bfloat16).mul_(I**-0.5)
    expert_bytes = (w13[0].numel() + w2[0].numel()) * 2
    cfg = MoeRunnerConfig(
        num_experts=E, num_local_experts=E, hidden_size=D, intermediate_size_per_partition=I, top_k=K,
        params_dtype=torch.bfloat16, activation="silu", is_gated=True, inplace=False,
    )  # fmt: skip
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

    if args.sweep:
        row["sweep"] = []
        candidates = [
            MoeGemvConfig(BLOCK_I=bi, BLOCK_D=bd, BLOCK_N=bn, BLOCK_K=bk, gate_up_warps=wg, down_warps=wd)
            for bi, bd, wg in [(4, 512, 4), (8, 512, 4), (16, 256, 4), (8, 1024, 8), (16, 512, 8)]
            for bn, bk, wd in [(4, 256, 4), (8, 512, 4), (16, 256, 8)]
        ]
        for M in (1, 8):
            x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
            sets = [routing(M, E, K, seed=1000 * M + s) for s in range(ROUTING_SETS)]
            out = torch.empty_like(x)
            for c in candidates:
                t = time_graph(lambda i: moe_gemv(x, w13, w2, sets[i % ROUTING_SETS][0], sets[i % ROUTING_SETS][1],
                                                  out=out, config=c), replays=3)  # fmt: skip
                row["sweep"].append({"M": M, **c.__dict__, "us": round(t, 2)})
            best = min((s for s in row["sweep"] if s["M"] == M), key=lambda s: s["us"])
            print(f"  sweep M={M}: best {best}", flush=True)
    del w13, w2
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON path, e.g. benchmarks/results/moe_decode_h100.json")
    parser.add_argument("--sweep", action="store_true", help="also time alternative block configs (M=1, 8)")
    parser.add_argument("--shapes", default="all", help="comma-separated shape indices 0,1,2 (default all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_decode.py: no CUDA device; this benchmark runs on a GPU only", file=sys.stderr)
        return 2
    setup_sglang()
    t_start = time.time()
    bw = measure_bandwidth()
    print(f"bandwidth: {bw}", flush=True)
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    rows = [bench_shape(*s, args, bw["pure_read_TBps"]) for s in shapes]

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
