"""Alignment mode's forward of MicroTurnForCausalLM: the one implementation the server and the trainer share.

Both sides call `forward_hidden` and `logits` below: SGLang's MicroTurnForCausalLM with its own parameters
and RadixAttention (microturn_model.py), the PyTorch reference with its parameters and a contiguous KV cache
(reference_model.py). Only the attention call differs, and both ends of it run
`microturn_kernels.aligned_attention` with the same AlignedAttentionConfig. Every other op is either a
batch-invariant Triton kernel (microturn_kernels.batch_invariant, moe_gemv) or elementwise torch on the same
dtype, so a token's logits depend on its own token history only: not on the batch, the chunking into
prefill / extend / decode, or which side computed them. Imports torch and microturn_kernels only (no SGLang).

Forward (bf16 residual stream, T tokens; shapes in comments):
  x = reduce(embedding rows of this rank's vocab range), then per layer:
  a = rms_norm(x) -> qkv = a @ W_qkv.T -> per-head rms_norm + RoPE of q, k (fp32 table) -> attend
    -> x = x + reduce(out @ W_o.T)
  m = rms_norm(x) -> route(m @ W_router.T in fp32) -> moe_gemv(m) [+ down(silu(gate) * up) shared expert]
    -> x = x + reduce(moe)
  logits = rms_norm(x) @ W_lm_head.T in fp32 (a rank's vocab rows; the caller gathers them);
  logprobs = torch.log_softmax(logits fp32) (SGLang's sampler op)

Tensor parallelism (docs/alignment.md, "Tensor parallelism"): a rank holds SGLang's shard of every weight
(its query / kv heads, its columns of o_proj, its slice of every expert's and the shared expert's width, its
vocab rows) and computes its partial of each row-parallel product with the same kernels; `reduce` sums the
partials over the ranks at the three points marked above. `forward_hidden` runs the ranks this process
computes (`RankForward`): one on a server rank or at TP = 1, all W when one device reproduces a TP = W run
(aligned_reference.score_aligned(tp=W)). Everything between two reductions is per rank; norms, router and
residual adds are replicated and see the same bits on every rank.

Glossary: W tensor-parallel ranks, T tokens, D hidden, H query heads, KV kv heads, hd head dim, E experts,
A active experts, V vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from microturn_kernels.aligned_attention import AlignedAttentionConfig
from microturn_kernels.batch_invariant import matmul, norm_rope, rms_norm, route, silu_mul
from microturn_kernels.moe_gemv import moe_gemv
from sglang_microturn import config

ENV_ALIGNMENT = config.ALIGNMENT


class AlignmentConfigError(ValueError):
    """A model's setup does not allow alignment mode."""


def alignment_enabled() -> bool:
    """True when MICROTURN_ALIGNMENT=1 (set by `sglang-microturn serve --alignment-mode`)."""
    return config.value(config.ALIGNMENT)


def attention_config() -> AlignedAttentionConfig:
    """The aligned attention's split and tiles from MICROTURN_ATTN_SPLIT / _BLOCK_N / _BLOCK_M: the server's
    backend (server/aligned_attention_backend.py) and the trainer's KV cache (alignment/aligned_reference.py)
    both read them here, so their attention bits match."""
    return AlignedAttentionConfig(split_size=config.value(config.ATTN_SPLIT),
                                  block_n=config.value(config.ATTN_BLOCK_N),
                                  block_m=config.value(config.ATTN_BLOCK_M))


@dataclass(frozen=True)
class AlignedShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_positions: int
    experts_per_token: int
    renormalize: bool  # Qwen3-MoE's norm_topk_prob


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's tensors, borrowed (never copied) from the owning model."""

    input_norm: torch.Tensor  # [D]
    qkv: torch.Tensor  # [(H + 2 KV) hd, D], rows q, k, v (SGLang's QKVParallelLinear order)
    q_norm: torch.Tensor  # [hd]
    k_norm: torch.Tensor  # [hd]
    o_proj: torch.Tensor  # [D, H hd]
    post_norm: torch.Tensor  # [D]
    router: torch.Tensor  # [E, D]
    w13: torch.Tensor  # [E, 2I, D], rows gate then up
    w2: torch.Tensor  # [E, D, I]
    shared_gate_up: torch.Tensor | None  # [2S, D], rows gate then up
    shared_down: torch.Tensor | None  # [D, S]


@dataclass(frozen=True)
class AlignedWeights:
    """One rank's weights (the whole model at TP = 1); `shape` counts this rank's heads."""

    shape: AlignedShape
    embed: torch.Tensor  # [V / W, D]: vocab rows [vocab_start, vocab_start + V / W)
    layers: tuple[LayerWeights, ...]
    final_norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V / W, D], the same vocab rows as embed
    vocab_start: int = 0

    def check(self) -> None:
        tensors = [self.embed, self.final_norm, self.lm_head]
        for lw in self.layers:
            tensors += [t for t in vars(lw).values() if t is not None]
        wrong = sorted({str(t.dtype) for t in tensors if t.dtype != torch.bfloat16})
        if wrong:
            raise AlignmentConfigError(
                f"alignment mode runs bf16 weights only, found {', '.join(wrong)}; load the model with"
                " dtype bfloat16 (SGLang: --dtype bfloat16)")


