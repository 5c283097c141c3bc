"""fp32 -> bf16 rounding inside Triton kernels that gives the same bits compiled and interpreted.

Why a helper: Triton 3.6's interpreter (TRITON_INTERPRET=1, the CPU tests) truncates on `x.to(tl.bfloat16)`
while compiled kernels round to nearest even; a kernel that must agree with itself across both, and with
torch's `.bfloat16()`, rounds on the bits instead.
"""

import triton
import triton.language as tl


@triton.jit
def to_bf16(x):
    """fp32 -> bf16, round to nearest even, on the bits (finite values; NaN payloads are not preserved)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
