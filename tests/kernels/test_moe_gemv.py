"""moe_gemv (gather + GEMV MoE) against the PyTorch reference, and its bitwise batch invariance.

CPU: Triton interpreter (TRITON_INTERPRET=1 from tests/conftest.py) at small shapes, with small block sizes
so every kernel loops over several chunks and has masked tails. GPU (`-m gpu`): the benchmark's real shapes.
Tolerances: vs `moe_reference(kernel_rounding=True)` (same bf16 rounding points, fp32 math) the output may
differ by the final bf16 rounding plus an fp32-order flip of an intermediate rounding: rtol 2^-7, atol
2^-7 * max|ref|; vs pure fp32 math (kernel_rounding=False) the relative Frobenius error stays below 1e-2.
"""

import dataclasses

import pytest
import torch
import triton

from microturn_kernels.moe_gemv import MoeGemvConfig, MoeGemvInputError, moe_gemv, moe_gemv_aligned
from microturn_kernels.moe_reference import moe_reference

# Small blocks: D=96 is 3 chunks of 32 (gate-up), I=40 is 2.5 chunks of 16 (down), rows 40 = 5 x 8.
SMALL = MoeGemvConfig(BLOCK_I=8, BLOCK_D=32, BLOCK_N=8, BLOCK_K=16)


def make_moe(M, E, K, D, I, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=g).bfloat16()
    w13 = (torch.randn(E, 2 * I, D, generator=g) / D**0.5).bfloat16()
    w2 = (torch.randn(E, D, I, generator=g) / I**0.5).bfloat16()
    logits = torch.randn(M, E, generator=g)
    topk_weights, topk_ids = torch.topk(logits.softmax(-1), K, dim=-1)  # distinct experts per token
    return [t.to(device) for t in (x, w13, w2, topk_weights, topk_ids.int())]


def assert_close_to_reference(out, x, w13, w2, tw, ids, scale=None):
    ref = moe_reference(x, w13, w2, tw, ids, routed_scaling_factor=scale, out_dtype=torch.float32)
    bound = 2.0**-7 * ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, rtol=2.0**-7, atol=bound)
    ref32 = moe_reference(x, w13, w2, tw, ids, routed_scaling_factor=scale, kernel_rounding=False)
    rel = ((out.float() - ref32.float()).norm() / ref32.float().norm()).item()
    assert rel < 1e-2, rel


@pytest.mark.parametrize(
    "M,E,K,D,I",
    [(1, 4, 2, 64, 32), (3, 4, 2, 64, 32), (5, 8, 3, 96, 40), (1, 6, 1, 96, 40), (2, 4, 4, 64, 16)],
)
def test_matches_reference(M, E, K, D, I):
    x, w13, w2, tw, ids = make_moe(M, E, K, D, I, seed=M * 100 + K)
    out = moe_gemv(x, w13, w2, tw, ids, config=SMALL)
    assert out.shape == (M, D) and out.dtype == torch.bfloat16
    assert_close_to_reference(out, x, w13, w2, tw, ids)


# Every tile-config axis the sweep (benchmarks/moe_decode.py --sweep) varies: loop form (unrolled vs
# software-pipelined), eviction hint, PDL and the w2 prefetch (CUDA only; on CPU they must be ignored).
CONFIG_AXES = [
    dataclasses.replace(SMALL, gate_up_stages=2),
    dataclasses.replace(SMALL, down_stages=3),
    dataclasses.replace(SMALL, BLOCK_I=4, BLOCK_D=64, BLOCK_N=2, BLOCK_K=32, gate_up_warps=2, down_warps=8),
    dataclasses.replace(SMALL, evict_first=True),
    dataclasses.replace(SMALL, pdl=True, prefetch_w2=True, pdl_gate_up=True),
    dataclasses.replace(SMALL, split_down=True),
    dataclasses.replace(SMALL, split_down=True, preload_w2=True, down_stages=2),  # chunk 0 of 3 preloaded
    dataclasses.replace(SMALL, group_pairs=True, BLOCK_D=16, BLOCK_K=8, gate_up_stages=2),
]


