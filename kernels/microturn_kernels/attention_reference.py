"""Plain-PyTorch references for the paged causal attention kernels (aligned_attention.py).

Dimension letters: B requests, T query tokens (packed), H q heads, KH kv heads, G = H // KH, D / DV head dims,
N kv slots, L kv indices (packed), K keys of one request.
"""

from __future__ import annotations

import torch


def paged_causal_attention_reference(
    q: torch.Tensor,  # [T, H, D]
    k_buffer: torch.Tensor,  # [N, KH, D]
    v_buffer: torch.Tensor,  # [N, KH, DV]
    qo_indptr: torch.Tensor,  # [B + 1]
    kv_indptr: torch.Tensor,  # [B + 1], kv lengths include the query tokens
    kv_indices: torch.Tensor,  # [L]
    sm_scale: float | None = None,
) -> torch.Tensor:
    """fp32 softmax(q k^T * scale) v over each request's keys 0..pos (pos = the query token's position).

    A request's query tokens are its last qo_len keys. Returns fp32 [T, H, DV].
    """
    T, H, D = q.shape
    KH, DV = k_buffer.shape[1], v_buffer.shape[2]
    G = H // KH
    scale = D**-0.5 if sm_scale is None else sm_scale
    out = torch.zeros((T, H, DV), dtype=torch.float32, device=q.device)
    qo, kvp = qo_indptr.tolist(), kv_indptr.tolist()
    for b in range(len(qo) - 1):
        qs, qe, ks, ke = qo[b], qo[b + 1], kvp[b], kvp[b + 1]
        if qe == qs:
            continue
        idx = kv_indices[ks:ke].long()
        k = k_buffer[idx].float().repeat_interleave(G, dim=1)  # [K, H, D]
        v = v_buffer[idx].float().repeat_interleave(G, dim=1)  # [K, H, DV]
        qb = q[qs:qe].float()  # [Tb, H, D]
        pos = torch.arange(ke - ks - (qe - qs), ke - ks, device=q.device)  # [Tb]
        s = torch.einsum("thd,khd->htk", qb, k) * scale  # [H, Tb, K]
        s = s.masked_fill(torch.arange(ke - ks, device=q.device)[None, None, :] > pos[None, :, None], float("-inf"))
        out[qs:qe] = torch.einsum("htk,khd->thd", torch.softmax(s, dim=-1), v)
    return out
