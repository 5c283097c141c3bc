"""Where moe_gemv's time goes at small M: each of its two kernels alone against a pure read of the same bytes.

    python3 -m benchmarks.moe_breakdown --out benchmarks/results/moe_breakdown_<card>.json

Needs CUDA and SGLang (exit 2 without CUDA). Per shape and M, CUDA-graph timed like benchmarks/moe_decode.py
(benchmarks/moe_timing.py: 16 calls rotating 8 random routings): SGLang's fused MoE, our `moe_gemv` with the table config, its gate-up
and down stages alone, and a streaming read of exactly the bytes each reads (all touched experts' weights,
their w13 part, their w2 part) from 8 rotating buffers, so no read is served from L2. The pure read of the
same bytes, not of a 4 GiB buffer, is what a kernel of that size can reach: small reads stay below the
card's asymptotic bandwidth.
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton

from benchmarks.moe_timing import ROUTING_SETS, expert_weights, read_kernel, routing, setup_sglang, time_graph
from benchmarks.run_record import write_result

CASES = [((128, 8, 2048, 768), [1, 2, 4, 8]), ((8, 2, 4096, 14336), [1, 4, 8]), ((256, 6, 4096, 2048), [1, 8])]


def pure_read_us(nbytes: int) -> float:
    n = nbytes // 2
    bufs = [torch.ones(n, device="cuda", dtype=torch.bfloat16) for _ in range(ROUTING_SETS)]
    grid = triton.cdiv(n, 4096 * 4)
    part = torch.empty(grid, device="cuda", dtype=torch.float32)
    return time_graph(lambda i: read_kernel[(grid,)](bufs[i % ROUTING_SETS], part, n, BLOCK=4096, STEPS=4, num_warps=8))


def breakdown(E, K, D, I, Ms) -> list[dict]:
    from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe import fused_experts
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from microturn_kernels.moe_gemv import launch_down, launch_gate_up, moe_gemv, moe_gemv_config

    w13, w2, expert_bytes, moe_cfg = expert_weights(E, K, D, I)
    cfg = moe_gemv_config(D, I)
    rows = []
    for M in Ms:
        x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
        sets = [routing(M, E, K, seed=1000 * M + s) for s in range(ROUTING_SETS)]
        topk = [StandardTopKOutput(w, i, l) for w, i, l in sets]
        distinct = sum(len(torch.unique(i)) for _, i, _ in sets) / ROUTING_SETS
        read = int(distinct * expert_bytes) // 65536 * 65536
        outs = [torch.empty_like(x) for _ in range(ROUTING_SETS)]
        h = torch.empty(M * K, I, device="cuda", dtype=torch.bfloat16)

        def ours(i):
            w, ids, _ = sets[i % ROUTING_SETS]
            moe_gemv(x, w13, w2, w, ids, out=outs[i % ROUTING_SETS])

        # Each stage alone, PDL off: nothing to overlap with.
        def gate_up(i):
            launch_gate_up(x, w13, sets[i % ROUTING_SETS][1], h, cfg, False)

        def down(i):
            w, ids, _ = sets[i % ROUTING_SETS]
            launch_down(h, w2, ids, w, outs[i % ROUTING_SETS], cfg, 1.0, False)

        def sglang(i):
            fused_experts(hidden_states=x, w1=w13, w2=w2, topk_output=topk[i % ROUTING_SETS], moe_runner_config=moe_cfg)

        row = {
            "E": E, "K": K, "D": D, "I": I, "M": M, "distinct_experts": distinct, "read_MB": round(read / 1e6, 2),
            "sglang_us": time_graph(sglang), "ours_us": time_graph(ours),
            "gate_up_us": time_graph(gate_up), "down_us": time_graph(down),
            "pure_read_all_us": pure_read_us(read),
            "pure_read_w13_us": pure_read_us(read * 2 // 3 // 65536 * 65536),
            "pure_read_w2_us": pure_read_us(read // 3 // 65536 * 65536),
        }  # fmt: skip
        row = {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}
        print(row, flush=True)
        rows.append(row)
    del w13, w2
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON path, e.g. benchmarks/results/moe_breakdown_h200.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_breakdown.py: no CUDA device; this benchmark runs on a GPU only", file=sys.stderr)
        return 2
    setup_sglang()
    rows = [r for shape, Ms in CASES for r in breakdown(*shape, Ms)]
    write_result(args.out, {"benchmark": "moe_breakdown", "method": __doc__.split("\n\n")[2].replace("\n", " "),
                            "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
