"""The opt-in Triton compile log (sglang_microturn.compile_log): off by default; on, one parseable stderr line
per compile, chained with hooks that were already installed (their answers still reach Triton). CPU: the hooks
are called as Triton's JITFunction._call_hook calls them; GPU: a real compile of a tiny kernel."""

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JitFunctionInfo

from sglang_microturn import compile_log


@pytest.fixture
def hooks(monkeypatch):
    """Triton's process-wide hooks, restored after the test."""
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", None)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", None)
    return monkeypatch


def _compile(kernel_name: str) -> tuple[object, object]:
    """What Triton does around one compile: the cache hook, then (if it did not veto) the post-compile hook."""
    key = (("i32", "D"), kernel_name)  # a fresh object per compile, as Triton's cache key
    args = dict(key=key, repr=kernel_name, fn=JitFunctionInfo("mod", kernel_name, None), compile={"key": key},
                is_manual_warmup=False, already_compiled=False)
    vetoed = knobs.runtime.jit_cache_hook(**args)
    return vetoed, None if vetoed else knobs.runtime.jit_post_compile_hook(**args)


def test_off_unless_asked(hooks, monkeypatch):
    monkeypatch.delenv(compile_log.ENV, raising=False)
    assert compile_log.install() == "triton compile log off"
    assert knobs.runtime.jit_cache_hook is None and knobs.runtime.jit_post_compile_hook is None


def test_one_line_per_compile_chained_with_existing_hooks(hooks, monkeypatch, capsys):
    seen = []
    hooks.setattr(knobs.runtime, "jit_cache_hook", lambda **a: seen.append(("start", a["fn"].name)) or None)
    hooks.setattr(knobs.runtime, "jit_post_compile_hook", lambda **a: seen.append(("end", a["fn"].name)) or "r")
    monkeypatch.setenv(compile_log.ENV, "1")
    assert compile_log.install() == "triton compile log on"
    assert compile_log.install() == "triton compile log on"  # twice: still one line per compile
    assert _compile("_split_partials_kernel") == (None, "r")
    assert _compile("_merge_splits_kernel") == (None, "r")
    lines = capsys.readouterr().err.splitlines()
    parsed = [compile_log.parse_line(ln) for ln in lines]
    assert [p[0] for p in parsed] == ["mod._split_partials_kernel", "mod._merge_splits_kernel"]
    assert all(ms >= 0 and at > 1.7e9 for _, ms, at in parsed)
    assert seen == [("start", "_split_partials_kernel"), ("end", "_split_partials_kernel"),
                    ("start", "_merge_splits_kernel"), ("end", "_merge_splits_kernel")]
    assert compile_log.parse_line("[scheduler] an unrelated line") is None


def test_a_vetoed_compile_logs_nothing(hooks, monkeypatch, capsys):
    """A cache hook returning True tells Triton to skip the compile; ours passes that on and logs nothing."""
    hooks.setattr(knobs.runtime, "jit_cache_hook", lambda **a: True)
    monkeypatch.setenv(compile_log.ENV, "1")
    compile_log.install()
    assert _compile("k") == (True, None)
    assert capsys.readouterr().err == ""


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


@pytest.mark.gpu
def test_a_real_compile_is_logged_once(hooks, monkeypatch, capsys):
    monkeypatch.setenv(compile_log.ENV, "1")
    compile_log.install()
    x = torch.zeros(16, device="cuda")
    for n in (5, 5, 16):  # 5 twice: one compile; 16 is divisible by 16: another specialisation
        _add_one[(1,)](x, n, BLOCK=16)
    torch.cuda.synchronize()
    names = [compile_log.parse_line(ln)[0] for ln in capsys.readouterr().err.splitlines()
             if compile_log.parse_line(ln)]
    assert names == [f"{__name__}._add_one"] * 2