# Attention hook: (layer index, q [T, H, hd], k [T, KV, hd], v [T, KV, hd]) -> [T, H hd] or [T, H, hd]; it
# must append k, v to the sequence's KV and run microturn_kernels.aligned_attention over it.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# The tensor-parallel sum at a row-parallel point: the partials [T, D] of the ranks this process computes, in
# rank order -> their sum over all W ranks [T, D], bitwise the same on every rank and for any T
# (fixed_order_allreduce). At TP = 1 it is `single_rank`.
Reduce = Callable[[list[torch.Tensor]], torch.Tensor]


def single_rank(partials: list[torch.Tensor]) -> torch.Tensor:
    """`Reduce` at TP = 1: the one rank's partial already is the sum."""
    (partial,) = partials
    return partial


@dataclass(frozen=True)
class RankForward:
    """What one rank's forward needs: its weights and the attention over its heads' KV cache."""

    weights: AlignedWeights
    attend: Attend


@functools.lru_cache(maxsize=8)
def rope_table(head_dim: int, theta: float, max_positions: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin fp32 [max_positions, hd / 2], indexed by position inside `norm_rope`: computed in float64 on
    the CPU, then moved, so its bits do not depend on the device or on torch's vectorisation."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float().to(device), angles.sin().float().to(device)


def attention_block(shape: AlignedShape, lw: LayerWeights, layer: int, x: torch.Tensor, positions, cos, sin,
                    attend: Attend) -> torch.Tensor:
    """o_proj(attention(rms_norm(x))) for x [T, D] at positions [T]; at TP > 1 this rank's partial (its
    heads through its columns of o_proj)."""
    T = x.shape[0]
    H, KV, hd, eps = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.rms_norm_eps
    qkv = matmul(rms_norm(x, lw.input_norm, eps), lw.qkv)  # [T, (H + 2 KV) hd]
    q = norm_rope(qkv, 0, H, lw.q_norm, positions, cos, sin, eps)  # [T, H, hd]
    k = norm_rope(qkv, H * hd, KV, lw.k_norm, positions, cos, sin, eps)  # [T, KV, hd]
    v = qkv[:, (H + KV) * hd:].view(T, KV, hd)  # [T, KV, hd] strided view; the KV cache write copies it
    out = attend(layer, q, k, v)
    return matmul(out.reshape(T, H * hd).contiguous(), lw.o_proj)  # [T, D]


def moe_block(shape: AlignedShape, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    """Routed experts (+ shared expert) of rms_norm(x) for x [T, D]; at TP > 1 this rank's partial (its
    slice of every expert's and the shared expert's width), routed + shared added per rank before the
    reduction as SGLang's MicroTurnSparseMoeBlock does."""
    m = rms_norm(x, lw.post_norm, shape.rms_norm_eps)
    weights, ids = route(matmul(m, lw.router, torch.float32), shape.experts_per_token, shape.renormalize)
    out = moe_gemv(m, lw.w13, lw.w2, weights, ids)  # [T, D] bf16
    if lw.shared_gate_up is not None:
        out = out + matmul(silu_mul(matmul(m, lw.shared_gate_up)), lw.shared_down)
    return out


def embed_block(weights: AlignedWeights, ids: torch.Tensor) -> torch.Tensor:
    """Embedding rows [T, D] of the ids in this rank's vocab range, zeros for the others (SGLang's
    VocabParallelEmbedding): one rank holds each id, so the sum over ranks is that row."""
    table = weights.embed
    local = ids - weights.vocab_start  # [T]
    mine = (local >= 0) & (local < table.shape[0])
    return torch.where(mine[:, None], table[local.clamp(0, table.shape[0] - 1)], 0)


def forward_hidden(ranks: list[RankForward], ids: torch.Tensor, positions: torch.Tensor,
                   reduce: Reduce = single_rank) -> torch.Tensor:
    """Final-normed hidden states bf16 [T, D] of tokens ids [T] at positions [T], computed by `ranks` (one
    rank, or every rank of a simulated TP = W run, in rank order); `reduce` sums their partials over all
    ranks. The residual stream x is replicated: every rank adds the same reduced bits to it."""
    s = ranks[0].weights.shape
    cos, sin = rope_table(s.head_dim, s.rope_theta, s.max_positions, str(ids.device))  # [P, hd / 2]
    x = reduce([embed_block(r.weights, ids) for r in ranks])  # [T, D]
    for i in range(len(ranks[0].weights.layers)):
        x = x + reduce([attention_block(r.weights.shape, r.weights.layers[i], i, x, positions, cos, sin, r.attend)
                        for r in ranks])
        x = x + reduce([moe_block(r.weights.shape, r.weights.layers[i], x) for r in ranks])
    return rms_norm(x, ranks[0].weights.final_norm, s.rms_norm_eps)


def logits(lm_head: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, V] of final-normed hidden states [T, D] and the lm_head weight [V, D]."""
    return matmul(hidden.to(torch.bfloat16).contiguous(), lm_head, torch.float32)