@pytest.mark.parametrize("cfg", CONFIG_AXES, ids=lambda c: str(c)[len("MoeGemvConfig") :])
def test_config_axes_reference_and_batch_invariance(cfg):
    x, w13, w2, tw, ids = make_moe(6, 8, 3, 96, 40, seed=13)
    batch = moe_gemv(x, w13, w2, tw, ids, config=cfg)
    assert_close_to_reference(batch, x, w13, w2, tw, ids)
    for m in (0, 5):
        alone = moe_gemv(x[m : m + 1], w13, w2, tw[m : m + 1], ids[m : m + 1], config=cfg)
        assert torch.equal(alone, batch[m : m + 1]), m
    big = moe_gemv(x.repeat(3, 1), w13, w2, tw.repeat(3, 1), ids.repeat(3, 1), config=cfg)  # M=18
    assert torch.equal(big[-6:], batch)


def test_loop_form_and_hints_keep_the_arithmetic():
    # Unrolled and pipelined loops, the eviction hint and PDL change scheduling only, not the reduction
    # order: bitwise equal to the base config (on the GPU this is checked by the sweep for each config).
    x, w13, w2, tw, ids = make_moe(3, 8, 3, 96, 40, seed=14)
    base = moe_gemv(x, w13, w2, tw, ids, config=SMALL)
    for cfg in (CONFIG_AXES[0], CONFIG_AXES[1], CONFIG_AXES[3], CONFIG_AXES[4], CONFIG_AXES[5], CONFIG_AXES[6]):
        assert torch.equal(moe_gemv(x, w13, w2, tw, ids, config=cfg), base), cfg


def test_preloaded_whole_tile_keeps_the_per_token_kernels_bits():
    # preload_w2 with BLOCK_K >= I: each down program holds its whole w2 tile (I=40 in one masked chunk of
    # 64) before the wait; the bits are those of the per-token kernel with the same tiles (every M, also
    # above SPLIT_DOWN_MAX_M, where that kernel takes over).
    whole = dataclasses.replace(SMALL, BLOCK_K=64)
    x, w13, w2, tw, ids = make_moe(3, 8, 3, 96, 40, seed=18)
    expected = moe_gemv(x, w13, w2, tw, ids, config=whole)
    assert_close_to_reference(expected, x, w13, w2, tw, ids)
    for cfg in (dataclasses.replace(whole, split_down=True, preload_w2=True),
                dataclasses.replace(whole, split_down=True, preload_w2=True, pdl=True, down_warps=2)):  # fmt: skip
        assert torch.equal(moe_gemv(x, w13, w2, tw, ids, config=cfg), expected), cfg


def test_split_down_rearms_its_counters_and_hands_large_batches_back():
    # split_down's last-arriving program writes the output and zeroes its counter: a counter left armed
    # would leave the next call's output unwritten (NaN here). Above SPLIT_DOWN_MAX_M tokens the
    # one-program-per-token kernel runs; the bits are the same either way.
    from microturn_kernels.moe_gemv import SPLIT_DOWN_MAX_M

    cfg = dataclasses.replace(SMALL, split_down=True)
    x, w13, w2, tw, ids = make_moe(4, 6, 2, 64, 32, seed=16)
    expected = moe_gemv(x, w13, w2, tw, ids, config=SMALL)
    for _ in range(3):
        out = torch.full_like(x, float("nan"))
        assert torch.equal(moe_gemv(x, w13, w2, tw, ids, out=out, config=cfg), expected)
    M = SPLIT_DOWN_MAX_M + 3
    x, w13, w2, tw, ids = make_moe(M, 6, 2, 64, 32, seed=17)
    big = moe_gemv(x, w13, w2, tw, ids, config=cfg)
    assert torch.equal(big, moe_gemv(x, w13, w2, tw, ids, config=SMALL))
    assert torch.equal(big[-4:], moe_gemv(x[-4:], w13, w2, tw[-4:], ids[-4:], config=cfg))


