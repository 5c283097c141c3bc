"""Aligned split-KV attention vs SGLang's Triton attention on one GPU, side by side, written as JSON.

    python3 -m benchmarks.attention --out benchmarks/results/attention_<card>.json

Shapes: 32 q heads / 8 kv heads (GQA group 4), head_dim 128, bf16, page size 1 (contiguous slots per
request), server context length 65536 (sets SGLang deterministic max_kv_splits and our split-grid size).
  decode: context 1k/8k/32k/64k x batch 1/8/32: SGLang decode_attention_fwd default (num_kv_splits heuristic,
          max 8 splits) and deterministic (split tile 256), ours at several split sizes S.
  extend: 16 new tokens over 8k/32k/64k history, batch 1 and 8: SGLang extend_attention_fwd (two-stage,
          the default), extend_attention_fwd_unified (deterministic mode), ours.
Times: triton.testing.do_bench median (L2 flushed between runs); decode also from a CUDA graph (`*_graph_us`,
one call per graph), which is how SGLang runs decode and leaves out the host's launch cost (our wrapper's
Python is slower than SGLang's, which dominates eager timings below ~8k of context). Bandwidth floor: KV bytes the step must
read / copy bandwidth measured in the same run (torch copy of 2 GiB; read+write bytes).
Checks stored in the JSON: bitwise prefill == decode == chunked extend at a real shape, max error vs an fp32
reference. Exit code 2 without CUDA. SGLang must be importable (e.g. PYTHONPATH=/tmp/site).

--variants times further configs, each also from a CUDA graph and each bitwise-checked:
`name=S:block_n:num_warps:num_stages` (block_m stays 16), e.g.
    --variants S128=128:64:4:2,S256_n32=256:32:4:2,S256_w8=256:64:8:3
A variant with another S or block_n is another alignment contract (trainer and server must use it alike);
num_warps / num_stages may change bits too, which its own check shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

H, KH, D = 32, 8, 128
CONTEXT_LEN = 65536
DTYPE = torch.bfloat16
DEVICE = "cuda"
DECODE_CTX, DECODE_BS = (1024, 8192, 32768, 65536), (1, 8, 32)
EXTEND_HIST, EXTEND_BS, EXTEND_NEW = (8192, 32768, 65536), (1, 8), 16
CHECK_TOKENS, REF_TOKENS = 4100, 2048
GRAPH_TIMED = ("aligned_S256", "aligned_S256_allsplits")  # also timed from a CUDA graph
# The grid before split folding (one program per possible split of a 64k context), for comparison.
ALL_SPLITS = "aligned_S256_allsplits"


def parse_variants(text: str) -> dict:
    """`name=S:block_n:num_warps:num_stages,...` -> {name: AlignedAttentionConfig}."""
    from microturn_kernels.aligned_attention import AlignedAttentionConfig

    out = {}
    for item in filter(None, text.split(",")):
        name, _, spec = item.partition("=")
        fields = spec.split(":")
        if not name or len(fields) != 4 or not all(f.isdigit() for f in fields):
            raise SystemExit(f"--variants: {item!r} is not name=S:block_n:num_warps:num_stages")
        s, n, w, st = map(int, fields)
        out[f"aligned_{name}"] = AlignedAttentionConfig(split_size=s, block_n=n, num_warps=w, num_stages=st)
    return out


def call_kwargs(name, cfg):
    return {"num_split_programs": cfg.max_splits(CONTEXT_LEN)} if name == ALL_SPLITS else {}


def _sglang():
    try:
        from sglang.srt.runtime_context import get_context

        get_context().override_server_args().install()
    except Exception as e:  # noqa: BLE001 - kernels below may not need it
        print(f"note: no SGLang server-args context ({type(e).__name__}: {e})")
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd, extend_attention_fwd_unified
    from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

    return decode_attention_fwd, extend_attention_fwd, extend_attention_fwd_unified, get_num_kv_splits_triton


def bench(fn, rep=100):
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3  # us


def bench_graph(fn, rep=100):
    """fn replayed from a CUDA graph, as SGLang runs decode: host launch cost out, GPU time only."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay, rep)


def copy_bandwidth():
    n = 1 << 30  # 1 Gi bf16 elements = 2 GiB
    a = torch.empty(n, dtype=DTYPE, device=DEVICE)
    b = torch.empty_like(a)
    us = bench(lambda: b.copy_(a), rep=200)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2 * n / (us * 1e-6)  # bytes/s, read + write


class KV:
    """A pool of `slots` KV slots with random bf16 K/V."""

    def __init__(self, slots):
        g = torch.Generator(device=DEVICE).manual_seed(0)
        self.k = torch.randn(slots, KH, D, device=DEVICE, dtype=DTYPE, generator=g)
        self.v = torch.randn(slots, KH, D, device=DEVICE, dtype=DTYPE, generator=g)


