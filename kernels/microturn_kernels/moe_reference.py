"""Plain-PyTorch MoE forward (gpt-fast style): gather the selected experts' weights, three einsums.

Glossary: T tokens, A active experts per token (top-k), E experts, D hidden size, I expert width.
Weights in SGLang's layout: w13 [E, 2I, D] = [gate; up] rows, w2 [E, D, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_reference(
    x: torch.Tensor,  # [T, D]
    w13: torch.Tensor,  # [E, 2I, D]
    w2: torch.Tensor,  # [E, D, I]
    topk_weights: torch.Tensor,  # [T, A]
    topk_ids: torch.Tensor,  # [T, A], -1 = expert filtered out (contributes nothing)
    *,
    routed_scaling_factor: float | None = None,
    kernel_rounding: bool = True,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """MoE output [T, D], computed in fp32 from the (bf16) inputs.

    kernel_rounding=True rounds where `moe_gemv` and SGLang's fused MoE round: the gate and up projections
    to bf16, silu(gate) * up to bf16; the top-k combine stays fp32. kernel_rounding=False is pure fp32 math.
    out_dtype: dtype of the result (default x.dtype); pass torch.float32 to keep the unrounded sum.
    """
    valid = topk_ids >= 0  # [T, A]
    ids = topk_ids.clamp(min=0).long()
    xf = x.float()
    w13_a = w13[ids].float()  # [T, A, 2I, D]
    w2_a = w2[ids].float()  # [T, A, D, I]
    gate_up = torch.einsum("td,tand->tan", xf, w13_a)  # [T, A, 2I]
    gate, up = gate_up.chunk(2, dim=-1)  # [T, A, I] each
    if kernel_rounding:
        gate, up = gate.bfloat16().float(), up.bfloat16().float()
    h = F.silu(gate) * up  # [T, A, I]
    if kernel_rounding:
        h = h.bfloat16().float()
    y = torch.einsum("tai,tadi->tad", h, w2_a)  # [T, A, D]
    weights = torch.where(valid, topk_weights.float(), 0.0)  # [T, A]
    out = torch.einsum("tad,ta->td", y, weights)  # [T, D]
    if routed_scaling_factor is not None:
        out = out * routed_scaling_factor
    return out.to(out_dtype or x.dtype)