def test_default_config_and_int64_ids_and_scaling():
    x, w13, w2, tw, ids = make_moe(2, 4, 2, 64, 32, seed=7)
    out = moe_gemv(x, w13, w2, tw, ids.long(), routed_scaling_factor=2.5)  # heuristic config (one chunk)
    assert_close_to_reference(out, x, w13, w2, tw, ids, scale=2.5)
    assert torch.equal(out, moe_gemv(x, w13, w2, tw, ids, routed_scaling_factor=2.5))  # int32 == int64 ids


def test_batch_invariance_token_alone_vs_in_batch():
    x, w13, w2, tw, ids = make_moe(6, 8, 3, 96, 40, seed=3)
    batch = moe_gemv(x, w13, w2, tw, ids, config=SMALL)
    for m in (0, 3, 5):
        alone = moe_gemv(x[m : m + 1], w13, w2, tw[m : m + 1], ids[m : m + 1], config=SMALL)
        assert torch.equal(alone, batch[m : m + 1]), m
    # the same token in a different batch (other neighbours, other position)
    perm = torch.tensor([5, 2, 0])
    assert torch.equal(moe_gemv(x[perm], w13, w2, tw[perm], ids[perm], config=SMALL), batch[perm])


def test_tokens_sharing_experts():
    x, w13, w2, tw, ids = make_moe(4, 6, 2, 64, 32, seed=4)
    ids = torch.tensor([[1, 4]] * 4, dtype=torch.int32)  # every token picks the same two experts
    out = moe_gemv(x, w13, w2, tw, ids, config=SMALL)
    assert_close_to_reference(out, x, w13, w2, tw, ids)
    assert torch.equal(out[2:3], moe_gemv(x[2:3], w13, w2, tw[2:3], ids[2:3], config=SMALL))


def test_repeated_experts_across_tokens_and_orders():
    x, w13, w2, tw, ids = make_moe(3, 5, 3, 64, 32, seed=5)
    ids = torch.tensor([[0, 2, 4], [4, 0, 2], [2, 2, 2]], dtype=torch.int32)  # last row repeats one expert
    out = moe_gemv(x, w13, w2, tw, ids, config=SMALL)
    assert_close_to_reference(out, x, w13, w2, tw, ids)
    # a token whose rows are identical in every slot: the k-order sum must match a hand-computed one
    x1 = x[2:3]
    ref_one = moe_reference(x1, w13, w2, tw[2:3].sum(-1, keepdim=True), ids[2:3, :1], out_dtype=torch.float32)
    torch.testing.assert_close(out[2:3].float(), ref_one, rtol=2.0**-7, atol=2.0**-7 * ref_one.abs().max().item())


def test_m1_edge_cases():
    x, w13, w2, tw, ids = make_moe(1, 4, 2, 64, 32, seed=6)
    out = moe_gemv(x, w13, w2, tw, ids, config=SMALL)
    assert_close_to_reference(out, x, w13, w2, tw, ids)
    # zero routing weight: exactly zero output
    assert torch.equal(moe_gemv(x, w13, w2, torch.zeros_like(tw), ids, config=SMALL), torch.zeros_like(x))
    # M=0 returns an empty tensor without launching
    assert moe_gemv(x[:0], w13, w2, tw[:0], ids[:0]).shape == (0, 64)


def test_filtered_experts_contribute_nothing():
    x, w13, w2, tw, ids = make_moe(2, 4, 2, 64, 32, seed=8)
    ids = ids.clone()
    ids[0, 1] = -1  # SGLang's marker for an expert this rank does not hold
    out = moe_gemv(x, w13, w2, tw, ids, config=SMALL)
    kept = moe_gemv(x[:1], w13, w2, tw[:1, :1], ids[:1, :1], config=SMALL)
    assert torch.equal(out[:1], kept)
    assert_close_to_reference(out, x, w13, w2, tw, ids)


def test_out_may_alias_hidden_states():
    x, w13, w2, tw, ids = make_moe(3, 4, 2, 64, 32, seed=9)
    expected = moe_gemv(x, w13, w2, tw, ids, config=SMALL)
    x_inplace = x.clone()
    ret = moe_gemv(x_inplace, w13, w2, tw, ids, out=x_inplace, config=SMALL)
    assert ret.data_ptr() == x_inplace.data_ptr() and torch.equal(x_inplace, expected)