def decode_inputs(bs, ctx):
    q = torch.randn(bs, H, D, device=DEVICE, dtype=DTYPE)
    kv_indptr = torch.arange(bs + 1, device=DEVICE, dtype=torch.int32) * ctx
    kv_indices = torch.arange(bs * ctx, device=DEVICE, dtype=torch.int64)
    seq_lens = torch.full((bs,), ctx, device=DEVICE, dtype=torch.int32)
    return q, kv_indptr, kv_indices, seq_lens


def run_decode(pool, sgl, configs, bw, sm_count, graph_timed):
    from microturn_kernels.aligned_attention import aligned_decode

    decode_fwd, _, _, get_splits = sgl
    rows = []
    for ctx in DECODE_CTX:
        for bs in DECODE_BS:
            q, kv_indptr, kv_indices, seq_lens = decode_inputs(bs, ctx)
            o = torch.empty(bs, H, D, device=DEVICE, dtype=DTYPE)
            res = {"ctx": ctx, "batch": bs}
            # SGLang default: max_kv_splits 8, heuristic per batch (as TritonAttnBackend.get_num_kv_splits).
            ns = torch.empty(bs, dtype=torch.int32, device=DEVICE)
            get_splits[(1,)](ns, seq_lens, bs, 1, H, KH, 8, sm_count, MAX_NUM_SEQ=256)
            logits = torch.empty(bs, H, 8, D, device=DEVICE, dtype=torch.float32)
            lse = torch.empty(bs, H, 8, device=DEVICE, dtype=torch.float32)
            default = lambda: decode_fwd(  # noqa: E731
                q, pool.k, pool.v, o, kv_indptr, kv_indices, logits, lse, ns, 8, D**-0.5, 1.0, 1.0
            )
            res["sglang_default_us"] = bench(default)
            res["sglang_default_graph_us"] = bench_graph(default)
            # SGLang deterministic: split tile 256, max_kv_splits = context_len / 256.
            msp = CONTEXT_LEN // 256
            nsd = (seq_lens + 255) // 256
            logits_d = torch.empty(bs, H, msp, D, device=DEVICE, dtype=torch.float32)
            lse_d = torch.empty(bs, H, msp, device=DEVICE, dtype=torch.float32)
            res["sglang_deterministic_us"] = bench(
                lambda: decode_fwd(
                    q, pool.k, pool.v, o, kv_indptr, kv_indices, logits_d, lse_d, nsd, msp, D**-0.5, 1.0, 1.0
                )
            )
            qo = torch.arange(bs + 1, dtype=torch.int32, device=DEVICE)
            for name, cfg in configs.items():
                sp = cfg.max_splits(CONTEXT_LEN)
                ws = (
                    torch.empty(bs, H, sp, D, device=DEVICE, dtype=torch.float32),
                    torch.empty(bs, H, sp, device=DEVICE, dtype=torch.float32),
                )
                ours = lambda: aligned_decode(  # noqa: E731
                    q, pool.k, pool.v, o, kv_indptr, kv_indices, CONTEXT_LEN, config=cfg, workspace=ws, qo_indptr=qo,
                    **call_kwargs(name, cfg),
                )
                res[f"{name}_us"] = bench(ours)
                if name in graph_timed:
                    res[f"{name}_graph_us"] = bench_graph(ours)
            kv_bytes = bs * ctx * KH * 2 * D * 2
            res["kv_bytes"] = kv_bytes
            res["floor_us"] = kv_bytes / bw * 1e6
            for key in [k for k in res if k.endswith("_us") and k != "floor_us"]:
                res[key.replace("_us", "_bw_frac")] = res["floor_us"] / res[key]
            rows.append(res)
            print(_row(res), flush=True)
    return rows


