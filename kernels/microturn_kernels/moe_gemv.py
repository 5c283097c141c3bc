"""MoE decode as gather + GEMV: two Triton kernels for unquantized bf16 MoE at small token counts.

Glossary: M tokens, K experts per token (top-k), P = M*K (token, expert) pairs, E experts, D hidden size,
I expert width (intermediate size per expert), N output rows of a projection.

Weights use SGLang's layout (`fused_experts` in sglang/srt/layers/moe/moe_runner/triton_utils/fused_moe.py):
  w13 [E, 2I, D]  rows [0, I) are the gate projection, rows [I, 2I) the up projection (not interleaved)
  w2  [E, D, I]   down projection
Math (SGLang's, for activation "silu", gated, router weight applied after the down projection):
  h[p]   = silu(x[m] @ w13[e, :I].T) * (x[m] @ w13[e, I:].T)            p = (m, k), e = topk_ids[m, k]
  out[m] = scale * sum_k topk_weights[m, k] * (h[(m, k)] @ w2[e].T)       scale = routed_scaling_factor or 1

Kernels (no padding, sorting or block-alignment pass; no atomics in the arithmetic; no host sync):
  1. `_gate_up_silu_kernel`, grid (P, cdiv(I, BLOCK_I)): one program computes BLOCK_I gate rows and the
     same BLOCK_I up rows of one pair, applies SiLU-and-multiply and stores h[p, rows] in bf16.
     Each needed w13 row is read once per token.
  2. `_down_combine_kernel`, grid (M, cdiv(D, BLOCK_N)): one program computes BLOCK_N output rows of one
     token: for k = 0..K-1 in order, the down-projection dot of h[(m, k)] with w2[e_k, rows], times
     topk_weights[m, k], summed in fp32; only the final [M, D] bf16 output is written.
  3. `_down_split_kernel` (`MoeGemvConfig.split_down`, M <= SPLIT_DOWN_MAX_M), grid (P, cdiv(D, BLOCK_N)):
     the down kernel with one program per pair instead of per token (K times the programs at small M). Each
     writes its fp32 down projection; the last of a token's K programs to arrive (an atomic counter per
     token and row block, re-armed by that program) sums the K results in k order: the same bits as 2.
  4. `_gate_up_grouped_kernel`, `_down_grouped_kernel` (`MoeGemvConfig.group_pairs`): one program per run
     of pairs that share an expert, in `pair_order`; see the section above the kernels.
  With `MoeGemvConfig.pdl` the down kernel is a programmatic dependent launch: its programs start while the
  gate-up grid drains (optionally bulk-prefetching their w2 rows into L2, or with `preload_w2` loading them)
  and wait for it before reading h; with `pdl_gate_up` the gate-up kernel starts the same way after the
  stream's previous kernel.
  The pair / token index is grid axis 0, the fastest-launched one: programs that run at the same time work
  on the same rows of every expert, so tokens sharing an expert read its rows from L2 rather than HBM.

Precision contract
  * Accumulation in fp32. Rounding points, matching SGLang's intermediate tensors: the gate and up dot
    products are rounded to bf16 (SGLang's `intermediate_cache1`), silu(gate) * up is computed in fp32 and
    rounded to bf16 (SGLang's `intermediate_cache2`). Unlike SGLang, the K weighted down-projection results
    are not rounded to bf16 one by one: they are summed in fp32 in k order and the sum (times the routed
    scaling factor) is rounded once. `moe_reference(..., kernel_rounding=True)` applies the same rounding
    points in fp32 math; the tests hold the kernel to it within bf16 tolerance (see tests/kernels/).
  * Batch invariance, bitwise: a token's output depends only on its own hidden state, top-k ids and
    weights and the expert weights, never on M or on the other tokens. Every reduction has a fixed order:
    the block sizes come from the weight shape alone (`moe_gemv_config`), never from M, and the combine
    over top-k runs in k order inside one program.
  * Alignment: the same kernels serve any M, so a token's MoE output is bitwise identical whether it was
    computed in a 1-token decode step or inside a 4096-token prefill. `moe_gemv_aligned` is that large-M
    entry point (prefill under alignment mode); its cost against SGLang's grouped GEMM is measured in
    benchmarks/moe_decode.py (docs/moe.md).
  * Bitwise identity holds for one config, one GPU architecture and one Triton version; a different config
    (block sizes, num_warps) may change low bits.

CUDA graphs: shapes alone decide the grid and the one intermediate allocation ([P, I] bf16), so a call can
be captured and replayed.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from microturn_kernels.rounding import to_bf16 as _to_bf16

__all__ = [
    "MoeGemvConfig",
    "MoeGemvInputError",
    "moe_gemv",
    "moe_gemv_aligned",
    "moe_gemv_config",
]


class MoeGemvInputError(ValueError):
    """An input of `moe_gemv` has a shape, dtype or device the kernels do not support."""


@dataclass(frozen=True)
class MoeGemvConfig:
    """Tile configuration of the two kernels. Chosen from the weight shape only (never from M: batch
    invariance); a different config may change low bits of the output.

    BLOCK_I: gate (and up) rows per program of the gate-up kernel; BLOCK_D: its reduction chunk over D.
    BLOCK_N: output rows per program of the down kernel; BLOCK_K: its reduction chunk over I.
    All four are powers of two; tails are masked.
    gate_up_stages, down_stages: 0 unrolls the kernel's reduction loop (static_range: every chunk's loads
      can be issued up front, at the cost of registers); n >= 1 keeps it a loop that Triton software-
      pipelines n deep (`tl.range(num_stages=n)`: cp.async copies through shared memory on sm_80+).
    evict_first: weight loads carry the evict-first L2 hint (weights stream through once per token at
      M=1; x, h and the routing stay resident).
    pdl: programmatic dependent launch (Hopper+, CUDA only; ignored elsewhere): the down kernel is launched
      while the gate-up kernel drains, takes SM slots as they free up and waits (griddepcontrol.wait)
      before it reads h or writes out; the launch gap and the first kernel's tail overlap the second's start.
    prefetch_w2: with pdl, each down program asks L2 for its w2 rows (one bulk prefetch per expert it reads)
      before it waits, so its weight stream starts during the gate-up tail.
    split_down: at small M (up to SPLIT_DOWN_MAX_M tokens) the down kernel runs one program per (pair, row
      block) instead of per (token, row block), K times the programs for the same bytes: each writes its
      fp32 down projection, and the last of a token's K programs to finish (a per-row-block arrival
      counter) sums them in k order. The same arithmetic in the same order: bitwise equal to split_down off.
    pdl_gate_up: the gate-up kernel too is a programmatic dependent launch (Hopper+, CUDA only): it starts
      while the stream's previous kernel drains and waits for it (griddepcontrol.wait) before its first
      read, so its launch latency overlaps that kernel's tail. Independent of pdl.
    preload_w2: split_down's programs load their first w2 chunk (their whole tile when BLOCK_K >= I) into
      registers before they wait for the gate-up grid, so under pdl the down stage's weight stream runs
      beside the gate-up stage's instead of after it. Only where the load sits: the same bits as without.
      The per-token down kernel (M > SPLIT_DOWN_MAX_M, or split_down off) ignores it.
    group_pairs: both stages run one program per run of pairs that share an expert (`PAIR_GROUP` pairs per
      weight tile, see `_gate_up_grouped_kernel`): an expert picked by several tokens is streamed once
      instead of once per pair. Other bits than the per-pair kernels (another tile shape), the same for any
      M and batch. Takes the place of split_down (its down stage combines the same way). Each program holds
      PAIR_GROUP accumulator tiles, so BLOCK_D and BLOCK_K about a quarter of the per-pair kernels' keep
      its registers in bounds.
    """

    BLOCK_I: int
    BLOCK_D: int
    BLOCK_N: int
    BLOCK_K: int
    gate_up_warps: int = 4
    down_warps: int = 4
    gate_up_stages: int = 0
    down_stages: int = 0
    evict_first: bool = False
    pdl: bool = False
    prefetch_w2: bool = False
    pdl_gate_up: bool = False
    split_down: bool = False
    preload_w2: bool = False
    group_pairs: bool = False


# split_down's bound on M, and the arrival counters' ([SPLIT_DOWN_MAX_M, cdiv(D, BLOCK_N)] int32 per device):
# allocated once and re-armed by the kernels themselves, so a captured CUDA graph needs no memset node.
# Larger batches have parallelism enough with one program per token.
SPLIT_DOWN_MAX_M = 64


# Keyed by (D, I). The first and last: the H200 sweeps' best (benchmarks/results/moe_sweep_h200.json,
# moe_sweep_pdl_h200.json); Mixtral's: E=256's tiles, timed on the H200 in moe_decode_h200.json but not swept
# there (docs/moe.md). Changing an entry may change low bits (the sweep records, per candidate, whether it did).
_CONFIGS: dict[tuple[int, int], MoeGemvConfig] = {
    # E=128 top-8 (Qwen3-30B-A3B)
    (2048, 768): MoeGemvConfig(BLOCK_I=16, BLOCK_D=256, BLOCK_N=16, BLOCK_K=256, gate_up_stages=3, pdl=True,
                               split_down=True, preload_w2=True, pdl_gate_up=True),  # fmt: skip
    # E=8 top-2 (Mixtral 8x7B): E=256's H200 tiles (same D) with a pipelined down loop over its long I
    (4096, 14336): MoeGemvConfig(BLOCK_I=8, BLOCK_D=512, BLOCK_N=4, BLOCK_K=512, gate_up_stages=3, down_stages=3,
                                 pdl=True, split_down=True, preload_w2=True, pdl_gate_up=True),  # fmt: skip
    # E=256 top-6: whole w2 tiles (BLOCK_K = I) preloaded
    (4096, 2048): MoeGemvConfig(BLOCK_I=8, BLOCK_D=512, BLOCK_N=4, BLOCK_K=2048, gate_up_stages=3, pdl=True,
                                split_down=True, preload_w2=True, pdl_gate_up=True),  # fmt: skip
}


def moe_gemv_config(hidden_size: int, intermediate_size: int) -> MoeGemvConfig:
    """Config for weights of hidden size D and expert width I: the table entry, else a heuristic."""
    cfg = _CONFIGS.get((hidden_size, intermediate_size))
    if cfg is not None:
        return cfg
    return MoeGemvConfig(
        BLOCK_I=8,
        BLOCK_D=min(512, triton.next_power_of_2(hidden_size)),
        BLOCK_N=4,
        BLOCK_K=min(256, triton.next_power_of_2(intermediate_size)),
    )


@triton.jit
def _prefetch_l2(ptr, nbytes):
    # One bulk L2 prefetch (sm_90 `cp.async.bulk.prefetch.L2`) of nbytes contiguous bytes from ptr, issued
    # by thread 0 only; ptr 16-byte aligned, nbytes a multiple of 16. A hint: nothing waits on it.
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r",
        [ptr, nbytes],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _gate_up_chunk(acc_g, acc_u, x_row, w_gate, w_up, row_mask, c, cols, D: tl.constexpr, EVICT: tl.constexpr):
    # acc += w * x over the D-chunk starting at c: [BI, BD] fp32 elementwise, reduced once at the end.
    d = c + cols
    d_mask = d < D
    xv = tl.load(x_row + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]  # [1, BD]
    m2 = row_mask[:, None] & d_mask[None, :]
    wg = tl.load(w_gate + d[None, :], mask=m2, other=0.0, eviction_policy=EVICT)  # [BI, BD]
    wu = tl.load(w_up + d[None, :], mask=m2, other=0.0, eviction_policy=EVICT)
    return acc_g + wg.to(tl.float32) * xv, acc_u + wu.to(tl.float32) * xv


@triton.jit
def _gate_up_silu_kernel(
    x_ptr,  # [M, D] bf16, row stride stride_xm
    w13_ptr,  # [E, 2I, D] bf16, contiguous
    ids_ptr,  # [M, K] int32/int64, row stride stride_idm
    h_ptr,  # [P, I] bf16 out, contiguous
    stride_xm,
    stride_idm,
    D: tl.constexpr,
    I: tl.constexpr,
    K: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
    EVICT: tl.constexpr,
    USE_PDL: tl.constexpr,
    WAIT_PREVIOUS: tl.constexpr,
):
    if USE_PDL:
        # Every program is resident once all have passed this point: the down kernel may start taking the
        # SM slots that free up (it waits for this whole grid before reading h).
        tl.extra.cuda.gdc_launch_dependents()
    if WAIT_PREVIOUS:
        tl.extra.cuda.gdc_wait()  # pdl_gate_up: x and topk_ids are the previous kernel's; nothing is read before
    pair = tl.program_id(0)  # p = m * K + k
    iblk = tl.program_id(1)
    m = pair // K
    k = pair % K
    e = tl.load(ids_ptr + m * stride_idm + k).to(tl.int64)
    valid = e >= 0  # SGLang marks experts filtered out (expert parallelism) with -1
    e = tl.maximum(e, 0)

    rows = iblk * BLOCK_I + tl.arange(0, BLOCK_I)  # [BI] gate rows; up rows are rows + I
    row_mask = (rows < I) & valid
    cols = tl.arange(0, BLOCK_D)  # [BD]
    w_gate = w13_ptr + e * (2 * I * D) + rows[:, None].to(tl.int64) * D  # [BI, 1]
    w_up = w_gate + I * D
    x_row = x_ptr + m.to(tl.int64) * stride_xm

    acc_g = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
    # Fixed chunk order either way; the two loop forms differ only in how loads are scheduled.
    if STAGES == 0:
        for c in tl.static_range(0, D, BLOCK_D):
            acc_g, acc_u = _gate_up_chunk(acc_g, acc_u, x_row, w_gate, w_up, row_mask, c, cols, D, EVICT)
    else:
        for c in tl.range(0, D, BLOCK_D, num_stages=STAGES):
            acc_g, acc_u = _gate_up_chunk(acc_g, acc_u, x_row, w_gate, w_up, row_mask, c, cols, D, EVICT)
    # Rounded to bf16 like SGLang's gate-up GEMM output, then SiLU-and-multiply in fp32.
    g = _to_bf16(tl.sum(acc_g, axis=1)).to(tl.float32)  # [BI]
    u = _to_bf16(tl.sum(acc_u, axis=1)).to(tl.float32)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + pair.to(tl.int64) * I + rows, _to_bf16(h), mask=rows < I)


@triton.jit
def _down_weights(w_rows, row_mask, i_valid, c, cols, I: tl.constexpr, EVICT: tl.constexpr):
    # The [BN, BK] w2 tile of the I-chunk starting at c (zeros where masked).
    i = c + cols
    m2 = row_mask[:, None] & ((i < I) & i_valid)[None, :]
    return tl.load(w_rows + i[None, :], mask=m2, other=0.0, eviction_policy=EVICT)


@triton.jit
def _down_fma(acc, h_row, w, i_valid, c, cols, I: tl.constexpr):
    # acc += w * h over the I-chunk starting at c: [BN, BK] fp32 elementwise, reduced once per pair.
    i = c + cols
    hv = tl.load(h_row + i, mask=(i < I) & i_valid, other=0.0).to(tl.float32)[None, :]  # [1, BK]
    return acc + w.to(tl.float32) * hv


@triton.jit
def _down_rows(w2_ptr, e, rows, D: tl.constexpr, I: tl.constexpr):
    return w2_ptr + e * (D * I) + rows[:, None].to(tl.int64) * I  # [BN, 1]: expert e's w2 rows


@triton.jit
def _down_pair(acc, h_ptr, w_rows, valid, pair, row_mask, START: tl.constexpr, I: tl.constexpr,
               BLOCK_K: tl.constexpr, STAGES: tl.constexpr, EVICT: tl.constexpr):
    # One pair's down projection on BLOCK_N output rows, fp32 [BN]: the dot of h[pair] with w2[e, rows],
    # the I-chunks from START on added to acc ([BN, BK], the chunks before START already in it) in order.
    h_row = h_ptr + pair.to(tl.int64) * I
    cols = tl.arange(0, BLOCK_K)  # [BK]
    if STAGES == 0:
        for c in tl.static_range(START, I, BLOCK_K):
            acc = _down_fma(acc, h_row, _down_weights(w_rows, row_mask, valid, c, cols, I, EVICT), valid, c, cols, I)
    else:
        for c in tl.range(START, I, BLOCK_K, num_stages=STAGES):
            acc = _down_fma(acc, h_row, _down_weights(w_rows, row_mask, valid, c, cols, I, EVICT), valid, c, cols, I)
    return tl.sum(acc, axis=1)


@triton.jit
def _down_combine_kernel(
    h_ptr,  # [P, I] bf16, contiguous
    w2_ptr,  # [E, D, I] bf16, contiguous
    ids_ptr,  # [M, K] int32/int64
    tw_ptr,  # [M, K] float
    out_ptr,  # [M, D] bf16, row stride stride_om
    stride_idm,
    stride_twm,
    stride_om,
    scale,  # routed scaling factor, fp32
    D: tl.constexpr,
    I: tl.constexpr,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    EVICT: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH_W2: tl.constexpr,
):
    m = tl.program_id(0)
    nblk = tl.program_id(1)
    if PREFETCH_W2:
        # This program's rows of each selected expert are BLOCK_N * I contiguous elements (the wrapper
        # enables this only when D % BLOCK_N == 0, so they are in bounds).
        for k in tl.static_range(K):
            e = tl.maximum(tl.load(ids_ptr + m * stride_idm + k).to(tl.int64), 0)
            _prefetch_l2(w2_ptr + e * (D * I) + nblk.to(tl.int64) * (BLOCK_N * I), BLOCK_N * I * 2)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # h is written by the gate-up grid: nothing below may run before it ends
    rows = nblk * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output rows
    row_mask = rows < D

    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in tl.static_range(K):  # the combine over top-k, in k order
        e = tl.load(ids_ptr + m * stride_idm + k).to(tl.int64)
        tw = tl.load(tw_ptr + m * stride_twm + k).to(tl.float32)
        valid = e >= 0
        w_rows = _down_rows(w2_ptr, tl.maximum(e, 0), rows, D, I)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        y = _down_pair(acc, h_ptr, w_rows, valid, m * K + k, row_mask, 0, I, BLOCK_K, STAGES, EVICT)
        out += tl.where(valid, tw, 0.0) * y
    out = out * scale
    tl.store(out_ptr + m.to(tl.int64) * stride_om + rows, _to_bf16(out), mask=row_mask)


@triton.jit
def _combine_token(ids_ptr, tw_ptr, y_ptr, out_ptr, counter, m, rows, row_mask, stride_idm, stride_twm, stride_om,
                   scale, D: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr):
    # Run by the program whose arrival on `counter` was token m's K-th: out[m, rows] = scale * sum_k
    # topk_weight * y[(m, k)] in k order (the same sum as `_down_combine_kernel`), then re-arm the counter.
    tl.debug_barrier()  # the acquire was one thread's: the CTA barrier orders every thread's loads after it
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in tl.static_range(K):
        valid = tl.load(ids_ptr + m * stride_idm + k) >= 0
        tw = tl.load(tw_ptr + m * stride_twm + k).to(tl.float32)
        # .cg: from L2, where the other programs' stores are; never a stale L1 line
        yk = tl.load(y_ptr + (m * K + k).to(tl.int64) * D + rows, mask=row_mask, other=0.0, cache_modifier=".cg")
        out += tl.where(valid, tw, 0.0) * yk
    out = out * scale
    tl.store(out_ptr + m.to(tl.int64) * stride_om + rows, _to_bf16(out), mask=row_mask)
    tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # re-armed for the next call: all K arrived


@triton.jit
def _down_split_kernel(
    h_ptr,  # [P, I] bf16, contiguous
    w2_ptr,  # [E, D, I] bf16, contiguous
    ids_ptr,  # [M, K] int32/int64
    tw_ptr,  # [M, K] float
    out_ptr,  # [M, D] bf16, row stride stride_om
    y_ptr,  # [P, D] fp32 scratch: each pair's down projection
    arrivals_ptr,  # [>= M * cdiv(D, BLOCK_N)] int32, zero between calls
    stride_idm,
    stride_twm,
    stride_om,
    scale,  # routed scaling factor, fp32
    D: tl.constexpr,
    I: tl.constexpr,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
    EVICT: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH_W2: tl.constexpr,
    PRELOAD_W2: tl.constexpr,
):
    # split_down (MoeGemvConfig): grid (P, cdiv(D, BLOCK_N)), one pair's rows per program; the combine of
    # `_down_combine_kernel` runs in whichever of a token's K programs arrives last.
    pair = tl.program_id(0)
    nblk = tl.program_id(1)
    m = pair // K
    e = tl.load(ids_ptr + m * stride_idm + pair % K).to(tl.int64)
    valid = e >= 0
    e = tl.maximum(e, 0)
    if PREFETCH_W2:  # as in `_down_combine_kernel`, for this program's one expert
        _prefetch_l2(w2_ptr + e * (D * I) + nblk.to(tl.int64) * (BLOCK_N * I), BLOCK_N * I * 2)
    rows = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < D
    w_rows = _down_rows(w2_ptr, e, rows, D, I)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if PRELOAD_W2:  # the first chunk's weights into registers while the gate-up grid still runs
        w_first = _down_weights(w_rows, row_mask, valid, 0, tl.arange(0, BLOCK_K), I, EVICT)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # h is written by the gate-up grid
    if PRELOAD_W2:  # the same sum in the same order as without the preload: chunk 0, then the rest
        acc = _down_fma(acc, h_ptr + pair.to(tl.int64) * I, w_first, valid, 0, tl.arange(0, BLOCK_K), I)
        y = _down_pair(acc, h_ptr, w_rows, valid, pair, row_mask, BLOCK_K, I, BLOCK_K, STAGES, EVICT)
    else:
        y = _down_pair(acc, h_ptr, w_rows, valid, pair, row_mask, 0, I, BLOCK_K, STAGES, EVICT)
    tl.store(y_ptr + pair.to(tl.int64) * D + rows, y, mask=row_mask)
    # Every thread's store is issued before the arrival (CTA barrier), and the gpu-scope release of the
    # arrival publishes them to the program that acquires it last.
    tl.debug_barrier()
    counter = arrivals_ptr + m * tl.cdiv(D, BLOCK_N) + nblk
    if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == K - 1:
        _combine_token(ids_ptr, tw_ptr, y_ptr, out_ptr, counter, m, rows, row_mask, stride_idm, stride_twm, stride_om,
                       scale, D, K, BLOCK_N)  # fmt: skip


# ------------------------------------------------------------------ group_pairs: one program per expert
# `MoeGemvConfig.group_pairs`: pairs are visited in `order` (their indices sorted by expert id, stably); the
# program at sorted position pos leads the run of positions that share its expert when the one before it
# has another expert, and exits otherwise. A leader streams its expert's rows once and applies them to the
# run's pairs PAIR_GROUP at a time, each pair with its own accumulator rows of one [PAIR_GROUP, rows, chunk]
# tile: a pair's arithmetic is the same code whichever run and whichever slot it lands in, so its bits do
# not depend on the other pairs (batch invariance) nor on `order` (any permutation gives the same output;
# sorting only decides how much is shared). Different from the per-pair kernels' bits (another tile shape).
PAIR_GROUP = 4


@triton.jit
def _run_head(order_ptr, ids_ptr, pos, K: tl.constexpr, stride_idm):
    # (expert id at sorted position pos, whether pos starts a run of one expert)
    q = tl.load(order_ptr + pos)
    e = tl.load(ids_ptr + (q // K) * stride_idm + q % K)
    qp = tl.load(order_ptr + tl.maximum(pos - 1, 0))
    ep = tl.load(ids_ptr + (qp // K) * stride_idm + qp % K)
    return e, (pos == 0) | (ep != e)


@triton.jit
def _run_batch(order_ptr, ids_ptr, start, P, e, K: tl.constexpr, stride_idm, G: tl.constexpr):
    # The next G sorted positions from `start`: (pair indices [G], in the run [G], the run may go on)
    j = start + tl.arange(0, G)
    inside = j < P
    q = tl.load(order_ptr + j, mask=inside, other=0)
    ej = tl.load(ids_ptr + (q // K) * stride_idm + q % K, mask=inside, other=-2)  # ids are >= -1
    # a run is contiguous: a position belongs only if every position before it in the batch did
    member = tl.cumsum((~(inside & (ej == e))).to(tl.int32), axis=0) == 0
    return q, member, tl.sum(member.to(tl.int32), axis=0) == G


@triton.jit
def _gate_up_group_chunk(acc_g, acc_u, x_rows, member, w_gate, w_up, row_mask, c, cols, D: tl.constexpr,
                         EVICT: tl.constexpr):  # fmt: skip
    # `_gate_up_chunk` for G pairs at once: one [BI, BD] weight load, G accumulators [G, BI, BD].
    d = c + cols
    d_mask = d < D
    xv = tl.load(x_rows[:, None] + d[None, :], mask=member[:, None] & d_mask[None, :], other=0.0)
    xv = xv.to(tl.float32)[:, None, :]  # [G, 1, BD]
    m2 = row_mask[:, None] & d_mask[None, :]
    wg = tl.load(w_gate + d[None, :], mask=m2, other=0.0, eviction_policy=EVICT).to(tl.float32)
    wu = tl.load(w_up + d[None, :], mask=m2, other=0.0, eviction_policy=EVICT).to(tl.float32)
    return acc_g + wg[None, :, :] * xv, acc_u + wu[None, :, :] * xv


@triton.jit
def _down_group_chunk(acc, h_rows, member, w_rows, row_mask, i_valid, c, cols, I: tl.constexpr, EVICT: tl.constexpr):
    # `_down_weights` + `_down_fma` for G pairs at once: one [BN, BK] weight load, G accumulators [G, BN, BK].
    i = c + cols
    i_mask = (i < I) & i_valid
    hv = tl.load(h_rows[:, None] + i[None, :], mask=member[:, None] & i_mask[None, :], other=0.0).to(tl.float32)
    w = tl.load(w_rows + i[None, :], mask=row_mask[:, None] & i_mask[None, :], other=0.0, eviction_policy=EVICT)
    return acc + w.to(tl.float32)[None, :, :] * hv[:, None, :]


@triton.jit
def _gate_up_grouped_kernel(
    x_ptr, w13_ptr, ids_ptr, order_ptr, h_ptr,  # as `_gate_up_silu_kernel`; order [P] int64 (see above)
    stride_xm,
    stride_idm,
    P,
    D: tl.constexpr,
    I: tl.constexpr,
    K: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
    G: tl.constexpr,
    STAGES: tl.constexpr,
    EVICT: tl.constexpr,
    USE_PDL: tl.constexpr,
    WAIT_PREVIOUS: tl.constexpr,
):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if WAIT_PREVIOUS:
        tl.extra.cuda.gdc_wait()  # as in `_gate_up_silu_kernel`
    pos = tl.program_id(0)
    iblk = tl.program_id(1)
    e, leader = _run_head(order_ptr, ids_ptr, pos, K, stride_idm)
    if leader:
        rows = iblk * BLOCK_I + tl.arange(0, BLOCK_I)  # [BI]
        row_mask = (rows < I) & (e >= 0)
        cols = tl.arange(0, BLOCK_D)
        w_gate = w13_ptr + tl.maximum(e, 0).to(tl.int64) * (2 * I * D) + rows[:, None].to(tl.int64) * D  # [BI, 1]
        w_up = w_gate + I * D
        start = pos
        more = True
        while more:
            q, member, more = _run_batch(order_ptr, ids_ptr, start, P, e, K, stride_idm, G)
            x_rows = x_ptr + (q // K).to(tl.int64) * stride_xm  # [G]
            acc_g = tl.zeros([G, BLOCK_I, BLOCK_D], dtype=tl.float32)
            acc_u = tl.zeros([G, BLOCK_I, BLOCK_D], dtype=tl.float32)
            if STAGES == 0:
                for c in tl.static_range(0, D, BLOCK_D):
                    acc_g, acc_u = _gate_up_group_chunk(acc_g, acc_u, x_rows, member, w_gate, w_up, row_mask, c, cols,
                                                        D, EVICT)  # fmt: skip
            else:
                for c in tl.range(0, D, BLOCK_D, num_stages=STAGES):
                    acc_g, acc_u = _gate_up_group_chunk(acc_g, acc_u, x_rows, member, w_gate, w_up, row_mask, c, cols,
                                                        D, EVICT)  # fmt: skip
            g = _to_bf16(tl.sum(acc_g, axis=2)).to(tl.float32)  # [G, BI], rounded as in the per-pair kernel
            u = _to_bf16(tl.sum(acc_u, axis=2)).to(tl.float32)
            h = g / (1.0 + tl.exp(-g)) * u
            out_mask = member[:, None] & (rows < I)[None, :]
            tl.store(h_ptr + q[:, None].to(tl.int64) * I + rows[None, :], _to_bf16(h), mask=out_mask)
            start += G


@triton.jit
def _down_grouped_kernel(
    h_ptr, w2_ptr, ids_ptr, tw_ptr, order_ptr, out_ptr, y_ptr, arrivals_ptr,  # as `_down_split_kernel`
    stride_idm,
    stride_twm,
    stride_om,
    P,
    scale,
    D: tl.constexpr,
    I: tl.constexpr,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    G: tl.constexpr,
    STAGES: tl.constexpr,
    EVICT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # The down projection of a run's pairs from one stream of w2[e, rows]; each pair's result goes to y and
    # its token's arrival counter, and a token's K-th arrival combines it (`_combine_token`).
    pos = tl.program_id(0)
    nblk = tl.program_id(1)
    e, leader = _run_head(order_ptr, ids_ptr, pos, K, stride_idm)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # h is written by the gate-up grid
    if leader:
        rows = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < D
        valid = e >= 0
        w_rows = w2_ptr + tl.maximum(e, 0).to(tl.int64) * (D * I) + rows[:, None].to(tl.int64) * I  # [BN, 1]
        cols = tl.arange(0, BLOCK_K)
        slots = tl.arange(0, G)
        start = pos
        more = True
        while more:
            q, member, more = _run_batch(order_ptr, ids_ptr, start, P, e, K, stride_idm, G)
            h_rows = h_ptr + q.to(tl.int64) * I  # [G]
            acc = tl.zeros([G, BLOCK_N, BLOCK_K], dtype=tl.float32)
            if STAGES == 0:
                for c in tl.static_range(0, I, BLOCK_K):
                    acc = _down_group_chunk(acc, h_rows, member, w_rows, row_mask, valid, c, cols, I, EVICT)
            else:
                for c in tl.range(0, I, BLOCK_K, num_stages=STAGES):
                    acc = _down_group_chunk(acc, h_rows, member, w_rows, row_mask, valid, c, cols, I, EVICT)
            y = tl.sum(acc, axis=2)  # [G, BN]
            tl.store(y_ptr + q[:, None].to(tl.int64) * D + rows[None, :], y, mask=member[:, None] & row_mask[None, :])
            tl.debug_barrier()  # every thread's y stores before the arrivals (see `_down_split_kernel`)
            tokens = q // K
            counters = arrivals_ptr + tokens * tl.cdiv(D, BLOCK_N) + nblk  # [G]
            last = member & (tl.atomic_add(counters, 1, mask=member, sem="acq_rel", scope="gpu") == K - 1)
            for j in tl.static_range(G):  # combine each token whose K-th pair this batch held
                if tl.sum(tl.where(slots == j, last.to(tl.int32), 0), axis=0) > 0:
                    m = tl.sum(tl.where(slots == j, tokens, 0), axis=0)
                    _combine_token(ids_ptr, tw_ptr, y_ptr, out_ptr, arrivals_ptr + m * tl.cdiv(D, BLOCK_N) + nblk, m,
                                   rows, row_mask, stride_idm, stride_twm, stride_om, scale, D, K, BLOCK_N)  # fmt: skip
            start += G


def _check_inputs(hidden_states, w13, w2, topk_weights, topk_ids) -> None:
    if hidden_states.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise MoeGemvInputError(
            f"expected hidden_states [M, D], w13 [E, 2I, D], w2 [E, D, I]; got {tuple(hidden_states.shape)}, "
            f"{tuple(w13.shape)}, {tuple(w2.shape)}"
        )
    M, D = hidden_states.shape
    E, two_i, d13 = w13.shape
    if d13 != D or two_i % 2 or tuple(w2.shape) != (E, D, two_i // 2):
        raise MoeGemvInputError(
            f"weight shapes do not match: hidden_states {tuple(hidden_states.shape)}, w13 {tuple(w13.shape)} "
            f"(want [E, 2I, {D}]), w2 {tuple(w2.shape)} (want [{E}, {D}, {two_i // 2}])"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != M or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise MoeGemvInputError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be [{M}, K]"
        )
    for name, t in (("hidden_states", hidden_states), ("w13", w13), ("w2", w2)):
        if t.dtype != torch.bfloat16:
            raise MoeGemvInputError(f"{name} is {t.dtype}; the kernels take bfloat16 only (unquantized MoE)")
    if not (w13.is_contiguous() and w2.is_contiguous()):
        raise MoeGemvInputError("w13 and w2 must be contiguous (SGLang's expert weights are)")
    if hidden_states.stride(1) != 1 or topk_ids.stride(1) != 1 or topk_weights.stride(1) != 1:
        raise MoeGemvInputError("hidden_states, topk_ids and topk_weights need a unit stride along the last dim")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise MoeGemvInputError(f"topk_ids is {topk_ids.dtype}; pass int32 or int64")
    devices = {t.device for t in (hidden_states, w13, w2, topk_weights, topk_ids)}
    if len(devices) != 1:
        raise MoeGemvInputError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


@functools.cache
def _pdl_capability(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


# Triton picks the interpreter when a kernel is decorated, i.e. at this module's import.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _pdl_supported(device: torch.device) -> bool:
    # Programmatic dependent launch needs sm_90+ and a real launch (the interpreter runs kernels on the CPU).
    if device.type != "cuda" or _INTERPRETED:
        return False
    return _pdl_capability(device.index if device.index is not None else torch.cuda.current_device())


def moe_gemv(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    routed_scaling_factor: float | None = None,
    out: torch.Tensor | None = None,
    config: MoeGemvConfig | None = None,
) -> torch.Tensor:
    """MoE forward for M tokens as gather + GEMV: returns out [M, D] bf16.

    hidden_states [M, D] bf16; w13 [E, 2I, D] bf16 ([gate; up] rows); w2 [E, D, I] bf16;
    topk_weights [M, K] fp32 (bf16 accepted); topk_ids [M, K] int32/int64, -1 = expert filtered out.
    `out` may alias hidden_states (SGLang's in-place mode): the gate-up kernel has consumed it before the
    down kernel writes. See the module docstring for the precision contract (bitwise batch invariance).
    """
    _check_inputs(hidden_states, w13, w2, topk_weights, topk_ids)
    M, D = hidden_states.shape
    K = topk_ids.shape[1]
    I = w2.shape[2]
    cfg = config or moe_gemv_config(D, I)
    if out is None:
        out = torch.empty_like(hidden_states)
    elif tuple(out.shape) != (M, D) or out.dtype != torch.bfloat16 or out.stride(1) != 1:
        raise MoeGemvInputError(f"out must be [{M}, {D}] bf16 with unit last stride, got {tuple(out.shape)} {out.dtype}")
    if M == 0:
        return out
    h = torch.empty((M * K, I), device=hidden_states.device, dtype=torch.bfloat16)  # [P, I]
    pdl = cfg.pdl and _pdl_supported(hidden_states.device)
    order = pair_order(topk_ids) if cfg.group_pairs else None
    launch_gate_up(hidden_states, w13, topk_ids, h, cfg, pdl, order)
    scale = 1.0 if routed_scaling_factor is None else float(routed_scaling_factor)
    launch_down(h, w2, topk_ids, topk_weights, out, cfg, scale, pdl, order)
    return out


# The two stages of `moe_gemv`, inputs already checked; apart so benchmarks/moe_breakdown.py can time each.
def launch_gate_up(hidden_states, w13, topk_ids, h, cfg: MoeGemvConfig, pdl: bool, order=None) -> None:
    """h [P, I] = silu(gate) * up for every (token, expert) pair. `order`: `pair_order(topk_ids)`, for
    group_pairs (made here when not given)."""
    (M, D), K, I = hidden_states.shape, topk_ids.shape[1], h.shape[1]
    grid = (M * K, triton.cdiv(I, cfg.BLOCK_I))
    evict = "evict_first" if cfg.evict_first else ""
    wait = cfg.pdl_gate_up and _pdl_supported(h.device)
    if cfg.group_pairs:
        _gate_up_grouped_kernel[grid](
            hidden_states, w13, topk_ids, pair_order(topk_ids) if order is None else order, h,
            hidden_states.stride(0), topk_ids.stride(0), M * K,
            D=D, I=I, K=K, BLOCK_I=cfg.BLOCK_I, BLOCK_D=cfg.BLOCK_D, G=PAIR_GROUP, STAGES=cfg.gate_up_stages,
            EVICT=evict, USE_PDL=pdl, WAIT_PREVIOUS=wait, num_warps=cfg.gate_up_warps, launch_pdl=wait,
        )  # fmt: skip
        return
    _gate_up_silu_kernel[grid](
        hidden_states, w13, topk_ids, h,
        hidden_states.stride(0), topk_ids.stride(0),
        D=D, I=I, K=K, BLOCK_I=cfg.BLOCK_I, BLOCK_D=cfg.BLOCK_D, STAGES=cfg.gate_up_stages,
        EVICT=evict, USE_PDL=pdl, WAIT_PREVIOUS=wait, num_warps=cfg.gate_up_warps, launch_pdl=wait,
    )  # fmt: skip


def launch_down(h, w2, topk_ids, topk_weights, out, cfg: MoeGemvConfig, scale: float, pdl: bool,
                order=None) -> None:  # fmt: skip
    """out [M, D] = scale * sum_k topk_weights[:, k] * (h[(m, k)] @ w2[e].T), in k order. `order` as in
    `launch_gate_up`."""
    (M, D), K, I = out.shape, topk_ids.shape[1], h.shape[1]
    evict = "evict_first" if cfg.evict_first else ""
    # The bulk prefetch needs whole, 16-byte aligned row blocks.
    prefetch = pdl and cfg.prefetch_w2 and D % cfg.BLOCK_N == 0 and (cfg.BLOCK_N * I * 2) % 16 == 0
    n_blocks = triton.cdiv(D, cfg.BLOCK_N)
    if cfg.group_pairs:
        _down_grouped_kernel[(M * K, n_blocks)](
            h, w2, topk_ids, topk_weights, pair_order(topk_ids) if order is None else order, out,
            torch.empty((M * K, D), device=out.device, dtype=torch.float32), _arrival_counters(out.device, M, n_blocks),
            topk_ids.stride(0), topk_weights.stride(0), out.stride(0), M * K, scale,
            D=D, I=I, K=K, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, G=PAIR_GROUP, STAGES=cfg.down_stages,
            EVICT=evict, USE_PDL=pdl, num_warps=cfg.down_warps, launch_pdl=pdl,
        )  # fmt: skip
        return
    if cfg.split_down and M <= SPLIT_DOWN_MAX_M:
        _down_split_kernel[(M * K, n_blocks)](
            h, w2, topk_ids, topk_weights, out,
            torch.empty((M * K, D), device=out.device, dtype=torch.float32), _arrival_counters(out.device, M, n_blocks),
            topk_ids.stride(0), topk_weights.stride(0), out.stride(0), scale,
            D=D, I=I, K=K, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, STAGES=cfg.down_stages, EVICT=evict,
            USE_PDL=pdl, PREFETCH_W2=prefetch, PRELOAD_W2=cfg.preload_w2, num_warps=cfg.down_warps, launch_pdl=pdl,
        )  # fmt: skip
        return
    _down_combine_kernel[(M, n_blocks)](
        h, w2, topk_ids, topk_weights, out,
        topk_ids.stride(0), topk_weights.stride(0), out.stride(0), scale,
        D=D, I=I, K=K, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, STAGES=cfg.down_stages, EVICT=evict,
        USE_PDL=pdl, PREFETCH_W2=prefetch, num_warps=cfg.down_warps, launch_pdl=pdl,
    )  # fmt: skip


def pair_order(topk_ids: torch.Tensor) -> torch.Tensor:
    """group_pairs' visiting order: pair indices m * K + k sorted by expert id, stably ([P] int64, as the sort
    gives them: no conversion launch). One token has K distinct experts, nothing to share: its order is the
    identity (no sort launched)."""
    M, K = topk_ids.shape
    if M == 1:
        return _cached(topk_ids.device, ("order", K), lambda: torch.arange(K, device=topk_ids.device))
    return torch.sort(topk_ids.reshape(-1), stable=True).indices


_CACHE: dict[tuple, torch.Tensor] = {}


def _cached(device: torch.device, what: tuple, make) -> torch.Tensor:
    # Made once and never freed: a captured CUDA graph keeps the address. Made inside a capture, the
    # memory would belong to the graph's pool: then a fresh tensor for this call (the capture records its
    # making) and nothing kept.
    key = (device, *what)
    buf = _CACHE.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return make()
        buf = _CACHE[key] = make()
    return buf


def _arrival_counters(device: torch.device, M: int, n_blocks: int) -> torch.Tensor:
    """Arrival counters for M tokens x n_blocks row blocks, zero on entry; the kernels re-arm them to zero.
    Up to SPLIT_DOWN_MAX_M tokens they are one buffer per (device, n_blocks), shared by every call of that
    shape: calls on one device must not overlap on two streams (SGLang runs a model's forward on one stream).
    Larger M (prefill under group_pairs) zeroes a buffer per call."""
    if M > SPLIT_DOWN_MAX_M:
        return torch.zeros(M * n_blocks, device=device, dtype=torch.int32)
    return _cached(device, ("arrivals", n_blocks),
                   lambda: torch.zeros(SPLIT_DOWN_MAX_M * n_blocks, device=device, dtype=torch.int32))  # fmt: skip


def moe_gemv_aligned(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    routed_scaling_factor: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The large-M (prefill) path of alignment mode: per token bitwise equal to `moe_gemv` at any M.

    It runs the decode kernels with the decode config: the per-token arithmetic is then the same compiled
    code, whatever M is. The cost is the GEMV's: every (token, expert) pair streams its expert's rows, from
    L2 rather than HBM because the launch order keeps all programs on the same rows of every expert (see the
    module docstring), but with CUDA-core FMAs and no tensor-core reuse across tokens. benchmarks/
    moe_decode.py measures it against SGLang's grouped GEMM.
    """
    return moe_gemv(
        hidden_states, w13, w2, topk_weights, topk_ids, routed_scaling_factor=routed_scaling_factor, out=out
    )
