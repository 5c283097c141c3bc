"""Aligned split-KV attention: bitwise prefill == chunked extend == decode == any batch; close to fp32 reference.

CPU runs use the Triton interpreter at tiny shapes with a small split size, so rows really span several
splits and several key tiles per split. GPU tests (`-m gpu`) repeat the bitwise and tolerance checks at
real shapes with the default config.
"""

from __future__ import annotations

import random

import pytest
import torch

from microturn_kernels.aligned_attention import (
    BF16_TOLERANCE,
    AlignedAttentionConfig,
    aligned_decode,
    aligned_extend,
)
from microturn_kernels.attention_reference import paged_causal_attention_reference

# S = 32 with 16-key tiles: two tiles per split; block_m 16 = 4 token slots x group 4 (8 x group 2).
CPU_CFG = AlignedAttentionConfig(split_size=32, block_n=16, block_m=16)


class Pool:
    """A KV pool holding every position of a few requests, and each request's q for every position.

    The server writes a chunk's K/V before attention and never rewrites earlier positions, so holding the
    final K/V of all positions up front is what every chunking sees.
    """

    def __init__(self, lens, kv_heads=2, group=2, head_dim=16, v_head_dim=None, page_size=1, seed=0,
                 device="cpu", dtype=torch.bfloat16):  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        dv = v_head_dim or head_dim
        self.lens, self.h, self.device = list(lens), kv_heads * group, device
        pages_per_req = [-(-n // page_size) for n in lens]
        n_pages = sum(pages_per_req) + 3  # spare pages: slots are not dense
        n_slots = n_pages * page_size
        self.k = torch.randn(n_slots, kv_heads, head_dim, generator=g).to(dtype).to(device)
        self.v = torch.randn(n_slots, kv_heads, dv, generator=g).to(dtype).to(device)
        page_order = torch.randperm(n_pages, generator=g).tolist()
        self.slots = []  # slot of each position, per request (page-granular allocation)
        for n, np_ in zip(lens, pages_per_req):
            pages, page_order = page_order[:np_], page_order[np_:]
            self.slots.append(torch.tensor([p * page_size + i for p in pages for i in range(page_size)][:n]))
        self.q = [torch.randn(n, self.h, head_dim, generator=g).to(dtype).to(device) for n in lens]
        self.dv = dv

    def batch(self, chunks):
        """chunks: list of (request, start, end): queries at positions [start, end), keys [0, end)."""
        qo, kv, idx, qs = [0], [0], [], []
        for r, s, e in chunks:
            qo.append(qo[-1] + e - s)
            kv.append(kv[-1] + e)
            idx.append(self.slots[r][:e])
            qs.append(self.q[r][s:e])
        dev = self.device
        return (
            torch.cat(qs),
            torch.tensor(qo, dtype=torch.int64, device=dev),  # SGLang's qo_indptr is int64
            torch.tensor(kv, dtype=torch.int32, device=dev),
            torch.cat(idx).to(dev),
        )

    def extend(self, chunks, cfg, max_kv_len=None, **kw):
        """Run one extend launch; return {(request, position): output row [H, DV]}."""
        q, qo, kv, idx = self.batch(chunks)
        o = torch.empty(q.shape[0], self.h, self.dv, dtype=q.dtype, device=self.device)
        max_qo = max(e - s for _, s, e in chunks)
        aligned_extend(q, self.k, self.v, o, qo, kv, idx, max_qo, max_kv_len or max(self.lens), config=cfg, **kw)
        out, row = {}, 0
        for r, s, e in chunks:
            for p in range(s, e):
                out[(r, p)] = o[row]
                row += 1
        return out

    def decode_args(self, steps):
        """(q, kv_indptr, kv_indices) of a decode call for steps = [(request, position), ...]."""
        q = torch.stack([self.q[r][p] for r, p in steps])
        kv = torch.tensor([0] + [p + 1 for _, p in steps], device=self.device).cumsum(0).to(torch.int32)
        idx = torch.cat([self.slots[r][: p + 1] for r, p in steps]).to(self.device)
        return q, kv, idx

    def decode(self, steps, cfg, max_kv_len=None):
        """steps: list of (request, position) decoded together; SGLang-style decode call."""
        q, kv, idx = self.decode_args(steps)
        o = torch.empty(len(steps), self.h, self.dv, dtype=q.dtype, device=self.device)
        aligned_decode(q, self.k, self.v, o, kv, idx, max_kv_len or max(self.lens), config=cfg)
        return {step: o[i] for i, step in enumerate(steps)}

    def reference(self, r):
        q, qo, kv, idx = self.batch([(r, 0, self.lens[r])])
        return paged_causal_attention_reference(q, self.k, self.v, qo, kv, idx)


def _stack(out, r, positions):
    return torch.stack([out[(r, p)] for p in positions])


def _random_chunks(n, rng, max_chunk):
    cuts, p = [], 0
    while p < n:
        e = min(n, p + rng.randint(1, max_chunk))
        cuts.append((p, e))
        p = e
    return cuts


def assert_close_to_reference(out, ref):
    torch.testing.assert_close(out.float(), ref, **BF16_TOLERANCE)


# ----------------------------------------------------------------------------------------------------- CPU


def test_prefill_equals_decode_and_random_chunkings():
    n = 45  # splits [0,32) [32,45): a boundary inside the sequence; tokens span 12 tiles of 4
    pool = Pool([n], kv_heads=2, group=4, head_dim=16)
    prefill = _stack(pool.extend([(0, 0, n)], CPU_CFG), 0, range(n))
    assert_close_to_reference(prefill, pool.reference(0))

    decode = torch.stack([pool.decode([(0, p)], CPU_CFG)[(0, p)] for p in range(n)])
    assert torch.equal(decode, prefill)

    rng = random.Random(1)
    for max_chunk in (5, 19):
        chunked = {}
        for s, e in _random_chunks(n, rng, max_chunk):
            chunked.update(pool.extend([(0, s, e)], CPU_CFG))
        assert torch.equal(_stack(chunked, 0, range(n)), prefill), f"chunks up to {max_chunk}"


def test_mixed_batches_and_order_do_not_change_bits():
    lens = [37, 20, 66]
    pool = Pool(lens, kv_heads=2, group=2, head_dim=16)
    solo = {r: _stack(pool.extend([(r, 0, n)], CPU_CFG), r, range(n)) for r, n in enumerate(lens)}
    for r in range(3):
        assert_close_to_reference(solo[r], pool.reference(r))

    # One launch: a mid-sequence chunk, a one-token extend (decode inside a mixed batch), a prefill; then
    # the same chunks in another order with another neighbour; then a decode batch.
    a = pool.extend([(2, 30, 47), (0, 36, 37), (1, 0, 20)], CPU_CFG)
    b = pool.extend([(1, 3, 9), (2, 30, 47), (0, 36, 37)], CPU_CFG)
    d = pool.decode([(2, 65), (0, 31), (1, 19), (2, 32)], CPU_CFG)
    for out in (a, b, d):
        for (r, p), row in out.items():
            assert torch.equal(row, solo[r][p]), (r, p)


@pytest.mark.parametrize("n", [31, 32, 33, 63, 64, 65])
def test_split_boundaries(n):
    pool = Pool([n], kv_heads=1, group=4, head_dim=16, seed=n)
    prefill = _stack(pool.extend([(0, 0, n)], CPU_CFG), 0, range(n))
    assert_close_to_reference(prefill, pool.reference(0))
    # The last token by decode, and the last chunk starting one before / at / after the final boundary.
    assert torch.equal(pool.decode([(0, n - 1)], CPU_CFG)[(0, n - 1)], prefill[n - 1])
    for s in sorted({max(0, (n - 1) // 32 * 32 + d) for d in (-1, 0, 1)} - {n}):
        tail = pool.extend([(0, s, n)], CPU_CFG)
        assert torch.equal(_stack(tail, 0, range(s, n)), prefill[s:]), s


def test_split_16_one_tile_per_split_and_wider_heads():
    # S == block_n (one tile per split), group 2 (8 token slots per tile), D 32 / DV 16, 4 q heads.
    cfg = AlignedAttentionConfig(split_size=16, block_n=16, block_m=16)
    n = 34
    pool = Pool([n], kv_heads=2, group=2, head_dim=32, v_head_dim=16, seed=3)
    prefill = _stack(pool.extend([(0, 0, n)], cfg), 0, range(n))
    assert_close_to_reference(prefill, pool.reference(0))
    dec = pool.decode([(0, 15), (0, 16), (0, 33)], cfg)
    for p in (15, 16, 33):
        assert torch.equal(dec[(0, p)], prefill[p])
    assert torch.equal(_stack(pool.extend([(0, 9, 17)], cfg), 0, range(9, 17)), prefill[9:17])


def test_paged_slots_and_launch_chunking_do_not_change_bits():
    n = 40
    dense = Pool([n], kv_heads=2, group=2, page_size=1, seed=5)
    paged = Pool([n], kv_heads=2, group=2, page_size=4, seed=5)
    # Same K/V/q values per position, different slots (page size 4, shuffled pages).
    k, v = paged.k.clone(), paged.v.clone()
    k[paged.slots[0]], v[paged.slots[0]] = dense.k[dense.slots[0]], dense.v[dense.slots[0]]
    paged.k, paged.v, paged.q = k, v, dense.q
    base = _stack(dense.extend([(0, 0, n)], CPU_CFG), 0, range(n))
    assert torch.equal(_stack(paged.extend([(0, 0, n)], CPU_CFG), 0, range(n)), base)
    # Tiny workspace: query offsets run in several launches; fewer split programs: each loops over splits;
    # a larger max_kv_len: more (empty) split programs.
    tiny = dense.extend([(0, 0, n)], CPU_CFG, workspace_bytes=1)
    looped = dense.extend([(0, 0, n)], CPU_CFG, num_split_programs=1, max_kv_len=200)
    for out in (tiny, looped):
        assert torch.equal(_stack(out, 0, range(n)), base)


def test_empty_requests_in_batch_are_skipped():
    pool = Pool([10, 12], seed=7)
    solo = _stack(pool.extend([(1, 0, 12)], CPU_CFG), 1, range(12))
    out = pool.extend([(0, 10, 10), (1, 0, 12)], CPU_CFG)  # request 0 brings no new tokens
    assert torch.equal(_stack(out, 1, range(12)), solo)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of block_n"):
        AlignedAttentionConfig(split_size=32, block_n=64)
    with pytest.raises(ValueError, match="power of two"):
        AlignedAttentionConfig(split_size=48, block_n=16)
    with pytest.raises(ValueError, match="exceeds block_m"):
        AlignedAttentionConfig(block_m=16).token_slots(32)


# ----------------------------------------------------------------------------------------------------- GPU

GPU_CFG = AlignedAttentionConfig()  # the server default: S 256, block_n 64, block_m 16


@pytest.mark.gpu
@pytest.mark.parametrize("split", [256, 4096])
def test_gpu_prefill_decode_chunks_bitwise(split):
    cfg = AlignedAttentionConfig(split_size=split)
    lens = [5000, 1100, 257]
    pool = Pool(lens, kv_heads=8, group=4, head_dim=128, device="cuda", seed=11)
    solo = {r: _stack(pool.extend([(r, 0, n)], cfg), r, range(n)) for r, n in enumerate(lens)}
    ref = pool.reference(1)
    assert_close_to_reference(solo[1], ref)
    rng = random.Random(2)
    chunked = {}
    for s, e in _random_chunks(lens[0], rng, 700):
        chunked.update(pool.extend([(0, s, e), (2, 0, 257), (1, 1000, 1100)], cfg))
    assert torch.equal(_stack(chunked, 0, range(lens[0])), solo[0])
    positions = [0, 255, 256, 257, 4095, 4096, 4097, 4999]
    for bs_extra in (0, 31):
        steps = [(0, p) for p in positions] + [(1, rng.randrange(1100)) for _ in range(bs_extra)]
        d = pool.decode(steps, cfg, max_kv_len=65536)
        for (r, p) in steps:
            assert torch.equal(d[(r, p)], solo[r][p]), (r, p, bs_extra)
    for r, s, e in [(0, 4080, 4096), (0, 4090, 4110), (1, 1084, 1100)]:  # 16-token micro-turns
        assert torch.equal(_stack(pool.extend([(r, s, e)], cfg), r, range(s, e)), solo[r][s:e])


@pytest.mark.gpu
def test_gpu_decode_cuda_graph_matches_eager():
    lens = [3000, 700]
    pool = Pool(lens, kv_heads=8, group=4, head_dim=128, device="cuda", seed=12)
    steps = [(0, 2999), (1, 699)]
    eager = pool.decode(steps, GPU_CFG, max_kv_len=8192)
    q = torch.stack([pool.q[r][p] for r, p in steps])
    kv = torch.tensor([0, 3000, 3700], dtype=torch.int32, device="cuda")
    idx = torch.cat([pool.slots[0], pool.slots[1]]).cuda()
    sp = GPU_CFG.max_splits(8192)
    ws = (torch.zeros(2, 32, sp, 128, device="cuda"), torch.zeros(2, 32, sp, device="cuda"))
    qo = torch.arange(3, dtype=torch.int32, device="cuda")
    o = torch.empty(2, 32, 128, dtype=torch.bfloat16, device="cuda")
    run = lambda: aligned_decode(q, pool.k, pool.v, o, kv, idx, 8192, config=GPU_CFG, workspace=ws, qo_indptr=qo)  # noqa: E731
    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    o.zero_()
    g.replay()
    torch.cuda.synchronize()
    for i, step in enumerate(steps):
        assert torch.equal(o[i], eager[step])