def run_extend(pool, sgl, configs, bw):
    from microturn_kernels.aligned_attention import aligned_extend

    _, extend_fwd, extend_unified, _ = sgl
    new = EXTEND_NEW
    rows = []
    for hist in EXTEND_HIST:
        for bs in EXTEND_BS:
            kv_len = hist + new
            q = torch.randn(bs * new, H, D, device=DEVICE, dtype=DTYPE)
            o = torch.empty_like(q)
            qo = torch.arange(bs + 1, device=DEVICE, dtype=torch.int64) * new
            # Request b owns slots [b * kv_len, (b + 1) * kv_len); its new tokens are the last 16.
            full_indptr = torch.arange(bs + 1, device=DEVICE, dtype=torch.int32) * kv_len
            full_idx = torch.arange(bs * kv_len, device=DEVICE, dtype=torch.int64)
            pre_idx = full_idx.view(bs, kv_len)[:, :hist].reshape(-1).contiguous()
            pre_indptr = torch.arange(bs + 1, device=DEVICE, dtype=torch.int32) * hist
            new_idx = full_idx.view(bs, kv_len)[:, hist:].reshape(-1)
            k_new, v_new = pool.k[new_idx].contiguous(), pool.v[new_idx].contiguous()
            prefix_lens = torch.full((bs,), hist, device=DEVICE, dtype=torch.int32)
            res = {"history": hist, "new_tokens": new, "batch": bs}
            res["sglang_extend_us"] = bench(
                lambda: extend_fwd(
                    q, k_new, v_new, o, pool.k, pool.v, qo, pre_indptr, pre_idx, None, True, None, new, 1.0, 1.0
                )
            )
            res["sglang_unified_us"] = bench(
                lambda: extend_unified(
                    q, o, pool.k, pool.v, 1.0, 1.0, qo, full_indptr, full_idx, prefix_lens, new
                )
            )
            for name, cfg in configs.items():
                res[f"{name}_us"] = bench(
                    lambda: aligned_extend(q, pool.k, pool.v, o, qo, full_indptr, full_idx, new, kv_len, config=cfg,
                                           **call_kwargs(name, cfg))
                )
            kv_bytes = bs * kv_len * KH * 2 * D * 2
            res["kv_bytes"] = kv_bytes
            res["floor_us"] = kv_bytes / bw * 1e6
            for key in [k for k in res if k.endswith("_us") and k != "floor_us"]:
                res[key.replace("_us", "_bw_frac")] = res["floor_us"] / res[key]
            for name in configs:
                res[f"{name}_speedup_vs_sglang_extend"] = res["sglang_extend_us"] / res[f"{name}_us"]
            rows.append(res)
            print(_row(res), flush=True)
    return rows


def check_bitwise(pool, cfg, n=None):
    """One request of n tokens at the benchmark shape: prefill vs decode vs chunked extend, and vs fp32."""
    from microturn_kernels.aligned_attention import BF16_TOLERANCE, aligned_decode, aligned_extend
    from microturn_kernels.attention_reference import paged_causal_attention_reference

    n = n or CHECK_TOKENS
    g = torch.Generator(device=DEVICE).manual_seed(1)
    q = torch.randn(n, H, D, device=DEVICE, dtype=DTYPE, generator=g)
    idx = torch.randperm(pool.k.shape[0], device=DEVICE, generator=g)[:n]
    one = lambda *v: torch.tensor(v, device=DEVICE, dtype=torch.int32)  # noqa: E731
    pre = torch.empty_like(q)
    aligned_extend(q, pool.k, pool.v, pre, one(0, n), one(0, n), idx, n, CONTEXT_LEN, config=cfg)
    positions = sorted({p for p in (0, 1, 255, 256, 257, 1023, 1024, 4095, 4096, n - 1) if p < n})
    dec_equal = True
    for p in positions:
        o = torch.empty(1, H, D, device=DEVICE, dtype=DTYPE)
        aligned_decode(q[p : p + 1], pool.k, pool.v, o, one(0, p + 1), idx, CONTEXT_LEN, config=cfg)
        dec_equal &= torch.equal(o[0], pre[p])
    # Batched decode with neighbours of other lengths.
    bs_pos = positions + [n - 7] * 22
    kv = torch.tensor([0] + [p + 1 for p in bs_pos], device=DEVICE).cumsum(0).to(torch.int32)
    od = torch.empty(len(bs_pos), H, D, device=DEVICE, dtype=DTYPE)
    aligned_decode(q[bs_pos], pool.k, pool.v, od, kv, torch.cat([idx[: p + 1] for p in bs_pos]), CONTEXT_LEN, config=cfg)
    batch_equal = all(torch.equal(od[i], pre[p]) for i, p in enumerate(bs_pos))
    chunk_equal = True
    s = 0
    for c in (1, 16, 300, 16, 2000, 5, 16):
        e = min(n, s + c)
        oc = torch.empty(e - s, H, D, device=DEVICE, dtype=DTYPE)
        aligned_extend(q[s:e], pool.k, pool.v, oc, one(0, e - s), one(0, e), idx, e - s, CONTEXT_LEN, config=cfg)
        chunk_equal &= torch.equal(oc, pre[s:e])
        s = e
    m = min(n, REF_TOKENS)
    ref = paged_causal_attention_reference(q[:m], pool.k, pool.v, one(0, m), one(0, m), idx[:m])
    err = (pre[:m].float() - ref).abs()
    tol_ok = bool((err <= BF16_TOLERANCE["atol"] + BF16_TOLERANCE["rtol"] * ref.abs()).all())
    return {
        "split_size": cfg.split_size,
        "tokens": n,
        "prefill_eq_decode": bool(dec_equal),
        "prefill_eq_batched_decode": bool(batch_equal),
        "prefill_eq_chunked_extend": bool(chunk_equal),
        "ref_max_abs_err": err.max().item(),
        "ref_tokens": m,
        "within_tolerance": tol_ok,
        "tolerance": BF16_TOLERANCE,
    }


