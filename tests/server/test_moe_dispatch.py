"""The fused-MoE hook: which calls go to moe_gemv, which to SGLang's own path, and that SGLang sees it."""

import inspect
import os
import subprocess
import sys

import pytest
import torch

from microturn_kernels.moe_gemv import moe_gemv
from sglang_microturn.server import moe_dispatch
from sglang_microturn.config import SettingError
from sglang_microturn.server.moe_dispatch import TARGET, make_fused_experts_hook


@pytest.fixture(scope="module")
def sglang_moe():
    from sglang.srt.layers.moe.moe_runner.base import MoeRunnerConfig
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    return fused_moe, MoeRunnerConfig, StandardTopKOutput


def small_call(sglang_moe, M=2, **config_overrides):
    _, MoeRunnerConfig, StandardTopKOutput = sglang_moe
    g = torch.Generator().manual_seed(M)
    E, K, D, I = 8, 2, 64, 32
    x = torch.randn(M, D, generator=g).bfloat16()
    w1 = (torch.randn(E, 2 * I, D, generator=g) / 8).bfloat16()
    w2 = (torch.randn(E, D, I, generator=g) / 6).bfloat16()
    tw, ids = torch.topk(torch.randn(M, E, generator=g).softmax(-1), K)
    cfg = MoeRunnerConfig(**{"inplace": False, **config_overrides})
    return dict(hidden_states=x, w1=w1, w2=w2, topk_output=StandardTopKOutput(tw, ids.int(), None), moe_runner_config=cfg)


class FakeOriginal:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return "sglang"


def test_signature_of_the_target_is_what_the_hook_reads(sglang_moe):
    fused_moe = sglang_moe[0]
    params = inspect.signature(fused_moe.fused_experts).parameters
    read = {"hidden_states", "w1", "w2", "topk_output", "moe_runner_config"}
    read |= set(moe_dispatch._MUST_BE_FALSE) | set(moe_dispatch._MUST_BE_NONE)
    assert read <= set(params), read - set(params)
    assert set(params) <= read, f"new fused_experts arguments the hook ignores: {set(params) - read}"


@pytest.mark.parametrize(
    "change",
    [
        {},  # CPU tensors (require_cuda=True)
        {"require_cuda": False, "M": 17},  # above the threshold
        {"require_cuda": False, "M": 3},  # 3 tokens x top-2 = 6 pairs > 8 experts / 2: grouped GEMM wins
        {"require_cuda": False, "use_fp8_w8a8": True},
        {"require_cuda": False, "b1": "bias"},
        {"require_cuda": False, "cfg": {"activation": "gelu"}},
        {"require_cuda": False, "cfg": {"apply_router_weight_on_input": True}},
        {"require_cuda": False, "cfg": {"no_combine": True}},
        {"require_cuda": False, "cfg": {"gemm1_alpha": 1.0, "gemm1_clamp_limit": 7.0}},
        {"require_cuda": False, "dtype": torch.float16},
    ],
)
def test_fallback_calls_sglang(sglang_moe, change):
    change = dict(change)
    call = small_call(sglang_moe, M=change.pop("M", 2), **change.pop("cfg", {}))
    if "dtype" in change:
        call["hidden_states"] = call["hidden_states"].to(change.pop("dtype"))
    require_cuda = change.pop("require_cuda", True)
    call.update(change)
    original = FakeOriginal()
    hook = make_fused_experts_hook(16, aligned=False, require_cuda=require_cuda)
    assert hook(original, **call) == "sglang" and original.calls == 1


def test_routed_call_runs_moe_gemv(sglang_moe):
    call = small_call(sglang_moe, M=2, routed_scaling_factor=1.5)
    original = FakeOriginal()
    out = make_fused_experts_hook(16, aligned=False, require_cuda=False)(original, **call)
    assert original.calls == 0
    tw, ids, _ = call["topk_output"]
    expected = moe_gemv(call["hidden_states"], call["w1"], call["w2"], tw, ids, routed_scaling_factor=1.5)
    assert torch.equal(out, expected)


def test_routed_call_positional_and_inplace(sglang_moe):
    call = small_call(sglang_moe, M=2, inplace=True)
    x_before = call["hidden_states"].clone()
    tw, ids, _ = call["topk_output"]
    expected = moe_gemv(x_before, call["w1"], call["w2"], tw, ids)
    fused_experts = sglang_moe[0].fused_experts  # the real signature, for binding positional arguments
    hook = make_fused_experts_hook(16, aligned=False, require_cuda=False)
    args = [call.pop(k) for k in ("hidden_states", "w1", "w2", "topk_output")]
    ret = hook(fused_experts, *args, **call)
    assert ret is args[0] and torch.equal(args[0], expected)  # written in place, as SGLang's inplace mode


def test_aligned_mode_routes_every_m(sglang_moe):
    call = small_call(sglang_moe, M=20)
    original = FakeOriginal()
    out = make_fused_experts_hook(16, aligned=True, require_cuda=False)(original, **call)
    assert original.calls == 0 and out.shape == call["hidden_states"].shape


def test_env_parsing(monkeypatch):
    monkeypatch.delenv(moe_dispatch.ENV_MAX_TOKENS, raising=False)
    monkeypatch.delenv(moe_dispatch.ENV_ALIGNED, raising=False)
    assert moe_dispatch.read_env() == (16, False)
    monkeypatch.setenv(moe_dispatch.ENV_MAX_TOKENS, "8")
    monkeypatch.setenv(moe_dispatch.ENV_ALIGNED, "1")
    assert moe_dispatch.read_env() == (8, True)
    monkeypatch.setenv(moe_dispatch.ENV_MAX_TOKENS, "lots")
    with pytest.raises(SettingError, match="MICROTURN_MOE_GEMV_MAX_TOKENS='lots'"):
        moe_dispatch.read_env()


def test_install_hook_is_seen_where_sglang_calls_it():
    # Applied hooks stay for the process: apply them in a subprocess. fused_experts_none_to_triton imports
    # fused_experts from the module at call time; check that name now resolves to our wrapper.
    code = (
        "from sglang.srt.plugins.hook_registry import HookRegistry\n"
        "from sglang_microturn.server.moe_dispatch import install\n"
        "print(install())\n"
        "HookRegistry.apply_hooks()\n"
        "from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe import fused_experts\n"
        "from sglang.srt.layers.quantization import unquant\n"
        "assert fused_experts.__wrapped__.__name__ == 'fused_experts'\n"
        "assert getattr(unquant, 'fused_experts', fused_experts) is fused_experts\n"
        "print('WRAPPED')\n"
    )
    env = dict(os.environ, MICROTURN_MOE_GEMV_MAX_TOKENS="8")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["moe-gemv(M<=8)", "WRAPPED"]
    assert TARGET.endswith("fused_moe.fused_experts")
