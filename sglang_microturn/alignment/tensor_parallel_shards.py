"""Rank r's shard of a whole model's `AlignedWeights`, cut exactly as SGLang 0.5.17 cuts Qwen3-MoE at
tensor parallelism W (moe_tp = W, no expert parallelism), so that one device can compute every rank's
partials (aligned_reference.score_aligned(tp=W)) and a test can hand each process its shard.

What SGLang's loaders put on rank r (sglang/srt/layers/...):
  * q/k/v (`QKVParallelLinear`): query heads [r H/W, (r + 1) H/W); kv heads [r KV/W, (r + 1) KV/W), or when
    KV < W the one kv head r // (W / KV) (each kv head replicated on W / KV ranks); stacked q, k, v.
  * o_proj (`RowParallelLinear`): the input columns of this rank's query heads.
  * routed experts (`FusedMoE._load_w13` / `_load_w2`, moe_tp = W): every expert's gate rows and up rows
    [r I/W, (r + 1) I/W), stacked gate then up; w2 columns of the same range.
  * shared expert (`Qwen3MoeMLP`: `MergedColumnParallelLinear` + `RowParallelLinear`): the same for width S.
  * embedding and lm_head (`VocabParallelEmbedding` / `ParallelLMHead`): the vocab is padded to a multiple of
    64 (`pad_vocab_size`), each rank owns V_pad / W consecutive rows; the padding rows are never looked up,
    so they are left out here.
  * norms and the router: replicated.
Shards are contiguous copies (SGLang's parameters are); the whole model's tensors are not modified.

Glossary: W ranks, r rank, D hidden, H query heads, KV kv heads, hd head dim, E experts, I expert width,
S shared-expert width, V vocab.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from sglang_microturn.alignment.aligned_forward import AlignedWeights, LayerWeights

# sglang/srt/layers/vocab_parallel_embedding.py: DEFAULT_VOCAB_PADDING_SIZE.
VOCAB_PADDING = 64


class ShardingError(ValueError):
    """A model dimension that tensor parallelism W cannot split the way SGLang does."""


def _slice(t: torch.Tensor, dim: int, rank: int, world: int, what: str) -> torch.Tensor:
    """Rank's equal part of `t` along `dim`, contiguous."""
    if t.shape[dim] % world:
        raise ShardingError(f"{what} = {t.shape[dim]} does not split over tensor parallelism {world};"
                            " choose a TP size that divides it")
    n = t.shape[dim] // world
    return t.narrow(dim, rank * n, n).contiguous()


def _gated(w: torch.Tensor, dim: int, rank: int, world: int, what: str) -> torch.Tensor:
    """Rank's rows of a stacked [gate; up] weight along `dim`: its gate slice, then its up slice."""
    gate, up = w.chunk(2, dim=dim)
    return torch.cat([_slice(gate, dim, rank, world, what), _slice(up, dim, rank, world, what)], dim=dim)


def _layer(lw: LayerWeights, num_heads: int, num_kv_heads: int, head_dim: int, rank: int,
           world: int) -> LayerWeights:
    q, k, v = lw.qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim])
    if num_kv_heads >= world:
        k, v = (_slice(t, 0, rank, world, "kv heads x head dim") for t in (k, v))
    else:  # QKVParallelLinear: num_kv_head_replicas = W / KV ranks share kv head r // replicas
        if world % num_kv_heads:
            raise ShardingError(f"{num_kv_heads} kv heads cannot be replicated over tensor parallelism {world};"
                                " choose a TP size that is a multiple of the kv head count")
        head = rank // (world // num_kv_heads)
        k, v = (t[head * head_dim:(head + 1) * head_dim].contiguous() for t in (k, v))
    shared = lw.shared_gate_up is not None
    return replace(
        lw,
        qkv=torch.cat([_slice(q, 0, rank, world, "query heads x head dim"), k, v]),
        o_proj=_slice(lw.o_proj, 1, rank, world, "o_proj input width"),
        w13=_gated(lw.w13, 1, rank, world, "expert width"),
        w2=_slice(lw.w2, 2, rank, world, "expert width"),
        shared_gate_up=_gated(lw.shared_gate_up, 0, rank, world, "shared-expert width") if shared else None,
        shared_down=_slice(lw.shared_down, 1, rank, world, "shared-expert width") if shared else None,
    )


def shard_weights(weights: AlignedWeights, rank: int, world: int) -> AlignedWeights:
    """Rank `rank` of `world`'s shard of a whole (TP = 1) model's weights. `world` = 1 returns `weights`."""
    if world == 1:
        return weights
    if not 0 <= rank < world:
        raise ShardingError(f"rank {rank} is outside tensor parallelism {world}")
    s = weights.shape
    if s.num_heads % world:
        raise ShardingError(f"{s.num_heads} query heads do not split over tensor parallelism {world}")
    vocab = weights.embed.shape[0]
    padded = -(-vocab // VOCAB_PADDING) * VOCAB_PADDING
    if padded % world:  # SGLang's `divide(num_embeddings_padded, tp_size)` asserts the same on GPU
        raise ShardingError(f"the padded vocab {padded} does not split over tensor parallelism {world}")
    rows = padded // world
    start = rank * rows
    if start >= vocab:
        raise ShardingError(f"rank {rank} of {world} would hold no vocab row of {vocab}; use a smaller TP size")
    return replace(
        weights,
        shape=replace(s, num_heads=s.num_heads // world, num_kv_heads=max(s.num_kv_heads // world, 1)),
        embed=weights.embed[start:start + rows].contiguous(),
        layers=tuple(_layer(lw, s.num_heads, s.num_kv_heads, s.head_dim, rank, world) for lw in weights.layers),
        lm_head=weights.lm_head[start:start + rows].contiguous(),
        vocab_start=start,
    )