def _row(res):
    keys = [k for k in res if k.endswith("_us")]
    head = " ".join(f"{k}={res[k]}" for k in ("ctx", "history", "batch") if k in res)
    return head + " | " + " ".join(f"{k[:-3]}={res[k]:.1f}" for k in keys)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON path, e.g. benchmarks/results/attention_h100.json")
    ap.add_argument("--splits", default="256,1024,4096", help="our split sizes S to time")
    ap.add_argument("--variants", default="", help="more configs, graph-timed: name=S:block_n:warps:stages,...")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention benchmark needs a CUDA GPU: none found, nothing measured", file=sys.stderr)
        return 2
    from benchmarks.run_record import write_result

    from microturn_kernels.aligned_attention import AlignedAttentionConfig

    t0 = time.time()
    sgl = _sglang()
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    configs = {f"aligned_S{s}": AlignedAttentionConfig(split_size=int(s)) for s in args.splits.split(",")}
    configs[ALL_SPLITS] = AlignedAttentionConfig(split_size=256)
    variants = parse_variants(args.variants)
    configs.update(variants)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    pool = KV(max(max(DECODE_BS) * max(DECODE_CTX), max(EXTEND_BS) * (max(EXTEND_HIST) + EXTEND_NEW)))  # decode batch 32 x 64k: 4 GiB each for K and V
    checks = [check_bitwise(pool, AlignedAttentionConfig(split_size=s)) for s in (256, 4096)]
    checks += [{"variant": name, **check_bitwise(pool, cfg)} for name, cfg in variants.items()]
    for c in checks:
        print("bitwise/tolerance:", c, flush=True)
    decode = run_decode(pool, sgl, configs, bw, sm_count, GRAPH_TIMED + tuple(variants))
    extend = run_extend(pool, sgl, configs, bw)
    results = {
        "benchmark": "attention",
        "shape": {"q_heads": H, "kv_heads": KH, "head_dim": D, "dtype": "bfloat16", "page_size": 1,
                  "server_context_len": CONTEXT_LEN, "kv_layout": "contiguous slots per request"},  # fmt: skip
        "timing": "triton.testing.do_bench median, L2 flushed; microseconds; *_graph_us: replay of a CUDA graph"
                  " holding one call (the decode target is judged on these)",
        "configs": {k: dataclasses.asdict(v) for k, v in configs.items()},
        "copy_bandwidth_bytes_per_s": bw,
        "checks": checks,
        "decode": decode,
        "extend": extend,
        "targets": {
            "decode_vs_sglang_default": "aligned_S256_graph_us <= 1.05 x sglang_default_graph_us",
            "extend_16_over_32k": "sglang_extend_us / aligned_us >= 4",
        },
        "wall_s": round(time.time() - t0, 1),
        "env": {k: os.environ[k] for k in ("MICROTURN_GIT_COMMIT",) if k in os.environ},
    }
    _summary(decode, extend, configs)
    path = write_result(args.out, results)
    print(f"wrote {path} in {results['wall_s']} s")
    return 0


def _summary(decode, extend, configs):
    print("\ndecode from CUDA graphs: aligned_S256 / sglang_default (<= 1.05 is the target)")
    for r in decode:
        print(f"  ctx {r['ctx']:>6} bs {r['batch']:>2}: {r['aligned_S256_graph_us'] / r['sglang_default_graph_us']:.2f}")
    print("decode eager (host launch included): aligned / sglang_default")
    for r in decode:
        print(f"  ctx {r['ctx']:>6} bs {r['batch']:>2}: " + "  ".join(
            f"{n}={r[f'{n}_us'] / r['sglang_default_us']:.2f}" for n in configs))  # fmt: skip
    print("extend 16 tokens: speedup vs sglang extend (>= 4 at 32k is the target)")
    for r in extend:
        print(f"  hist {r['history']:>6} bs {r['batch']}: " + "  ".join(
            f"{n}={r[f'{n}_speedup_vs_sglang_extend']:.2f}x" for n in configs)
            + f"  unified={r['sglang_extend_us'] / r['sglang_unified_us']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
