"""Route SGLang's Triton fused MoE to the gather + GEMV kernels (microturn_kernels.moe_gemv) at small M.

`install()` registers an AROUND hook on
`sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe.fused_experts`, the function SGLang's Triton MoE
runner calls for the standard (no all-to-all) dispatch: `fused_experts_none_to_triton` in
`moe_runner/triton.py` re-imports it on every call, and `UnquantizedFusedMoEMethod` imports it by name
(HookRegistry propagates the patch to such bindings). Not covered: `--enable-lora` or
SGLANG_CI_DISABLE_MOE_FUSED_FUNC=1 (the runner-core path calls the kernels directly), other MoE backends.

Per call, the hook computes the MoE with `moe_gemv` when every condition holds, else calls SGLang:
CUDA tensors; bf16 activations and weights; unquantized (no fp8/int8/int4 flags, scales, zero points or
block shape, no pre-quantized activation); no biases; activation "silu", gated, standard [gate; up] math
(no gemm1 alpha/limit, no swiglu limit); router weight applied after the down projection; combine on;
M <= MICROTURN_MOE_GEMV_MAX_TOKENS and M * top_k <= num_experts / 2; or any M when MICROTURN_MOE_ALIGNED=1.

Why the second bound: per-pair GEMV wins while most routed pairs hit distinct experts. Once M * top_k
exceeds half the experts, pairs share experts and SGLang's grouped GEMM reuses each weight tile across them.
Measured on an H100 (benchmarks/results/moe_decode_h100.json), ours is faster exactly where M * K <= E / 2:
E=128 K=8 up to M=8 (1.02-1.21x), E=8 K=2 up to M=2 (1.04-1.27x), E=256 K=6 up to M=16 (1.01-1.06x), and
slower beyond (0.94x at E=128 M=16, 0.94-0.41x at E=8 M>=4, 0.97x at E=256 M=32). On an H200 with the
H200 table (benchmarks/results/moe_decode_h200.json, commit ae52c2e) the same: E=128 1.12-1.39x up to M=8,
E=8 1.12x / 1.04x at M=1 / 2, E=256 1.01-1.21x up to M=16, and 0.26-0.95x outside the bound (docs/moe.md).

Environment, read once by `install()`:
  MICROTURN_MOE_GEMV_MAX_TOKENS  largest M routed to the GEMV kernels (default 16; 0 disables the route)
  MICROTURN_MOE_ALIGNED=1        alignment mode: every M goes to the same kernels, so a token's MoE output
                                 is bitwise the same in decode and in prefill (slower prefill: docs/moe.md)
The checks read shapes, dtypes and flags only, never tensor values: no host sync, CUDA-graph safe.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from sglang_microturn import config

logger = logging.getLogger(__name__)

TARGET = "sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe.fused_experts"
MAX_PAIRS_PER_EXPERT = 0.5  # route while M * top_k <= MAX_PAIRS_PER_EXPERT * num_experts (module docstring)
ENV_MAX_TOKENS = config.MOE_GEMV_MAX_TOKENS  # a cap on top of the expert-coverage bound
ENV_ALIGNED = config.MOE_ALIGNED

# `fused_experts` keyword arguments that must be at their "off" value for the GEMV route.
_MUST_BE_FALSE = ("use_fp8_w8a8", "use_int8_w8a8", "use_int8_w8a16", "use_int4_w4a16", "per_channel_quant")
_MUST_BE_NONE = (
    "b1", "b2", "w1_scale", "w2_scale", "w1_zp", "w2_zp", "a1_scale", "a2_scale", "block_shape", "a1_q",
)  # fmt: skip


def read_env() -> tuple[int, bool]:
    """(max_tokens, aligned) from the environment; raises config.SettingError on a bad value."""
    return config.value(ENV_MAX_TOKENS), config.value(ENV_ALIGNED)


def describe(max_tokens: int, aligned: bool) -> str:
    return "moe-gemv(all M, aligned)" if aligned else f"moe-gemv(M<={max_tokens})"


def _bind(original: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    if not args:  # SGLang's callers pass everything by keyword: skip the slow bind
        return kwargs
    return inspect.signature(original).bind(*args, **kwargs).arguments


def gemv_route_refusal(call: dict[str, Any], max_tokens: int, aligned: bool, require_cuda: bool = True) -> str | None:
    """None when this `fused_experts` call may go to moe_gemv, else the first reason it may not."""
    import torch

    x = call.get("hidden_states")
    w1, w2 = call.get("w1"), call.get("w2")
    cfg, topk_output = call.get("moe_runner_config"), call.get("topk_output")
    if x is None or w1 is None or w2 is None or cfg is None or topk_output is None:
        return "missing argument"
    if require_cuda and not x.is_cuda:
        return "not CUDA"
    if x.dtype != torch.bfloat16 or w1.dtype != torch.bfloat16 or w2.dtype != torch.bfloat16:
        return "not bf16"
    if x.dim() != 2 or x.shape[0] == 0:
        return "empty or not 2-D"
    if not aligned and x.shape[0] > max_tokens:
        return "M above threshold"
    for name in _MUST_BE_FALSE:
        if call.get(name, False):
            return f"{name} set"
    for name in _MUST_BE_NONE:
        if call.get(name) is not None:
            return f"{name} given"
    if getattr(cfg, "activation", "silu") != "silu" or not getattr(cfg, "is_gated", True):
        return "activation not gated silu"
    if getattr(cfg, "apply_router_weight_on_input", False) or getattr(cfg, "no_combine", False):
        return "router weight on input or no combine"
    if any(getattr(cfg, f, None) is not None for f in ("gemm1_alpha", "gemm1_clamp_limit", "swiglu_limit")):
        return "swiglu alpha/limit"
    if len(topk_output) != 3:
        return "top-k output not in the standard format"
    if not aligned and x.shape[0] * topk_output[1].shape[-1] > MAX_PAIRS_PER_EXPERT * w1.shape[0]:
        return "routed pairs exceed half the experts"
    if w1.dim() != 3 or w2.dim() != 3 or w1.shape[1] != 2 * w2.shape[2] or w1.shape[2] != x.shape[1]:
        return "weight shapes not [E, 2I, D] / [E, D, I]"
    return None


def make_fused_experts_hook(max_tokens: int, aligned: bool, *, require_cuda: bool = True) -> Callable:
    """The AROUND hook `fn(original, *args, **kwargs)`; `require_cuda=False` only for CPU tests."""

    def fused_experts_microturn(original: Callable, *args: Any, **kwargs: Any):
        call = _bind(original, args, kwargs)
        if gemv_route_refusal(call, max_tokens, aligned, require_cuda) is not None:
            return original(*args, **kwargs)
        from microturn_kernels.moe_gemv import moe_gemv

        x, cfg = call["hidden_states"], call["moe_runner_config"]
        topk_weights, topk_ids = call["topk_output"][0], call["topk_output"][1]
        return moe_gemv(
            x, call["w1"], call["w2"], topk_weights, topk_ids,
            routed_scaling_factor=getattr(cfg, "routed_scaling_factor", None),
            out=x if getattr(cfg, "inplace", False) else None,  # SGLang's in-place mode returns hidden_states
        )  # fmt: skip

    return fused_experts_microturn


def install() -> str:
    """Register the hook with SGLang's HookRegistry (call from the plugin entry point, before hooks apply).

    Returns a short description for the plugin's log line, e.g. "moe-gemv(M<=16)".
    """
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    max_tokens, aligned = read_env()
    if max_tokens == 0 and not aligned:
        return "moe-gemv(off)"
    HookRegistry.register(TARGET, make_fused_experts_hook(max_tokens, aligned), HookType.AROUND)
    return describe(max_tokens, aligned)
