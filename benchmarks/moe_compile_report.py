"""Compiler report for the MoE GEMV kernels at every sweep candidate, without a GPU: compiles each distinct
kernel variant for sm_90 (Triton's bundled ptxas) and prints registers, stack frame and load widths.

    TRITON_INTERPRET=0 python3 -m benchmarks.moe_compile_report [--shapes 0,1,2]

A variant with a stack frame or 255 registers spills; registers decide how many programs share an SM.
Pointers are compiled as 16-byte aligned, as Triton specializes them at launch (SGLang's weights are).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from benchmarks import moe_shapes

from microturn_kernels import moe_gemv as mg

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
GATE_UP_ARGS = {"x_ptr": "*bf16", "w13_ptr": "*bf16", "ids_ptr": "*i32", "h_ptr": "*bf16", "stride_xm": "i32",
                "stride_idm": "i32"}  # fmt: skip
DOWN_ARGS = {"h_ptr": "*bf16", "w2_ptr": "*bf16", "ids_ptr": "*i32", "tw_ptr": "*fp32", "out_ptr": "*bf16",
             "stride_idm": "i32", "stride_twm": "i32", "stride_om": "i32", "scale": "fp32"}  # fmt: skip
SPLIT_DOWN_ARGS = {"h_ptr": "*bf16", "w2_ptr": "*bf16", "ids_ptr": "*i32", "tw_ptr": "*fp32", "out_ptr": "*bf16",
                   "y_ptr": "*fp32", "arrivals_ptr": "*i32", "stride_idm": "i32", "stride_twm": "i32",
                   "stride_om": "i32", "scale": "fp32"}  # fmt: skip
GROUPED_GATE_UP_ARGS = {"x_ptr": "*bf16", "w13_ptr": "*bf16", "ids_ptr": "*i32", "order_ptr": "*i64", "h_ptr": "*bf16",
                        "stride_xm": "i32", "stride_idm": "i32", "P": "i32"}  # fmt: skip
GROUPED_DOWN_ARGS = {"h_ptr": "*bf16", "w2_ptr": "*bf16", "ids_ptr": "*i32", "tw_ptr": "*fp32", "order_ptr": "*i64",
                     "out_ptr": "*bf16", "y_ptr": "*fp32", "arrivals_ptr": "*i32", "stride_idm": "i32",
                     "stride_twm": "i32", "stride_om": "i32", "P": "i32", "scale": "fp32"}  # fmt: skip
ALIGNED_INTS = ("stride_xm", "stride_om")  # multiples of D: specialized as divisible by 16 at launch


def compile_variant(kernel, args: dict, constexprs: dict, num_warps: int, pdl: bool):
    signature = {**args, **{name: "constexpr" for name in constexprs}}
    names = list(signature)
    source = ASTSource(
        kernel, signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs={(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(args.items()) if t[0] == "*" or n in ALIGNED_INTS},
    )  # fmt: skip
    return triton.compile(source, target=TARGET, options={"num_warps": num_warps, "launch_pdl": pdl})


def resources(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
    loads = collections.Counter(re.findall(r"ld\.global[A-Za-z0-9_.:]*", compiled.asm["ptx"]))
    return {"regs": int(regs), "stack": int(stack), "smem": compiled.metadata.shared, "loads": dict(loads)}


def variants(D: int, I: int, K: int, cfg: mg.MoeGemvConfig):
    """The (name, kernel, args, constexprs, warps, pdl) pair one config launches, as `moe_gemv` does."""
    evict = "evict_first" if cfg.evict_first else ""
    prefetch = cfg.pdl and cfg.prefetch_w2 and D % cfg.BLOCK_N == 0
    gate_up = dict(D=D, I=I, K=K, BLOCK_I=cfg.BLOCK_I, BLOCK_D=cfg.BLOCK_D, STAGES=cfg.gate_up_stages, EVICT=evict,
                   USE_PDL=cfg.pdl, WAIT_PREVIOUS=cfg.pdl_gate_up)  # fmt: skip
    down = dict(D=D, I=I, K=K, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, STAGES=cfg.down_stages, EVICT=evict,
                USE_PDL=cfg.pdl, PREFETCH_W2=prefetch)  # fmt: skip
    if cfg.group_pairs:  # constexprs in the kernels' parameter order
        grouped_gate_up = dict(D=D, I=I, K=K, BLOCK_I=cfg.BLOCK_I, BLOCK_D=cfg.BLOCK_D, G=mg.PAIR_GROUP,
                               STAGES=cfg.gate_up_stages, EVICT=evict, USE_PDL=cfg.pdl,
                               WAIT_PREVIOUS=cfg.pdl_gate_up)  # fmt: skip
        grouped_down = dict(D=D, I=I, K=K, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, G=mg.PAIR_GROUP,
                            STAGES=cfg.down_stages, EVICT=evict, USE_PDL=cfg.pdl)  # fmt: skip
        yield ("gate_up", mg._gate_up_grouped_kernel, GROUPED_GATE_UP_ARGS, grouped_gate_up, cfg.gate_up_warps,
               cfg.pdl_gate_up)  # fmt: skip
        yield "down", mg._down_grouped_kernel, GROUPED_DOWN_ARGS, grouped_down, cfg.down_warps, cfg.pdl
        return
    yield "gate_up", mg._gate_up_silu_kernel, GATE_UP_ARGS, gate_up, cfg.gate_up_warps, cfg.pdl_gate_up
    if cfg.split_down:
        split = dict(down, PRELOAD_W2=cfg.preload_w2)
        yield "down", mg._down_split_kernel, SPLIT_DOWN_ARGS, split, cfg.down_warps, cfg.pdl
    else:
        yield "down", mg._down_combine_kernel, DOWN_ARGS, down, cfg.down_warps, cfg.pdl


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="all", help="comma-separated shape indices 0,1,2 (default all)")
    args = parser.parse_args(argv)
    seen = set()
    for E, K, D, I in moe_shapes.selected_shapes(args):
        for group, cfg in moe_shapes.sweep_candidates(mg.moe_gemv_config(D, I)):
            for name, kernel, kargs, constexprs, warps, pdl in variants(D, I, K, cfg):
                key = (name, tuple(constexprs.items()), warps, pdl)
                if key in seen:
                    continue
                seen.add(key)
                report = resources(compile_variant(kernel, kargs, constexprs, warps, pdl))
                tiles = {k: v for k, v in constexprs.items() if k not in ("D", "I", "K")}
                print(f"E={E} D={D} I={I} {group:<8}{name:<8}warps={warps} {tiles}: {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
