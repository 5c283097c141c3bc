"""Aligned split-KV paged attention: the same bits for a token in prefill, any chunked extend, and decode.

Why: trainer-sampler alignment needs a token's attention output to be bitwise identical however the server
happened to compute it (one-shot prefill, a micro-turn extend of any chunk size, decode) and whatever else
shared the batch. SGLang's Triton decode splits KV at points that move with the sequence length and its
extend kernel runs one unsplit pass, so the two disagree; its extend kernel also gives a 16-token micro-turn
over a long history only a handful of CTAs.

Design (one code path for every mode):
  * Keys of every query row are split at fixed, left-aligned boundaries: split s holds keys
    [s*S, (s+1)*S) of that row's request, S = `split_size`. A row at position p uses splits 0..p//S.
  * Stage 1 (`_split_partials_kernel`): one program per (token tile, kv head, split). A token tile is TPT
    consecutive positions of one request aligned to multiples of TPT (TPT = BLOCK_M // G_PAD), and its
    BLOCK_M rows are (token slot, q head of the kv head's group). The program walks its split left to right
    in BLOCK_N tiles (tile boundaries are global multiples of BLOCK_N, S % BLOCK_N == 0), with one
    [BLOCK_M, D] x [D, BLOCK_N] score dot and one [BLOCK_M, BLOCK_N] x [BLOCK_N, DV] value dot per tile, and
    writes the split's normalised partial (acc / l, and m + log2 l) for every row whose position is in range.
  * Stage 2 (`_merge_splits_kernel`): one program per (query token, q head) folds splits 0..p//S in index
    order.
  * Decode is the same two kernels with one query token per request. A token always sits in the same tile
    row (slot p % TPT) of a tile of the same shape, so per-row math does not depend on the path. Rows of a
    tile that are past their own position in a key tile are frozen exactly (alpha = 1, p = 0), so visiting
    extra key tiles for a tile's later tokens never touches an earlier token's state.
  * Batch invariance: a program's work depends only on its (request, tile, kv head, split); no reduction
    crosses requests; no heuristic looks at the batch.

Precision contract:
  * Bitwise: for fixed (S, BLOCK_N, BLOCK_M, num_warps, num_stages, dtype, head dims, group size) and the same K/V/q
    values of a token, `aligned_extend` and `aligned_decode` return identical bits for that token whatever
    the chunking of its request, the other requests in the batch, the batch order, or `workspace_bytes`
    (launch chunking). Changing any of the fixed parameters changes bits (a trainer must use the same ones).
    Needs finite K/V in the cache for the request's own keys (0 * inf would leak NaN into masked columns).
  * Against an fp32 softmax(q k^T * scale) v reference on the same bf16 inputs: scores are accumulated in
    fp32, probabilities are rounded to the value dtype for the value dot (as in FlashAttention and SGLang's
    Triton kernels), partials and the merge are fp32, the output is rounded once. For bf16 inputs with
    |q|,|k|,|v| = O(1): |out - ref| <= ATOL + RTOL * |ref| with ATOL = RTOL = 2e-2 (see `BF16_TOLERANCE`);
    measured max errors are ~4e-3 at head_dim 128.

Not supported (callers must route elsewhere): sliding window, logit soft-cap, attention sinks, custom masks
(speculative verify), non-causal attention, fp8 KV, MLA.

Dimension letters (shape comments):
  B requests, T query tokens (all requests, packed), H q heads, KH kv heads, G = H // KH group size,
  D qk head dim, DV v head dim, N kv slots in the KV pool, L kv indices (all requests, packed),
  P split partial slots (B * CHUNK query offsets per launch), SP max splits (cdiv(max kv len, S)).

Layouts follow SGLang: q [T, H, D]; k_buffer [N, KH, D], v_buffer [N, KH, DV] (one KV slot per token,
page size 1, or any page size whose req_to_token maps tokens to slots); kv_indptr [B + 1], kv_indices [L]
(slot of each of the request's keys in position order, prefix and new tokens alike: the new tokens' K/V
must already be in the buffer); qo_indptr [B + 1] (the request's query tokens are its last
qo_len = qo_indptr[b+1] - qo_indptr[b] keys).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from microturn_kernels.fixed_order_dot import fixed_order_dot

# Stated tolerance vs an fp32 reference for bf16 inputs of magnitude O(1) (precision contract above).
BF16_TOLERANCE = {"atol": 2e-2, "rtol": 2e-2}

_LOG2E = 1.4426950408889634

# Stage 1 programs to aim for per SM when the split axis is folded into loops (see `_split_programs`). H100,
# decode from CUDA graphs (benchmarks/results/attention_h100.json): 16 made batch 32 over 32k-64k keys 7-9%
# slower than one program per split (each program then walks many short splits); one per split made batch
# 32 over 1k keys 1.8x slower (65k programs, 1k of them with work).
_PROGRAMS_PER_SM = 64

# Interpreted (TRITON_INTERPRET=1, CPU tests), tile products run as fixed_order_dot: tl.dot there is the CPU's
# BLAS, whose bits for a row depend on its slot in the tile (fixed_order_dot.py). Compiled kernels feed bf16
# to the tensor cores.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class AlignedAttentionConfig:
    """Everything that fixes the bits of a token's output (besides the inputs). Trainer and server must agree.

    split_size: S, keys per left-aligned split. Smaller S: more CTAs for decode at small batch and for
      micro-turn extends over long histories; larger S: fewer fp32 partials (prefill traffic ~ T * p / S).
    block_n: keys per inner tile (S % block_n == 0).
    block_m: rows per tile = token slots * padded group size. 16 (the smallest tl.dot tile): measured on an
      H100 (benchmarks/results/attention_h100.json), 64 made decode at batch >= 8 ~1.55x slower than SGLang's
      Triton decode (padding rows cost real work there), 16 keeps it within ~5-10% while a 16-token extend
      over 32k of history is still ~8x faster than SGLang's extend.
    num_warps, num_stages: 2 and 3. Measured on an H200, decode replayed from CUDA graphs beside SGLang's
      Triton decode: 2 warps and 3 stages took 0.15-1.02x SGLang's time at every measured (batch 1-32,
      1k-64k keys) and ran 16-token extends over 8k-64k 3.2-15x faster than SGLang's extend
      (benchmarks/results/attention_variants_stages_h200.json); 2 warps with 2 stages 0.15-1.05x, 4 warps
      with 2 stages 0.18-1.38x (attention_variants_h200.json). Not profiled; a stage-1 program's [16, 64]
      score tile is little work to spread over 4 warps, and at 1k keys a program's 4 key tiles are a chain
      of load latencies that a third stage overlaps.
    """

    split_size: int = 256
    block_n: int = 64
    block_m: int = 16
    num_warps: int = 2
    num_stages: int = 3

    def __post_init__(self):
        for name in ("split_size", "block_n", "block_m"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v}: must be a power of two >= 16 (tl.dot needs M, N, K >= 16)")
        if self.split_size % self.block_n:
            raise ValueError(
                f"split_size={self.split_size} is not a multiple of block_n={self.block_n}: key tiles would"
                " straddle split boundaries; pick split_size >= block_n"
            )

    def token_slots(self, group: int) -> int:
        """TPT: query tokens per tile for a GQA group of `group` q heads per kv head."""
        g_pad = triton.next_power_of_2(group)
        if g_pad > self.block_m:
            raise ValueError(f"group size {group} exceeds block_m={self.block_m}: raise block_m to {g_pad}")
        return self.block_m // g_pad

    def max_splits(self, max_kv_len: int) -> int:
        return max(1, triton.cdiv(max_kv_len, self.split_size))


# Ints that may equal 1 would otherwise be specialised into the binary (decode would run another build).
@triton.jit(do_not_specialize=["chunk_lo", "chunk_len", "tiles_per_req", "num_split_progs"])
def _split_partials_kernel(
    Q,  # [T, H, D]
    K_Buffer,  # [N, KH, D]
    V_Buffer,  # [N, KH, DV]
    Part_O,  # [P, H, SP, DV] fp32: acc / l per (query offset, q head, split)
    Part_L,  # [P, H, SP] fp32: m + log2(l), log2 domain
    qo_indptr,  # [B + 1]
    kv_indptr,  # [B + 1]
    kv_indices,  # [L]
    sm_scale_log2,  # softmax scale * log2(e)
    chunk_lo,  # first query offset (within each request's new tokens) this launch covers
    chunk_len,  # CHUNK: query offsets per request this launch covers
    tiles_per_req,  # token tiles per request this launch
    num_split_progs,  # programs along the split axis; each loops over splits sp, sp + num_split_progs, ...
    stride_qt,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_pot,
    stride_poh,
    stride_pos,
    stride_plt,
    stride_plh,
    G: tl.constexpr,  # q heads per kv head
    G_PAD: tl.constexpr,
    TPT: tl.constexpr,  # token slots per tile; BLOCK_M == TPT * G_PAD
    BLOCK_M: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    FIXED_ORDER_DOT: tl.constexpr,  # interpreter only (see _INTERPRET)
):
    pid_tile = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    req = pid_tile // tiles_per_req
    tile = pid_tile % tiles_per_req

    q_start = tl.load(qo_indptr + req)
    qo_len = tl.load(qo_indptr + req + 1) - q_start
    kv_start = tl.load(kv_indptr + req)
    kv_len = tl.load(kv_indptr + req + 1) - kv_start
    prefix = kv_len - qo_len
    lo = chunk_lo
    hi = tl.minimum(chunk_lo + chunk_len, qo_len)  # query offsets [lo, hi) of this request in this launch
    first_pos = prefix + lo
    last_pos = prefix + hi - 1
    pos0 = (first_pos // TPT + tile) * TPT  # tile rows hold positions [pos0, pos0 + TPT), pos0 % TPT == 0
    if (lo < hi) & (pos0 <= last_pos):
        rows = tl.arange(0, BLOCK_M)
        slot = rows // G_PAD
        hh = rows % G_PAD
        pos = pos0 + slot  # [M] absolute position of each row's query token
        row_ok = (hh < G) & (pos >= first_pos) & (pos <= last_pos)
        head = kvh * G + hh
        max_pos = tl.minimum(pos0 + TPT - 1, last_pos)
        n_splits = max_pos // SPLIT + 1

        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q_row = (q_start + (pos - prefix)).to(tl.int64)
        q = tl.load(
            Q + q_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
            mask=row_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )  # [M, D]
        # Partial slot of each row: (request, query offset - chunk_lo).
        p_row = (req * chunk_len + (pos - prefix - lo)).to(tl.int64)  # int64: SGLang's graph buffers are big

        for s in range(sp, n_splits, num_split_progs):
            split_start = s * SPLIT
            split_end = tl.minimum(split_start + SPLIT, max_pos + 1)
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
            for n0 in range(split_start, split_end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                in_kv = offs_n < split_end
                loc = tl.load(kv_indices + kv_start + offs_n, mask=in_kv, other=0)
                k = tl.load(
                    K_Buffer + loc[None, :] * stride_kn + kvh * stride_kh + offs_d[:, None],
                    mask=in_kv[None, :] & (offs_d[:, None] < D),
                    other=0.0,
                )  # [D, BLOCK_N]
                if FIXED_ORDER_DOT:
                    qk = fixed_order_dot(q, k)
                else:
                    qk = tl.dot(q, k)
                qk = qk * sm_scale_log2  # [M, BLOCK_N], log2 domain
                qk = tl.where(offs_n[None, :] <= pos[:, None], qk, float("-inf"))
                # A row is live in this key tile iff its own position reaches the tile; dead rows keep
                # their state bit-for-bit (alpha = 1, p = 0), so tiles visited only for later tokens of the
                # tile are invisible to earlier ones.
                live = n0 <= pos
                m_new = tl.where(live, tl.maximum(m_i, tl.max(qk, 1)), m_i)
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf in rows never live
                alpha = tl.where(live, tl.math.exp2(m_i - m_sub), 1.0)
                p = tl.math.exp2(qk - m_sub[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(
                    V_Buffer + loc[:, None] * stride_vn + kvh * stride_vh + offs_dv[None, :],
                    mask=in_kv[:, None] & (offs_dv[None, :] < DV),
                    other=0.0,
                )  # [BLOCK_N, DV]
                acc = acc * alpha[:, None]
                if FIXED_ORDER_DOT:
                    acc = acc + fixed_order_dot(p.to(v.dtype), v)
                else:
                    acc = tl.dot(p.to(v.dtype), v, acc)
                m_i = m_new
            has = row_ok & (pos >= split_start)
            l_safe = tl.where(has, l_i, 1.0)
            tl.store(
                Part_O + p_row[:, None] * stride_pot + head[:, None] * stride_poh + s * stride_pos
                + offs_dv[None, :],
                acc / l_safe[:, None],
                mask=has[:, None] & (offs_dv[None, :] < DV),
            )
            tl.store(
                Part_L + p_row * stride_plt + head * stride_plh + s,
                m_i + tl.math.log2(l_safe),
                mask=has,
            )


@triton.jit(do_not_specialize=["chunk_lo", "chunk_len"])
def _merge_splits_kernel(
    Part_O,  # [P, H, SP, DV]
    Part_L,  # [P, H, SP]
    O,  # [T, H, DV]
    qo_indptr,
    kv_indptr,
    chunk_lo,
    chunk_len,
    stride_pot,
    stride_poh,
    stride_pos,
    stride_plt,
    stride_plh,
    stride_ot,
    stride_oh,
    SPLIT: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # req * chunk_len + (query offset - chunk_lo)
    head = tl.program_id(1)
    req = pid // chunk_len
    q_off = chunk_lo + pid % chunk_len
    q_start = tl.load(qo_indptr + req)
    qo_len = tl.load(qo_indptr + req + 1) - q_start
    kv_len = tl.load(kv_indptr + req + 1) - tl.load(kv_indptr + req)
    if q_off < qo_len:
        pos = kv_len - qo_len + q_off
        offs_dv = tl.arange(0, BLOCK_DV)
        mask_dv = offs_dv < DV
        e_max = -float("inf")
        e_sum = 0.0
        acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
        for s in range(0, pos // SPLIT + 1):  # fixed order: split 0 first
            tv = tl.load(Part_O + pid * stride_pot + head * stride_poh + s * stride_pos + offs_dv, mask=mask_dv)
            lse = tl.load(Part_L + pid * stride_plt + head * stride_plh + s)
            n_max = tl.maximum(e_max, lse)
            old = tl.math.exp2(e_max - n_max)
            w = tl.math.exp2(lse - n_max)
            acc = acc * old + w * tv
            e_sum = e_sum * old + w
            e_max = n_max
        tl.store(
            O + (q_start + q_off) * stride_ot + head * stride_oh + offs_dv,
            (acc / e_sum).to(O.dtype.element_ty),
            mask=mask_dv,
        )


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    # Cached: get_device_properties costs tens of microseconds of host time, paid on every eager extend.
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_programs(other_programs: int, sp_max: int, device: torch.device) -> int:
    """Programs along the split axis; each loops over splits sp, sp + n, ... (bits do not depend on n).

    One program per split (n = sp_max) launches a grid sized for the longest possible request: with
    SGLang's context length and a short batch most programs find no split to do, and at decode batch 32
    over 1k keys those empty programs cost more than the work (65k programs for 1k live ones). Folding
    splits into loops until the grid is ~_PROGRAMS_PER_SM waves of the GPU keeps long single requests
    parallel and bounds the empty programs."""
    return max(1, min(sp_max, triton.cdiv(_PROGRAMS_PER_SM * _sm_count(device), other_programs)))


def _check(q, k_buffer, v_buffer, o):
    if q.dim() != 3 or k_buffer.dim() != 3 or v_buffer.dim() != 3 or o.dim() != 3:
        raise ValueError(
            f"aligned attention wants q [T, H, D], k/v_buffer [N, KH, D], o [T, H, DV]; got q {tuple(q.shape)},"
            f" k_buffer {tuple(k_buffer.shape)}, v_buffer {tuple(v_buffer.shape)}, o {tuple(o.shape)}"
            " (4-D paged views: pass the 3-D slot view)"
        )
    if q.shape[1] % k_buffer.shape[1]:
        raise ValueError(f"q heads {q.shape[1]} not a multiple of kv heads {k_buffer.shape[1]}")
    if q.stride(-1) != 1 or k_buffer.stride(-1) != 1 or v_buffer.stride(-1) != 1 or o.stride(-1) != 1:
        raise ValueError("aligned attention needs unit stride on the head dim of q, k/v_buffer and o")


def aligned_extend(
    q: torch.Tensor,  # [T, H, D]
    k_buffer: torch.Tensor,  # [N, KH, D]
    v_buffer: torch.Tensor,  # [N, KH, DV]
    o: torch.Tensor,  # [T, H, DV] written
    qo_indptr: torch.Tensor,  # [B + 1]
    kv_indptr: torch.Tensor,  # [B + 1], kv lengths include the new tokens
    kv_indices: torch.Tensor,  # [L]
    max_qo_len: int,  # host bound on qo_indptr diffs (SGLang's max_extend_len)
    max_kv_len: int,  # host bound on kv lengths (context length)
    sm_scale: float | None = None,
    config: AlignedAttentionConfig = AlignedAttentionConfig(),
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    workspace_bytes: int = 512 << 20,
    num_split_programs: int | None = None,
) -> torch.Tensor:
    """Causal paged attention for every query token of every request (prefill, extend, mixed, decode).

    Never syncs with the host (grid and launch count depend on the host ints only), so it can be captured
    in a CUDA graph when `workspace` is given. `workspace` = (part_o [P, H, SP, DV] fp32, part_l [P, H, SP]
    fp32) with P >= B * chunk; without it a workspace of at most ~`workspace_bytes` is allocated and query
    offsets are processed in chunks that fit (bits do not depend on the chunking).
    """
    _check(q, k_buffer, v_buffer, o)
    T, H, D = q.shape
    KH = k_buffer.shape[1]
    DV = v_buffer.shape[2]
    G = H // KH
    B = qo_indptr.shape[0] - 1
    if sm_scale is None:
        sm_scale = D**-0.5
    if B == 0 or T == 0 or max_qo_len <= 0:
        return o
    tpt = config.token_slots(G)
    sp_max = config.max_splits(max_kv_len)
    if workspace is not None:
        part_o, part_l = workspace
        if part_o.shape[1:] != (H, sp_max, DV) or part_l.shape[1:] != (H, sp_max):
            raise ValueError(
                f"workspace shapes {tuple(part_o.shape)} / {tuple(part_l.shape)} do not match"
                f" [P, {H}, {sp_max}, {DV}] / [P, {H}, {sp_max}] for max_kv_len={max_kv_len},"
                f" split_size={config.split_size}"
            )
        if part_l.stride(2) != 1 or part_o.stride(3) != 1:
            raise ValueError("workspace must be contiguous along splits (part_l) and DV (part_o)")
        chunk = min(max_qo_len, part_o.shape[0] // B)
        if chunk < 1:
            raise ValueError(f"workspace holds {part_o.shape[0]} partial rows, fewer than batch {B}")
    else:
        # Split slots rounded up to a multiple of 16: the partials' strides are kernel arguments that Triton
        # specialises on divisibility by 16, so a growing session would otherwise trigger a new compile
        # (~0.5 s, a stalled micro-turn) each time its split count crosses a multiple of 16.
        sp_alloc = triton.cdiv(sp_max, 16) * 16
        per_offset = B * H * sp_alloc * (DV + 1) * 4
        chunk = max(1, min(max_qo_len, workspace_bytes // per_offset))
        part_o = torch.empty((B * chunk, H, sp_alloc, DV), dtype=torch.float32, device=q.device)
        part_l = torch.empty((B * chunk, H, sp_alloc), dtype=torch.float32, device=q.device)
    tiles_per_req = triton.cdiv(chunk + tpt - 1, tpt)
    if num_split_programs is None:
        split_progs = _split_programs(B * tiles_per_req * KH, sp_max, q.device)
    else:
        split_progs = max(1, min(num_split_programs, sp_max))
    meta = dict(
        G=G,
        G_PAD=triton.next_power_of_2(G),
        TPT=tpt,
        BLOCK_M=config.block_m,
        SPLIT=config.split_size,
        BLOCK_N=config.block_n,
        D=D,
        BLOCK_D=triton.next_power_of_2(D),
        DV=DV,
        BLOCK_DV=triton.next_power_of_2(DV),
        FIXED_ORDER_DOT=_INTERPRET,
    )
    for chunk_lo in range(0, max_qo_len, chunk):
        _split_partials_kernel[(B * tiles_per_req, KH, split_progs)](
            q, k_buffer, v_buffer, part_o, part_l, qo_indptr, kv_indptr, kv_indices,
            sm_scale * _LOG2E, chunk_lo, chunk, tiles_per_req, split_progs,
            q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
            v_buffer.stride(0), v_buffer.stride(1),
            part_o.stride(0), part_o.stride(1), part_o.stride(2), part_l.stride(0), part_l.stride(1),
            num_warps=config.num_warps, num_stages=config.num_stages, **meta,
        )  # fmt: skip
        _merge_splits_kernel[(B * chunk, H)](
            part_o, part_l, o, qo_indptr, kv_indptr, chunk_lo, chunk,
            part_o.stride(0), part_o.stride(1), part_o.stride(2), part_l.stride(0), part_l.stride(1),
            o.stride(0), o.stride(1),
            SPLIT=config.split_size, DV=DV, BLOCK_DV=meta["BLOCK_DV"], num_warps=4,
        )  # fmt: skip
    return o


def aligned_decode(
    q: torch.Tensor,  # [B, H, D], one query token per request (its last key)
    k_buffer: torch.Tensor,  # [N, KH, D]
    v_buffer: torch.Tensor,  # [N, KH, DV]
    o: torch.Tensor,  # [B, H, DV] written
    kv_indptr: torch.Tensor,  # [B + 1]
    kv_indices: torch.Tensor,  # [L]
    max_kv_len: int,
    sm_scale: float | None = None,
    config: AlignedAttentionConfig = AlignedAttentionConfig(),
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    qo_indptr: torch.Tensor | None = None,
    num_split_programs: int | None = None,
) -> torch.Tensor:
    """Decode = `aligned_extend` with one query token per request: the same kernels, the same bits.

    `workspace` = SGLang's (attn_logits [>=B, H, SP, DV], attn_lse [>=B, H, SP]); `qo_indptr` = arange(B + 1)
    (pass a preallocated one under CUDA-graph capture to skip the arange).
    """
    B = q.shape[0]
    if qo_indptr is None:
        qo_indptr = torch.arange(B + 1, dtype=torch.int32, device=q.device)
    return aligned_extend(
        q, k_buffer, v_buffer, o, qo_indptr[: B + 1], kv_indptr[: B + 1], kv_indices, 1, max_kv_len,
        sm_scale=sm_scale, config=config, workspace=workspace, num_split_programs=num_split_programs,
    )  # fmt: skip
