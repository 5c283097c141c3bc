"""Alignment mode's forward of MicroTurnForCausalLM: the one implementation the server and the trainer share.

Both sides call `forward_hidden` and `logits` below: SGLang's MicroTurnForCausalLM with its own parameters
and RadixAttention (microturn_model.py), the PyTorch reference with its parameters and a contiguous KV cache
(reference_model.py). Only the attention call differs, and both ends of it run
`microturn_kernels.aligned_attention` with the same AlignedAttentionConfig. Every other op is either a
batch-invariant Triton kernel (microturn_kernels.batch_invariant, moe_gemv) or elementwise torch on the same
dtype, so a token's logits depend on its own token history only: not on the batch, the chunking into
prefill / extend / decode, or which side computed them. Imports torch and microturn_kernels only (no SGLang).

Per layer (bf16 residual stream, T tokens; shapes in comments):
  a = rms_norm(x) -> qkv = a @ W_qkv.T -> per-head rms_norm + RoPE of q, k (fp32 table) -> attend
    -> x = x + out @ W_o.T
  m = rms_norm(x) -> route(m @ W_router.T in fp32) -> moe_gemv(m) [+ down(silu(gate) * up) shared expert]
    -> x = x + moe
  logits = rms_norm(x) @ W_lm_head.T in fp32; logprobs = torch.log_softmax(logits fp32) (SGLang's sampler op)

Glossary: T tokens, D hidden, H query heads, KV kv heads, hd head dim, E experts, A active experts, V vocab.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from microturn_kernels.batch_invariant import matmul, norm_rope, rms_norm, route, silu_mul
from microturn_kernels.moe_gemv import moe_gemv

ENV_ALIGNMENT = "MICROTURN_ALIGNMENT"


class AlignmentConfigError(ValueError):
    """MICROTURN_ALIGNMENT or a model's setup does not allow alignment mode."""


def alignment_enabled() -> bool:
    """True when MICROTURN_ALIGNMENT=1 (set by `sglang-microturn serve --alignment-mode`)."""
    raw = os.environ.get(ENV_ALIGNMENT, "0").strip().lower()
    if raw not in ("", "0", "1", "false", "true"):
        raise AlignmentConfigError(f"{ENV_ALIGNMENT}={raw!r}: use 1 (alignment mode) or 0")
    return raw in ("1", "true")


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
    shape: AlignedShape
    embed: torch.Tensor  # [V, D]
    layers: tuple[LayerWeights, ...]
    final_norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]

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


@functools.lru_cache(maxsize=8)
def rope_table(head_dim: int, theta: float, max_positions: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin fp32 [max_positions, hd / 2], indexed by position inside `norm_rope`: computed in float64 on
    the CPU, then moved, so its bits do not depend on the device or on torch's vectorisation."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float().to(device), angles.sin().float().to(device)


def attention_block(shape: AlignedShape, lw: LayerWeights, layer: int, x: torch.Tensor, positions, cos, sin,
                    attend: Attend) -> torch.Tensor:
    """o_proj(attention(rms_norm(x))) for x [T, D] at positions [T]."""
    T = x.shape[0]
    H, KV, hd, eps = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.rms_norm_eps
    qkv = matmul(rms_norm(x, lw.input_norm, eps), lw.qkv)  # [T, (H + 2 KV) hd]
    q = norm_rope(qkv, 0, H, lw.q_norm, positions, cos, sin, eps)  # [T, H, hd]
    k = norm_rope(qkv, H * hd, KV, lw.k_norm, positions, cos, sin, eps)  # [T, KV, hd]
    v = qkv[:, (H + KV) * hd:].view(T, KV, hd)  # [T, KV, hd] strided view; the KV cache write copies it
    out = attend(layer, q, k, v)
    return matmul(out.reshape(T, H * hd).contiguous(), lw.o_proj)  # [T, D]


def moe_block(shape: AlignedShape, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    """Routed experts (+ shared expert) of rms_norm(x) for x [T, D]."""
    m = rms_norm(x, lw.post_norm, shape.rms_norm_eps)
    weights, ids = route(matmul(m, lw.router, torch.float32), shape.experts_per_token, shape.renormalize)
    out = moe_gemv(m, lw.w13, lw.w2, weights, ids)  # [T, D] bf16
    if lw.shared_gate_up is not None:
        out = out + matmul(silu_mul(matmul(m, lw.shared_gate_up)), lw.shared_down)
    return out


def forward_hidden(weights: AlignedWeights, ids: torch.Tensor, positions: torch.Tensor,
                   attend: Attend) -> torch.Tensor:
    """Final-normed hidden states bf16 [T, D] of tokens ids [T] at positions [T]."""
    s = weights.shape
    cos, sin = rope_table(s.head_dim, s.rope_theta, s.max_positions, str(ids.device))  # [P, hd / 2]
    x = weights.embed[ids]  # [T, D]
    for i, lw in enumerate(weights.layers):
        x = x + attention_block(s, lw, i, x, positions, cos, sin, attend)
        x = x + moe_block(s, lw, x)
    return rms_norm(x, weights.final_norm, s.rms_norm_eps)


def logits(lm_head: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, V] of final-normed hidden states [T, D] and the lm_head weight [V, D]."""
    return matmul(hidden.to(torch.bfloat16).contiguous(), lm_head, torch.float32)
