"""Fixed-order all-reduce (sglang_microturn.alignment.fixed_order_allreduce) on 2 and 3 CPU processes over gloo: the
result is bitwise the same on every rank, equals a rank-order sum computed here, and a row's bits do not
depend on how many other rows shared the call. A negative control shows that another summation order does
change bits for some inputs, so these equalities can fail.

One spawn per world size (module fixture) runs every scenario and saves each rank's results; the tests compare
them here. Rank r's partials are regenerated here from the same seeds.
"""


import pytest
import torch
from gloo_ranks import spawn_gloo_ranks

from sglang_microturn.alignment.fixed_order_allreduce import (
    FixedOrderAllReduceError,
    fixed_order_all_reduce,
    sum_in_rank_order,
)

M, D = 37, 96  # rows (tokens) and width of the batch; 37 is prime, so no split below is uniform
SPLITS = (1, 16, 20)  # token counts of the chunked calls, summing to M
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# 1 + 2^25 rounds to 2^25 in fp32 (ulp 4), so rank order ((1 + 2^25) - 2^25) gives 0 and reverse order
# ((-2^25 + 2^25) + 1) gives 1; every value is exact in bf16. Rank r contributes CANCEL[r].
CANCEL = (1.0, 2.0**25, -(2.0**25))


def partials(rank: int, dtype_name: str) -> torch.Tensor:
    """Rank `rank`'s [M, D] partial: normals scaled by 2^[-8, 8) per element, so that the W terms of an element
    differ in magnitude and their sum's rounding depends on the order."""
    g = torch.Generator().manual_seed(1000 * rank + len(dtype_name))
    scale = torch.exp2(torch.randint(-8, 8, (M, D), generator=g).float())
    return (torch.randn(M, D, generator=g) * scale).to(DTYPES[dtype_name])


def cancel_partial(rank: int) -> torch.Tensor:
    return torch.full((4,), CANCEL[rank], dtype=torch.bfloat16)


def _worker(rank: int, world: int, out_dir: str) -> None:
    results = {}
    for name in DTYPES:
        x = partials(rank, name)
        results[f"{name}/full"] = fixed_order_all_reduce(x)
        results[f"{name}/rows"] = torch.cat([fixed_order_all_reduce(x[r:r + 1]) for r in range(M)])
        results[f"{name}/splits"] = torch.cat([fixed_order_all_reduce(c) for c in x.split(SPLITS)])
        results[f"{name}/flat"] = fixed_order_all_reduce(x.flatten())  # another message shape, same bytes
        assert torch.equal(x, partials(rank, name)), "the input partial was modified"
    results["cancel"] = fixed_order_all_reduce(cancel_partial(rank))
    torch.save(results, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    """(world, [rank 0 results, rank 1 results, ...])."""
    world = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    spawn_gloo_ranks(_worker, world, out, str(out))
    return world, [torch.load(out / f"rank{r}.pt") for r in range(world)]


def rank_order_sum(terms: list[torch.Tensor]) -> torch.Tensor:
    """The contract written out independently of the module: fp32 adds in rank order, one rounding."""
    total = terms[0].float()
    for t in terms[1:]:
        total = total + t.float()
    return total.to(terms[0].dtype)


def test_every_rank_gets_the_same_bits(run):
    world, results = run
    for key, value in results[0].items():
        for rank in range(1, world):
            assert torch.equal(results[rank][key], value), f"{key}: rank {rank} differs from rank 0"


@pytest.mark.parametrize("name", list(DTYPES))
def test_result_is_the_rank_order_sum(run, name):
    world, results = run
    expected = rank_order_sum([partials(r, name) for r in range(world)])
    assert results[0][f"{name}/full"].dtype == DTYPES[name]
    assert torch.equal(results[0][f"{name}/full"], expected)


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("how", ["rows", "splits", "flat"])
def test_row_bits_do_not_depend_on_the_batch(run, name, how):
    """Row r reduced alone, in a chunk of 1, 16 or 20 tokens, or as part of one flat message: the bits of the
    whole [M, D] reduce."""
    _, results = run
    full = results[0][f"{name}/full"]
    assert torch.equal(results[0][f"{name}/{how}"].view(M, D), full)


def test_negative_control_another_order_changes_bits(run):
    """On the same partials, reverse rank order gives other bits for some element (the fixed order is what
    the tests above pin down), and the crafted cancellation input reduces to the rank-order value."""
    world, results = run
    terms = [partials(r, "fp32") for r in range(world)]
    if world >= 3:  # two terms commute: with W = 2 every order of one addition is the same
        reverse = rank_order_sum(terms[::-1])
        assert not torch.equal(reverse, results[0]["fp32/full"])
        assert torch.equal(results[0]["cancel"], torch.zeros(4, dtype=torch.bfloat16))
        assert torch.equal(rank_order_sum([cancel_partial(r) for r in reversed(range(world))]),
                           torch.ones(4, dtype=torch.bfloat16))
    else:
        assert torch.equal(results[0]["cancel"], torch.full((4,), 2.0**25, dtype=torch.bfloat16))
    # Another precision contract (bf16 adds, rounding after each one, as a bf16 ring does) also changes bits.
    bf16_terms = [partials(r, "bf16") for r in range(world)]
    bf16_running = bf16_terms[0]
    for t in bf16_terms[1:]:
        bf16_running = bf16_running + t
    assert torch.equal(bf16_running, results[0]["bf16/full"]) == (world == 2)


def test_sum_in_rank_order_refuses_integer_partials():
    with pytest.raises(FixedOrderAllReduceError, match="torch.int32"):
        sum_in_rank_order(torch.ones(2, 3, dtype=torch.int32))


def test_sum_in_rank_order_refuses_an_empty_stack():
    with pytest.raises(FixedOrderAllReduceError, match=r"\(0, 3\)"):
        sum_in_rank_order(torch.ones(0, 3))


def test_row_parallel_split_changes_bits_against_one_device():
    """The expected answer to "TP=1 vs TP=2 bitwise?" (docs/alignment.md, issue 8): no, in general. A
    row-parallel projection at TP=2 reduces K in two halves, rounds each partial to bf16 (the aligned forward's
    matmul output) and adds the two; TP=1 reduces all of K into one fp32 accumulator. The TP=2 result is still
    batch-invariant, and one device can reproduce it by computing the shards' partials itself."""
    from microturn_kernels.batch_invariant import matmul  # Triton interpreter on the CPU (tests/conftest.py)

    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 256, generator=g).to(torch.bfloat16)  # [T, K]: o_proj's input, H hd = 256
    w = (torch.randn(64, 256, generator=g) / 16).to(torch.bfloat16)  # [D, K]

    def tp2(rows):  # rank r holds K columns [128 r, 128 (r + 1))
        return sum_in_rank_order(torch.stack([matmul(rows[:, k:k + 128].contiguous(), w[:, k:k + 128].contiguous())
                                              for k in (0, 128)]))

    split = tp2(x)  # [T, D]
    assert not torch.equal(split, matmul(x, w))
    assert torch.equal(torch.cat([tp2(x[t:t + 1]) for t in range(x.shape[0])]), split)
