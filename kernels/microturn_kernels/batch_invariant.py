"""Batch-invariant building blocks of alignment mode: matmul, RMSNorm and MoE routing in Triton.

Why: cuBLAS and torch's reductions pick tile shapes, split-K and vectorisation by the problem size, so the
bits of one token's row change with how many other rows share the call (a 1-token decode step vs. a
4096-token prefill). Alignment mode needs a token's result to depend on its own inputs only. Each kernel here
fixes its reduction order from the weight shape and a constant config, never from the row count M:

  * `matmul(x, w)` = x @ w.T: one tile config for every M (`MATMUL_CONFIG`), K reduced in BLOCK_K chunks in
    index order into one fp32 accumulator, no split-K; rows of a tile never mix (a tl.dot output element
    only reads its own row of x), so padding rows or neighbours cannot change a row's bits.
  * `rms_norm(x, w, eps)`: one program per row over the whole row (BLOCK_D = next_pow2(D)).
  * `route(logits, top_k)`: one program per row: fp32 softmax over all experts, top-k by repeated arg-max
    (ties to the lowest expert id), renormalised in k order. The MoE weights themselves run through
    moe_gemv.py, which is batch-invariant the same way.
  * `norm_rope(...)`: per-head RMSNorm then neox RoPE of one (token, head) row per program; `silu_mul`:
    elementwise. Fused only to save launches (decode of a small model is launch-bound): one kernel where
    torch would run about a dozen.

Precision contract:
  * Bitwise: for the same inputs of a row, the same config, GPU architecture and Triton version, the row's
    output bits are identical whatever M is, whatever the other rows hold, and wherever the row sits.
  * Against torch in fp32 on the same bf16 inputs: fp32 accumulation, one rounding of the output; bf16
    outputs within `BF16_TOLERANCE` (rtol/atol 2^-7 relative to the output scale: one bf16 rounding plus fp32
    order); fp32 outputs within 1e-4 relative for K <= 4096.
  * Compiled (GPU) and interpreted (TRITON_INTERPRET=1, CPU tests) bits differ; each is self-consistent.

Dimension letters: M rows (tokens), K reduction (hidden), N output features, D normalised width, E experts,
A experts per token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from microturn_kernels.fixed_order_dot import fixed_order_dot
from microturn_kernels.rounding import to_bf16

BF16_TOLERANCE = {"rtol": 2.0**-7, "atol_scale": 2.0**-7}  # atol = atol_scale * max|reference|

# Interpreted (TRITON_INTERPRET=1, the CPU tests), the tile product is fixed_order_dot: tl.dot there is the
# CPU's BLAS, whose bits for a row depend on the row's slot in the tile (see fixed_order_dot.py).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class BatchInvariantInputError(ValueError):
    """An input of a batch-invariant kernel has a shape, dtype or layout the kernel does not take."""


@dataclass(frozen=True)
class MatmulConfig:
    """The one tile config of `matmul`. Changing it changes low bits: trainer and server must share it.

    32 x 64 tiles: decode and micro-turn extends (M <= 32) fill one row tile, so no work is spent on padding
    rows beyond 32, and N / 64 programs keep a small model's projections launch-bound rather than idle-SM
    bound; a 4096-token prefill still runs at tensor-core rates (measured in benchmarks/alignment_e2e.py).
    """

    block_m: int = 32
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


MATMUL_CONFIG = MatmulConfig()


@triton.jit(do_not_specialize=["M"])  # M == 1 would otherwise compile a second binary for decode
def _matmul_kernel(
    X,  # [M, K] bf16, row stride stride_xm
    W,  # [N, K] bf16, row stride stride_wn
    Y,  # [M, N] out, row stride stride_ym
    M,
    stride_xm,
    stride_wn,
    stride_ym,
    N: tl.constexpr,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    OUT_BF16: tl.constexpr,
    FIXED_ORDER_DOT: tl.constexpr,  # interpreter only (see _INTERPRET)
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = X + rows[:, None].to(tl.int64) * stride_xm
    w_cols = W + cols[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # fixed order over K: the only reduction a row sees
        k = k0 + ks
        k_ok = k < K
        a = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        b = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BK, BN]
        if FIXED_ORDER_DOT:
            acc = acc + fixed_order_dot(a, b)
        else:
            acc = tl.dot(a, b, acc)
    out = Y + rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if OUT_BF16:
        tl.store(out, to_bf16(acc), mask=mask)
    else:
        tl.store(out, acc, mask=mask)


def matmul(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
           config: MatmulConfig = MATMUL_CONFIG) -> torch.Tensor:
    """y [M, N] = x [M, K] @ w [N, K].T, bf16 inputs, fp32 accumulation, out_dtype bf16 or fp32."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise BatchInvariantInputError(
            f"matmul wants x [M, K] and w [N, K]; got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        raise BatchInvariantInputError(
            f"matmul takes bf16 x and w, got {x.dtype} and {w.dtype}; load the model in bfloat16")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise BatchInvariantInputError(f"matmul out_dtype {out_dtype}: use torch.bfloat16 or torch.float32")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise BatchInvariantInputError("matmul needs unit stride along K for x and w (call .contiguous())")
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if M == 0:
        return y
    grid = (triton.cdiv(M, config.block_m), triton.cdiv(N, config.block_n))
    _matmul_kernel[grid](
        x, w, y, M, x.stride(0), w.stride(0), y.stride(0), N=N, K=K,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        OUT_BF16=out_dtype == torch.bfloat16, FIXED_ORDER_DOT=_INTERPRET,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return y


@triton.jit
def _rms_norm_kernel(
    X,  # [M, D], row stride stride_xm
    W,  # [D]
    Y,  # [M, D] contiguous, dtype of X
    stride_xm,
    eps,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(X + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    y = x * inv_rms * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    if OUT_BF16:
        tl.store(Y + row * D + offs, to_bf16(y), mask=mask)
    else:
        tl.store(Y + row * D + offs, y, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., D] (fp32 math, weight applied in fp32, output in x.dtype)."""
    D = x.shape[-1]
    if weight.shape != (D,):
        raise BatchInvariantInputError(f"rms_norm weight {tuple(weight.shape)} does not match x's last dim {D}")
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise BatchInvariantInputError(f"rms_norm takes bf16 or fp32 x, got {x.dtype}")
    x2 = x.reshape(-1, D)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty((x2.shape[0], D), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), float(eps), D=D,
                                         BLOCK_D=triton.next_power_of_2(D), OUT_BF16=x.dtype == torch.bfloat16)
    return y.view(x.shape)


@triton.jit
def _route_kernel(
    Logits,  # [M, E] float, row stride stride_lm
    Weights,  # [M, A] fp32 out
    Ids,  # [M, A] int32 out
    stride_lm,
    E: tl.constexpr,
    BLOCK_E: tl.constexpr,
    A: tl.constexpr,
    BLOCK_A: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < E
    logit = tl.load(Logits + row * stride_lm + offs, mask=valid, other=-float("inf")).to(tl.float32)
    p = tl.exp(logit - tl.max(logit, axis=0))
    prob = p / tl.sum(p, axis=0)
    left = tl.where(valid, prob, -1.0)  # probabilities not yet taken; taken and padding slots hold -1
    slots = tl.arange(0, BLOCK_A)
    top_w = tl.zeros([BLOCK_A], dtype=tl.float32)
    top_id = tl.zeros([BLOCK_A], dtype=tl.int32)
    total = 0.0
    for k in tl.static_range(A):  # k-th largest, ties to the lowest expert id
        best = tl.max(left, axis=0)
        best_id = tl.min(tl.where(left == best, offs, BLOCK_E), axis=0)
        top_w = tl.where(slots == k, best, top_w)
        top_id = tl.where(slots == k, best_id, top_id)
        total += best
        left = tl.where(offs == best_id, -1.0, left)
    if RENORMALIZE:
        top_w = top_w / total
    tl.store(Weights + row * A + slots, top_w, mask=slots < A)
    tl.store(Ids + row * A + slots, top_id, mask=slots < A)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 [M, A], expert ids int32 [M, A]) from router logits [M, E]: softmax in fp32, top-A,
    optionally renormalised to sum 1 (Qwen3-MoE's norm_topk_prob)."""
    if router_logits.dim() != 2 or router_logits.stride(1) != 1:
        raise BatchInvariantInputError(
            f"route wants router logits [M, E] with unit stride along E, got {tuple(router_logits.shape)}")
    M, E = router_logits.shape
    if not 1 <= top_k <= E:
        raise BatchInvariantInputError(f"top_k={top_k} must be between 1 and the expert count {E}")
    weights = torch.empty((M, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((M, top_k), dtype=torch.int32, device=router_logits.device)
    if M:
        _route_kernel[(M,)](router_logits, weights, ids, router_logits.stride(0), E=E,
                            BLOCK_E=triton.next_power_of_2(E), A=top_k, BLOCK_A=triton.next_power_of_2(top_k),
                            RENORMALIZE=renormalize)
    return weights, ids


@triton.jit
def _norm_rope_kernel(
    X,  # [T, *] rows holding `heads` consecutive head vectors from column col0
    Positions,  # [T] int
    Cos,  # [P, HALF] fp32
    Sin,  # [P, HALF] fp32
    W,  # [HD] norm weight
    Y,  # [T, heads, HD] contiguous, dtype of X
    stride_xt,
    col0,
    eps,
    HEADS: tl.constexpr,
    HD: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    src = X + t * stride_xt + col0 + h * HD
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / HD + eps)
    # The normed head is rounded to the activation dtype before RoPE, as an unfused norm would store it.
    n1 = to_bf16(x1 * inv_rms * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)).to(tl.float32)
    n2 = to_bf16(x2 * inv_rms * tl.load(W + HALF + offs, mask=mask, other=0.0).to(tl.float32)).to(tl.float32)
    pos = tl.load(Positions + t).to(tl.int64)
    c = tl.load(Cos + pos * HALF + offs, mask=mask, other=0.0)
    s = tl.load(Sin + pos * HALF + offs, mask=mask, other=0.0)
    dst = Y + (t * HEADS + h) * HD
    tl.store(dst + offs, to_bf16(n1 * c - n2 * s), mask=mask)
    tl.store(dst + HALF + offs, to_bf16(n2 * c + n1 * s), mask=mask)


def norm_rope(x: torch.Tensor, col0: int, heads: int, weight: torch.Tensor, positions: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, heads, HD] bf16: RMSNorm (weight [HD], fp32 math, rounded to bf16) then neox RoPE (fp32, rounded
    to bf16) of the `heads` head vectors of x [T, *] that start at column col0; cos, sin [P, HD / 2] fp32
    tables indexed by positions [T]."""
    HD = weight.shape[0]
    T = x.shape[0]
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.stride(1) != 1 or col0 + heads * HD > x.shape[1]:
        raise BatchInvariantInputError(
            f"norm_rope wants bf16 x [T, >= {col0 + heads * HD}] with unit column stride, got {x.dtype}"
            f" {tuple(x.shape)}")
    if HD % 2 or cos.shape[1] != HD // 2 or sin.shape != cos.shape or cos.dtype != torch.float32:
        raise BatchInvariantInputError(
            f"norm_rope: head dim {HD} needs fp32 cos/sin tables [P, {HD // 2}], got {tuple(cos.shape)} {cos.dtype}")
    if not (cos.is_contiguous() and sin.is_contiguous()) or positions.shape != (T,):
        raise BatchInvariantInputError("norm_rope: cos/sin must be contiguous and positions [T]")
    y = torch.empty((T, heads, HD), dtype=x.dtype, device=x.device)
    if T:
        _norm_rope_kernel[(T, heads)](x, positions, cos, sin, weight, y, x.stride(0), col0, float(eps), HEADS=heads,
                                      HD=HD, HALF=HD // 2, BLOCK=triton.next_power_of_2(HD // 2))
    return y


@triton.jit
def _silu_mul_kernel(GU, Y, stride_gt, S: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    g = tl.load(GU + t * stride_gt + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + t * stride_gt + S + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + t * S + offs, to_bf16(g / (1.0 + tl.exp(-g)) * u), mask=mask)


SILU_MUL_BLOCK = 1024


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up [T, S] bf16 of gate_up [T, 2S] = [gate | up], fp32 math, rounded once."""
    if gate_up.dtype != torch.bfloat16 or gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise BatchInvariantInputError(
            f"silu_mul wants bf16 [T, 2S] with unit column stride, got {gate_up.dtype} {tuple(gate_up.shape)}")
    T, S = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty((T, S), dtype=gate_up.dtype, device=gate_up.device)
    if T:
        block = min(SILU_MUL_BLOCK, triton.next_power_of_2(S))
        _silu_mul_kernel[(T, triton.cdiv(S, block))](gate_up, y, gate_up.stride(0), S=S, BLOCK=block)
    return y
