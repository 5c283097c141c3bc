"""Batch-invariant matmul, RMSNorm, routing, fused norm+RoPE and SiLU-mul (microturn_kernels.batch_invariant): close to torch, and a row's
bits independent of the batch around it (`torch.equal`).

CPU: Triton interpreter at small shapes; a small matmul config makes K loop over several chunks with a
masked tail and rows span several row tiles. Tolerances: bf16 outputs vs torch fp32 math within rtol 2^-7,
atol 2^-7 * max|ref| (one bf16 rounding plus fp32 order); fp32 outputs within 1e-4 relative.
"""

import pytest
import torch

from microturn_kernels.batch_invariant import (
    BF16_TOLERANCE,
    BatchInvariantInputError,
    MatmulConfig,
    matmul,
    norm_rope,
    rms_norm,
    route,
    silu_mul,
)

SMALL = MatmulConfig(block_m=16, block_n=16, block_k=16)


def _bf16(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


def _assert_bf16_close(got, ref):
    torch.testing.assert_close(got.float(), ref, rtol=BF16_TOLERANCE["rtol"],
                               atol=BF16_TOLERANCE["atol_scale"] * ref.abs().max().item())


@pytest.mark.parametrize("M,N,K", [(1, 24, 40), (5, 33, 64), (37, 48, 72)])
@pytest.mark.parametrize("config", [SMALL, MatmulConfig()], ids=["small", "default"])
def test_matmul_matches_torch(M, N, K, config):
    x, w = _bf16(M, K, seed=1), _bf16(N, K, seed=2, scale=K**-0.5)
    ref = x.float() @ w.float().T
    _assert_bf16_close(matmul(x, w, config=config), ref)
    out32 = matmul(x, w, out_dtype=torch.float32, config=config)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_matmul_row_alone_equals_row_in_batches(out_dtype):
    x, w = _bf16(40, 72, seed=3), _bf16(48, 72, seed=4)
    full = matmul(x, w, out_dtype, config=SMALL)
    for row in (0, 17, 39):
        assert torch.equal(matmul(x[row:row + 1], w, out_dtype, config=SMALL)[0], full[row])
        for lo, hi in ((row, min(40, row + 5)), (max(0, row - 20), row + 1)):  # other M, other tile slot
            assert torch.equal(matmul(x[lo:hi], w, out_dtype, config=SMALL)[row - lo], full[row])
    other = x.clone()
    other[1:] = _bf16(39, 72, seed=5)  # different neighbours
    assert torch.equal(matmul(other, w, out_dtype, config=SMALL)[0], full[0])


def test_matmul_strided_rows_and_errors():
    x, w = _bf16(6, 64, seed=6), _bf16(16, 32, seed=7)
    view = x[:, :32]  # row stride 64
    assert torch.equal(matmul(view, w, config=SMALL), matmul(view.contiguous(), w, config=SMALL))
    with pytest.raises(BatchInvariantInputError, match=r"x \[M, K\] and w \[N, K\]"):
        matmul(x, w)
    with pytest.raises(BatchInvariantInputError, match="bf16"):
        matmul(view.float(), w)
    assert matmul(x[:0, :32], w).shape == (0, 16)


@pytest.mark.parametrize("D", [16, 48, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_matches_torch_and_is_row_invariant(D, dtype):
    x = _bf16(3, 5, D, seed=8, scale=3.0).to(dtype)
    w = _bf16(D, seed=9).to(dtype)
    xf = x.float()
    ref = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
    got = rms_norm(x, w, 1e-6)
    assert got.shape == x.shape and got.dtype == dtype
    if dtype == torch.bfloat16:
        _assert_bf16_close(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    flat = x.reshape(-1, D)
    assert torch.equal(rms_norm(flat[7:8], w, 1e-6)[0], got.reshape(-1, D)[7])
    with pytest.raises(BatchInvariantInputError, match="does not match"):
        rms_norm(x, w[:-1], 1e-6)


def _route_reference(logits, k):
    probs = logits.float().softmax(-1)
    w, ids = probs.topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


@pytest.mark.parametrize("E,k", [(4, 2), (16, 2), (12, 3), (8, 1)])
def test_route_matches_torch_topk_and_is_row_invariant(E, k):
    logits = torch.randn(9, E, generator=torch.Generator().manual_seed(E)) * 2
    w, ids = route(logits, k)
    want_w, want_ids = _route_reference(logits, k)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-6)
    one_w, one_ids = route(logits[4:5], k)
    assert torch.equal(one_w[0], w[4]) and torch.equal(one_ids[0], ids[4])
    raw_w, _ = route(logits, k, renormalize=False)
    torch.testing.assert_close(raw_w, logits.softmax(-1).topk(k).values, rtol=1e-6, atol=1e-6)


def test_route_breaks_ties_to_the_lowest_expert_and_checks_top_k():
    w, ids = route(torch.zeros(2, 6), 3)
    assert ids.tolist() == [[0, 1, 2]] * 2 and torch.allclose(w, torch.full((2, 3), 1 / 3))
    with pytest.raises(BatchInvariantInputError, match="top_k=7"):
        route(torch.zeros(2, 6), 7)


def _rope_tables(P, half):
    ang = torch.arange(P, dtype=torch.float64)[:, None] * (1e4 ** (-torch.arange(half, dtype=torch.float64) / half))
    return ang.cos().float(), ang.sin().float()


@pytest.mark.parametrize("HD,heads,col0", [(16, 4, 0), (16, 2, 64), (24, 3, 8)])
def test_norm_rope_matches_torch_and_is_row_invariant(HD, heads, col0):
    T = 7
    x = _bf16(T, col0 + heads * HD + 16, seed=10, scale=2.0)
    w = _bf16(HD, seed=11)
    pos = torch.tensor([0, 5, 9, 3, 30, 31, 2])
    cos, sin = _rope_tables(32, HD // 2)
    got = norm_rope(x, col0, heads, w, pos, cos, sin, 1e-6)
    h = x[:, col0:col0 + heads * HD].float().view(T, heads, HD)
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).bfloat16().float()
    x1, x2 = normed.chunk(2, -1)
    c, s = cos[pos][:, None], sin[pos][:, None]
    ref = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    _assert_bf16_close(got, ref)
    assert torch.equal(norm_rope(x[4:5], col0, heads, w, pos[4:5], cos, sin, 1e-6)[0], got[4])
    with pytest.raises(BatchInvariantInputError, match="norm_rope wants bf16"):
        norm_rope(x, x.shape[1], heads, w, pos, cos, sin, 1e-6)


def test_silu_mul_matches_torch_and_is_row_invariant():
    gu = _bf16(5, 2 * 40, seed=12, scale=2.0)
    g, u = gu.float().chunk(2, -1)
    got = silu_mul(gu)
    _assert_bf16_close(got, torch.nn.functional.silu(g) * u)
    assert torch.equal(silu_mul(gu[2:3])[0], got[2])
    with pytest.raises(BatchInvariantInputError, match=r"\[T, 2S\]"):
        silu_mul(gu[:, :-1])


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(768, 512), (832, 512), (16, 512)])
def test_matmul_row_invariance_compiled(N, K):
    """The default config, compiled: a row's bits at M = 1 equal its bits inside M = 7, 33, 300."""
    x, w = _bf16(300, K, seed=13).cuda(), _bf16(N, K, seed=14, scale=K**-0.5).cuda()
    for out_dtype in (torch.bfloat16, torch.float32):
        full = matmul(x, w, out_dtype)
        _assert_bf16_close(full.float().cpu(), x.float().cpu() @ w.float().cpu().T)
        for m in (1, 7, 33):
            assert torch.equal(matmul(x[:m], w, out_dtype), full[:m])
        assert torch.equal(matmul(x[299:], w, out_dtype)[0], full[299])
