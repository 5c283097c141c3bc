"""Aligned reference scoring: the trainer side of trainer-sampler alignment (docs/alignment.md).

`score_aligned` runs the PyTorch reference's weights (model/reference_model.py, in bf16) through
`aligned_forward`, the forward the server runs under `--alignment-mode`, with attention from microturn_kernels
over a contiguous KV cache (`AlignedKVCache`), so a token's logprob has the server's bits. Needs Triton (GPU,
or the CPU interpreter with TRITON_INTERPRET=1). `score_aligned(..., tp=W)` reproduces a tensor-parallel
server's bits on one device (every rank's shard in turn, partials summed in rank order). Torch only, no SGLang.

Glossary: W tensor-parallel ranks, T new tokens, P past (cached) tokens, KV kv heads, H query heads, hd head
dim, V vocab.
"""

from __future__ import annotations

import torch

from sglang_microturn.alignment import aligned_forward
from sglang_microturn.alignment.fixed_order_allreduce import sum_in_rank_order
from sglang_microturn.alignment.tensor_parallel_shards import shard_weights
from sglang_microturn.model.reference_model import MicroTurnReference, token_logprobs


class AlignedKVCache:
    """One sequence's keys and values per layer ([P, KV, hd] bf16, contiguous, position order) for aligned
    mode, and the attention over them: `aligned_extend` with the server's AlignedAttentionConfig (from the
    same MICROTURN_ATTN_* environment), so a token's attention bits match the server's."""

    def __init__(self, num_layers: int):
        self.config = aligned_forward.attention_config()
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[0]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`aligned_forward.Attend`: appends k, v [T, KV, hd] to the layer's cache; returns [T, H, hd]."""
        from microturn_kernels.aligned_attention import aligned_extend

        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k]), torch.cat([self.v[layer], v])
        self.k[layer], self.v[layer] = k, v  # [P + T, KV, hd]
        T, total = q.shape[0], k.shape[0]
        dev = q.device
        out = torch.empty_like(q)  # [T, H, hd]
        return aligned_extend(
            q.contiguous(), k, v, out, torch.tensor([0, T], dtype=torch.int32, device=dev),
            torch.tensor([0, total], dtype=torch.int32, device=dev),
            torch.arange(total, dtype=torch.int32, device=dev), T, total,
            sm_scale=q.shape[-1] ** -0.5, config=self.config,
        )  # fmt: skip


def sum_of_simulated_ranks(partials: list[torch.Tensor]) -> torch.Tensor:
    """`aligned_forward.Reduce` when this device computes every rank: the fixed-order all-reduce's sum
    (rank order, fp32, one rounding), so the bits are a TP = W server's. At W = 1 it returns the partial
    unchanged (bf16 -> fp32 -> bf16 is exact)."""
    return sum_in_rank_order(torch.stack(partials))


@torch.no_grad()
def aligned_logits(ranks: list[aligned_forward.AlignedWeights], ids: torch.Tensor,
                   caches: list[AlignedKVCache]) -> torch.Tensor:
    """fp32 logits [T, V] of the sequence's next T tokens ids [T], computed by every rank of `ranks` (one
    rank's weights each, in rank order; one whole model at TP = 1); appends their K/V to each rank's cache."""
    positions = torch.arange(caches[0].length, caches[0].length + len(ids), device=ids.device)
    hidden = aligned_forward.forward_hidden(
        [aligned_forward.RankForward(w, c.attend) for w, c in zip(ranks, caches)], ids, positions,
        sum_of_simulated_ranks)  # fmt: skip
    # Each logit is one rank's full-D dot product: concatenating the ranks' rows is SGLang's all-gather.
    return torch.cat([aligned_forward.logits(w.lm_head, hidden) for w in ranks], dim=-1)


@torch.no_grad()
def score_aligned(model: MicroTurnReference, ids, chunks: list[int] | None = None, tp: int = 1) -> torch.Tensor:
    """Aligned-mode logprobs fp32 [T - 1] (log p(ids[t] | ids[:t]), t = 1 .. T - 1) of a bf16 model, in one
    forward (chunks=None) or in forwards of the given sizes over the KV cache; the bits do not depend on it.
    `tp` = W reproduces a server at tensor parallelism W on this one device: every rank's shard
    (tensor_parallel_shards) computes its partials, summed in rank order as the server's fixed-order
    all-reduce sums them. TP = W and TP = 1 bits differ in general (docs/alignment.md)."""
    device = model.embed_tokens.weight.device
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    chunks = [len(ids)] if chunks is None else chunks
    if sum(chunks) != len(ids) or min(chunks) < 1:
        raise ValueError(f"chunks {chunks} must be positive and sum to the sequence length {len(ids)}")
    weights = model.aligned_weights()
    ranks = [shard_weights(weights, r, tp) for r in range(tp)]
    caches = [AlignedKVCache(model.spec.num_layers) for _ in ranks]
    parts, start = [], 0
    for n in chunks:
        parts.append(aligned_logits(ranks, ids[start:start + n], caches))
        start += n
    return token_logprobs(torch.cat(parts), ids)
