"""Interpreted kernels (the CPU tests) must not inherit the bits of the machine's BLAS.

Triton's interpreter runs `tl.dot` as `np.matmul`, the CPU's sgemm, and on some CPUs (OpenBLAS Haswell
kernels on an AMD EPYC) a row's bits there depend on the row's slot in the tile: every bitwise batch-invariance
test would then pass or fail by machine. The kernels use `fixed_order_dot` when interpreted. These tests check
that mechanism, not only its end result: under a simulated BLAS whose row bits depend on the slot (one ulp up
for odd slots), a plain tl.dot kernel changes bits (the simulation bites) while our kernels give the very bits
they give without it, so a tl.dot creeping back into an interpreted path fails here on every machine.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from microturn_kernels.aligned_attention import AlignedAttentionConfig
from microturn_kernels.batch_invariant import MatmulConfig, matmul
from microturn_kernels.fixed_order_dot import fixed_order_dot

from test_aligned_attention import Pool

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreted kernels only")


@pytest.fixture
def slot_dependent_blas(monkeypatch):
    """A switch that makes the interpreter's tl.dot a BLAS whose row bits depend on the row's tile slot."""
    real = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        out = real(self, a, b, d, input_precision, max_num_imprecise_acc)
        out.data[1::2] = np.nextafter(out.data[1::2], np.inf)  # odd slots: one ulp up
        return out

    return lambda: monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@triton.jit
def _tile_product_kernel(A, B, C, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, FIXED: tl.constexpr):
    a = tl.load(A + tl.arange(0, BM)[:, None] * BK + tl.arange(0, BK)[None, :])
    b = tl.load(B + tl.arange(0, BK)[:, None] * BN + tl.arange(0, BN)[None, :])
    if FIXED:
        c = fixed_order_dot(a, b)
    else:
        c = tl.dot(a, b)
    tl.store(C + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :], c)


def _tile_product(a, b, fixed):
    c = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32)
    _tile_product_kernel[(1,)](a, b, c, BM=a.shape[0], BK=a.shape[1], BN=b.shape[1], FIXED=fixed)
    return c


def _pairwise_reference(a, b):
    """The documented order in numpy: fp32 products, then pairs (2j, 2j + 1) summed level by level."""
    terms = a.numpy()[:, :, None] * b.numpy()[None, :, :]  # [M, K, N] fp32
    while terms.shape[1] > 1:
        terms = terms[:, 0::2] + terms[:, 1::2]
    return torch.from_numpy(np.ascontiguousarray(terms[:, 0]))


def _tiles(seed, BM=16, BK=32, BN=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BM, BK, generator=g), torch.randn(BK, BN, generator=g)


def test_fixed_order_dot_is_the_documented_pairwise_sum_and_close_to_fp64():
    a, b = _tiles(0)
    got = _tile_product(a, b, fixed=True)
    assert torch.equal(got, _pairwise_reference(a, b))
    torch.testing.assert_close(got.double(), a.double() @ b.double(), rtol=1e-5, atol=1e-5)


def test_a_row_has_the_same_bits_in_every_tile_slot():
    a, b = _tiles(1)
    want = _tile_product(a, b, fixed=True)[0]
    for slot in range(a.shape[0]):
        moved = torch.zeros_like(a)
        moved[slot] = a[0]
        assert torch.equal(_tile_product(moved, b, fixed=True)[slot], want), f"slot {slot}"


def test_simulated_slot_dependent_blas_changes_tl_dot(slot_dependent_blas):
    """Negative control: the simulation reaches tl.dot and makes a row's bits depend on its slot."""
    slot_dependent_blas()
    a, b = _tiles(2)
    moved = torch.zeros_like(a)
    moved[1] = a[0]
    assert not torch.equal(_tile_product(moved, b, fixed=False)[1], _tile_product(a, b, fixed=False)[0])


def _matmul_and_attention_outputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 72, generator=g).bfloat16()
    w = torch.randn(48, 72, generator=g).bfloat16()
    small = MatmulConfig(block_m=16, block_n=16, block_k=16)
    outs = {"matmul": matmul(x, w, torch.float32, config=small),
            "matmul_row39": matmul(x[39:], w, torch.float32, config=small)}
    pool = Pool([37, 20], kv_heads=2, group=2, head_dim=16)
    cfg = AlignedAttentionConfig(split_size=32, block_n=16, block_m=16)
    extend = pool.extend([(0, 30, 37), (1, 0, 20)], cfg)
    outs["extend"] = torch.stack([extend[k] for k in sorted(extend)])
    decode = pool.decode([(0, 36), (1, 19)], cfg)
    outs["decode"] = torch.stack([decode[k] for k in sorted(decode)])
    return outs


def test_kernels_do_not_depend_on_the_blas(slot_dependent_blas):
    clean = _matmul_and_attention_outputs()
    assert torch.equal(clean["matmul_row39"][0], clean["matmul"][39])  # row 39 sits in slot 7 of its tile
    slot_dependent_blas()
    skewed = _matmul_and_attention_outputs()
    for name, value in clean.items():
        assert torch.equal(skewed[name], value), f"{name} reached the BLAS"
