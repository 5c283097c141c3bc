"""The tile product `a @ b` that interpreted kernels (TRITON_INTERPRET=1, the CPU tests) run instead of tl.dot.

Why: Triton 3.6's interpreter runs `tl.dot` as `np.matmul`, i.e. the machine's BLAS sgemm, whose bits for a
row depend on where the row sits in the tile (OpenBLAS with OPENBLAS_CORETYPE=Haswell on an AMD EPYC: a row
moved from slot 7 to slot 0 of a 16 x 16 tile changes its low bits) and may change with the BLAS build,
its core type and its thread count. A kernel whose contract is "a row's bits never depend on its place in
the batch" cannot be tested through such a product. This one is built from elementwise fp32 multiplies and
adds in one fixed order, so every output element gets the same IEEE operations whatever tile slot it is in,
on any CPU and any BLAS:

    out[m, n] = pairwise sum over k of fl(a[m, k] * b[k, n]), pairs (2j, 2j + 1) at every level

Precision contract: fp32 products, each rounded once, summed in the tree above (error bound of a pairwise
sum: <= log2(BK) roundings per element); operands are widened to fp32 first (exact from bf16, and it avoids
the interpreter's mis-read of bf16 dot operands). Compiled kernels keep tl.dot on the tensor cores: compiled
and interpreted bits differ, each is self-consistent. BK must be a power of two (every tl.dot tile is).
"""

import triton
import triton.language as tl


@triton.jit
def fixed_order_dot(a, b):
    """a [BM, BK] @ b [BK, BN] -> [BM, BN] fp32 from elementwise ops only (interpreter use; see the module)."""
    BM: tl.constexpr = a.shape[0]
    BN: tl.constexpr = b.shape[1]
    terms = tl.permute(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], (0, 2, 1))  # [BM, BN, BK]
    while terms.shape[2] > 1:  # interpreted only: a plain Python loop, one level of the pairwise tree a pass
        lo, hi = tl.split(tl.reshape(terms, [BM, BN, terms.shape[2] // 2, 2]))
        terms = lo + hi  # [BM, BN, width / 2]
    return tl.reshape(terms, [BM, BN])