def test_aligned_large_m_bitwise_equal_to_decode():
    M = 40  # more pairs than any decode batch; tokens share experts heavily (E=4, K=2)
    x, w13, w2, tw, ids = make_moe(M, 4, 2, 64, 32, seed=10)
    prefill = moe_gemv_aligned(x, w13, w2, tw, ids)
    for m in (0, 17, 39):
        decode = moe_gemv(x[m : m + 1], w13, w2, tw[m : m + 1], ids[m : m + 1])
        assert torch.equal(prefill[m : m + 1], decode), m
    assert_close_to_reference(prefill, x, w13, w2, tw, ids)


def test_bad_inputs_raise_typed_errors():
    x, w13, w2, tw, ids = make_moe(2, 4, 2, 64, 32)
    with pytest.raises(MoeGemvInputError, match="bfloat16"):
        moe_gemv(x.float(), w13, w2, tw, ids)
    with pytest.raises(MoeGemvInputError, match="weight shapes"):
        moe_gemv(x, w13[:, :48], w2, tw, ids)
    with pytest.raises(MoeGemvInputError, match="topk_ids"):
        moe_gemv(x, w13, w2, tw[:1], ids)


# ---------------------------------------------------------------- GPU, real shapes (skipped without CUDA)
def test_group_pairs_shares_experts_without_changing_any_tokens_bits():
    # One program per run of pairs with one expert: the bits of a pair must not depend on its run (length,
    # slot, which pairs share it) nor on the visiting order; runs longer than PAIR_GROUP loop; a filtered
    # expert (-1) contributes nothing; M above SPLIT_DOWN_MAX_M takes counters made per call.
    from microturn_kernels.moe_gemv import PAIR_GROUP, SPLIT_DOWN_MAX_M, launch_down, launch_gate_up, pair_order

    cfg = dataclasses.replace(SMALL, group_pairs=True)
    x, w13, w2, tw, ids = make_moe(7, 4, 2, 96, 40, seed=18)  # 14 pairs on 4 experts
    ids[0] = torch.tensor([2, 1])
    ids[1:, 0] = 2  # expert 2 in every token: a run of 7 > PAIR_GROUP
    ids[3, 1] = -1
    assert (ids == 2).sum() > PAIR_GROUP
    out = moe_gemv(x, w13, w2, tw, ids, config=cfg)
    assert_close_to_reference(out, x, w13, w2, tw, ids)
    for m in range(7):
        alone = moe_gemv(x[m : m + 1], w13, w2, tw[m : m + 1], ids[m : m + 1], config=cfg)
        assert torch.equal(alone, out[m : m + 1]), m
    # any visiting order, the same bits: the reversed sort splits every run differently
    h = torch.empty(14, 40, dtype=torch.bfloat16)
    reordered = torch.full_like(x, float("nan"))
    order = pair_order(ids).flip(0).contiguous()
    launch_gate_up(x, w13, ids, h, cfg, False, order)
    launch_down(h, w2, ids, tw, reordered, cfg, 1.0, False, order)
    assert torch.equal(reordered, out)
    # counters re-armed: a second call into a NaN-filled out writes every row again
    again = torch.full_like(x, float("nan"))
    assert torch.equal(moe_gemv(x, w13, w2, tw, ids, out=again, config=cfg), out)
    M = SPLIT_DOWN_MAX_M + 2
    x, w13, w2, tw, ids = make_moe(M, 4, 2, 64, 32, seed=19)
    big = moe_gemv(x, w13, w2, tw, ids, config=cfg)
    assert_close_to_reference(big, x, w13, w2, tw, ids)
    assert torch.equal(big[-1:], moe_gemv(x[-1:], w13, w2, tw[-1:], ids[-1:], config=cfg))


REAL_SHAPES = [(128, 8, 2048, 768), (8, 2, 4096, 14336), (256, 6, 4096, 2048)]  # (E, K, D, I)


