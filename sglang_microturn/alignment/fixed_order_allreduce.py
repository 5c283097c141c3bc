"""Fixed-order all-reduce (sum) for alignment mode at tensor parallelism > 1 (issue 8).

Why: NCCL's all-reduce picks its algorithm (ring, tree, NVLS), protocol and channel count from the message
size, and each choice adds an element's W partial sums in a different order; even within one ring, which rank
starts a chunk's reduction depends on where the element falls in the message, and the chunk boundaries move
with its size. Floating-point addition is not associative, so a token's bits would depend on how many tokens
shared its batch (decode vs prefill message sizes), which alignment mode must rule out. Here the reduction is
split in two:

  1. `all_gather_into_tensor`: every rank receives every rank's partial, [W, ...]. A gather only copies
     bytes, so its result does not depend on NCCL's algorithm, protocol, channels or the message size.
  2. `sum_in_rank_order`: each rank adds the W partials itself, elementwise, in rank order
     ((p0 + p1) + p2) + ... in the accumulation dtype, then rounds once to the output dtype.

So every element's result is a function of that element's W partials only: bitwise identical on every rank,
for any message size and for any number of tokens in the batch (row r of an [M, D] reduce equals row r
reduced alone). It imports torch.distributed only (no SGLang): the server may gather through SGLang's TP
group coordinator instead (its graph-capturable pynccl path) and call `sum_in_rank_order` on the result;
any all-gather gives the same bytes.

Precision contract:
  * accumulation dtype: fp32 for bf16 / fp16 / fp32 partials (fp64 for fp64); one rounding to the partials'
    dtype at the end. bf16 partials therefore get a more accurate sum than a bf16 ring all-reduce, which
    rounds after every hop.
  * bitwise: for the same partials on the same ranks, the result is the same on every rank, every call, any
    backend (gloo, NCCL) and any device that adds and casts in IEEE round-to-nearest-even without flushing
    subnormals (torch's CPU and CUDA defaults).
  * not promised: equality with NCCL's all-reduce for W >= 3 (NCCL's order is not rank order). For W = 2 the
    sum is one addition of two terms, which is commutative, so a correctly rounded NCCL sum is expected to
    give the same bits; that is for the 2-GPU run to confirm.

Cost, per call with an n-byte partial on each of W ranks:
  * traffic: each rank receives (W - 1) n bytes, against 2 (W - 1) / W n for a ring all-reduce: the same at
    W = 2, 2x at W = 4, 4x at W = 8. Latency-bound decode messages ([T, D] bf16 with small T) pay one
    collective either way; the ring's 2 (W - 1) steps become W - 1.
  * memory: a [W, ...] gather buffer (W n bytes) and a [...] accumulator in the accumulation dtype.
  * compute: W - 1 elementwise adds and two casts, reading W n bytes: small next to the matmuls it follows.

Dimension letters: W world size (ranks of the group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Partial dtype -> the dtype its W terms are added in. Integers are left out on purpose: alignment mode only
# reduces floating-point activations, and an integer sum would need no fixed order.
ACCUMULATION_DTYPE = {
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}


class FixedOrderAllReduceError(ValueError):
    """A partial or gathered tensor the fixed-order all-reduce does not take (dtype or shape)."""


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in ACCUMULATION_DTYPE:
        raise FixedOrderAllReduceError(
            f"fixed-order all-reduce takes {', '.join(str(d) for d in ACCUMULATION_DTYPE)} partials, got {dtype};"
            " cast the partial to one of them before reducing")
    return ACCUMULATION_DTYPE[dtype]


def sum_in_rank_order(gathered: torch.Tensor) -> torch.Tensor:
    """Sum of gathered [W, ...] over dim 0 as ((g[0] + g[1]) + g[2]) + ..., accumulated in
    `ACCUMULATION_DTYPE[gathered.dtype]`, rounded once to gathered.dtype. Returns a new [...] tensor."""
    accum = _accumulation_dtype(gathered.dtype)
    if gathered.dim() == 0 or gathered.shape[0] == 0:
        raise FixedOrderAllReduceError(
            f"sum_in_rank_order takes a [W, ...] stack of W >= 1 partials, got shape {tuple(gathered.shape)};"
            " gather the partials along a new leading dim first")
    # Not gathered.sum(0): torch's reductions may split or vectorise the W terms by the tensor's size, which
    # is the dependence this module exists to remove. One elementwise add per rank fixes the order.
    total = gathered[0].to(accum, copy=True)
    for rank in range(1, gathered.shape[0]):
        total.add_(gathered[rank].to(accum))
    return total.to(gathered.dtype)


def fixed_order_all_reduce(partial: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum of `partial` [...] over the ranks of `group` (default: the world), bitwise identical on every rank
    and independent of the message size and the batch. Returns a new tensor; `partial` is not modified.
    Every rank must call it with the same shape and dtype (as with any collective)."""
    _accumulation_dtype(partial.dtype)  # refuse a bad dtype before any rank enters the collective
    world = dist.get_world_size(group)
    flat = partial.reshape(-1)  # [n]
    # Gather flat into [W n], rank r's bytes at [r n, (r + 1) n): the one output layout every backend takes
    # (gloo refuses a stacked [W, ...] output, NCCL takes both).
    gathered = flat.new_empty(world * flat.numel())
    dist.all_gather_into_tensor(gathered, flat.contiguous(), group=group)
    return sum_in_rank_order(gathered.view(world, *partial.shape))