@pytest.mark.gpu
@pytest.mark.parametrize("E,K,D,I", REAL_SHAPES)
def test_gpu_real_shapes_reference_and_invariance(E, K, D, I):
    x, w13, w2, tw, ids = make_moe(16, E, K, D, I, seed=11, device="cuda")
    out = moe_gemv(x, w13, w2, tw, ids)
    sub = slice(0, 2)  # the gathered fp32 reference is memory-hungry at E=8, I=14336
    assert_close_to_reference(out[sub], x[sub], w13, w2, tw[sub], ids[sub])
    for m in (0, 7, 15):
        alone = moe_gemv(x[m : m + 1], w13, w2, tw[m : m + 1], ids[m : m + 1])
        assert torch.equal(alone, out[m : m + 1]), m
    big = torch.cat([x] * 16)  # M=256 through the aligned entry point
    prefill = moe_gemv_aligned(big, w13, w2, torch.cat([tw] * 16), torch.cat([ids] * 16))
    assert torch.equal(prefill[-16:], out)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay():
    x, w13, w2, tw, ids = make_moe(4, 128, 8, 2048, 768, seed=12, device="cuda")
    expected = moe_gemv(x, w13, w2, tw, ids)
    out = torch.empty_like(x)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        moe_gemv(x, w13, w2, tw, ids, out=out)  # compile + warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_gemv(x, w13, w2, tw, ids, out=out)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("E,K,D,I", REAL_SHAPES)
def test_gpu_pdl_and_hints_bitwise_equal_in_a_graph(E, K, D, I):
    # PDL lets the down kernel start before the gate-up kernel ends: a missing wait would show as a race.
    from microturn_kernels.moe_gemv import moe_gemv_config

    x, w13, w2, tw, ids = make_moe(8, E, K, D, I, seed=15, device="cuda")
    base = moe_gemv_config(D, I)
    # Eager, no PDL, one down program per token: the bits every scheduling variant must replay.
    plain = dataclasses.replace(base, pdl=False, pdl_gate_up=False, split_down=False, preload_w2=False)
    expected = moe_gemv(x, w13, w2, tw, ids, config=plain)
    # the table's config; prefetch and eviction hints; split_down (its per-pair programs wait for h, the
    # last arrival per row block combines), with or without preload_w2 (they hold their first w2 chunk
    # while they wait); pdl_gate_up with and without a dependent down kernel (each call's gate-up waits
    # for the previous call's down kernel)
    for cfg in (base,
                dataclasses.replace(plain, pdl=True, prefetch_w2=True, evict_first=True),
                dataclasses.replace(plain, pdl=True, split_down=True),
                dataclasses.replace(plain, pdl=True, split_down=True, preload_w2=True),
                dataclasses.replace(plain, pdl_gate_up=True),
                dataclasses.replace(plain, pdl=True, split_down=True, pdl_gate_up=True)):  # fmt: skip
        _assert_graph_replays_bitwise(x, w13, w2, tw, ids, cfg, expected)
    if I <= 2048:  # the whole tile in registers (Mixtral's 14336 would not fit)
        whole = dataclasses.replace(plain, BLOCK_K=triton.next_power_of_2(I), down_warps=4)
        preloaded = dataclasses.replace(whole, pdl=True, split_down=True, preload_w2=True)
        _assert_graph_replays_bitwise(x, w13, w2, tw, ids, preloaded, moe_gemv(x, w13, w2, tw, ids, config=whole))
    # group_pairs has bits of its own: the graph must replay its eager output, which is batch-invariant
    grouped = dataclasses.replace(base, pdl=True, group_pairs=True, BLOCK_D=128, BLOCK_K=128)
    eager = moe_gemv(x, w13, w2, tw, ids, config=grouped)
    assert_close_to_reference(eager[:2], x[:2], w13, w2, tw[:2], ids[:2])
    assert torch.equal(moe_gemv(x[3:4], w13, w2, tw[3:4], ids[3:4], config=grouped), eager[3:4])
    _assert_graph_replays_bitwise(x, w13, w2, tw, ids, grouped, eager)


def _assert_graph_replays_bitwise(x, w13, w2, tw, ids, cfg, expected):
    out = torch.empty_like(x)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        moe_gemv(x, w13, w2, tw, ids, out=out, config=cfg)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(4):
            moe_gemv(x, w13, w2, tw, ids, out=out, config=cfg)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
