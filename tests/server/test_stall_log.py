"""The opt-in stall log (sglang_microturn.server.stall_log): off by default; on, one parseable stderr line per Triton
compile (chained with hooks already installed, whose answers still reach Triton) and per long garbage
collection. CPU: the compile hooks are called as Triton's JITFunction._call_hook calls them, and a real
gc.collect() is timed; GPU: a real compile of a tiny kernel."""

import gc

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JitFunctionInfo

from sglang_microturn.config import SettingError
from sglang_microturn.server import stall_log
@pytest.fixture
def clean(monkeypatch):
    """Triton's process-wide hooks and Python's gc callbacks, restored after the test (gc.callbacks in place:
    the collector holds that very list)."""
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", None)
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", None)
    saved = gc.callbacks[:]
    yield monkeypatch
    gc.callbacks[:] = saved


def _remove_ours():
    gc.callbacks[:] = [cb for cb in gc.callbacks if not getattr(cb, "microturn_stall_log", False)]


def _compile(kernel_name: str) -> tuple[object, object]:
    """What Triton does around one compile: the cache hook, then (if it did not veto) the post-compile hook."""
    key = (("i32", "D"), kernel_name)  # a fresh object per compile, as Triton's cache key
    args = dict(key=key, repr=kernel_name, fn=JitFunctionInfo("mod", kernel_name, None), compile={"key": key},
                is_manual_warmup=False, already_compiled=False)
    vetoed = knobs.runtime.jit_cache_hook(**args)
    return vetoed, None if vetoed else knobs.runtime.jit_post_compile_hook(**args)


def _stalls(err: str) -> list:
    return [s for s in map(stall_log.parse_line, err.splitlines()) if s]


def test_off_unless_asked(clean):
    clean.delenv(stall_log.ENV, raising=False)
    callbacks = gc.callbacks[:]
    assert stall_log.install() == "stall log off"
    assert knobs.runtime.jit_cache_hook is None and knobs.runtime.jit_post_compile_hook is None
    assert gc.callbacks == callbacks


def test_one_line_per_compile_chained_with_existing_hooks(clean, capsys):
    seen = []
    clean.setattr(knobs.runtime, "jit_cache_hook", lambda **a: seen.append(("start", a["fn"].name)) or None)
    clean.setattr(knobs.runtime, "jit_post_compile_hook", lambda **a: seen.append(("end", a["fn"].name)) or "r")
    clean.setenv(stall_log.ENV, "1")
    assert stall_log.install() == "stall log on"
    assert stall_log.install() == "stall log on"  # twice: still one line per compile
    assert _compile("_split_partials_kernel") == (None, "r")
    assert _compile("_merge_splits_kernel") == (None, "r")
    stalls = [s for s in _stalls(capsys.readouterr().err) if s.kind == "compile"]
    assert [s.what for s in stalls] == ["mod._split_partials_kernel", "mod._merge_splits_kernel"]
    assert all(s.ms >= 0 and s.at > 1.7e9 and s.pid > 0 for s in stalls)
    assert seen == [("start", "_split_partials_kernel"), ("end", "_split_partials_kernel"),
                    ("start", "_merge_splits_kernel"), ("end", "_merge_splits_kernel")]
    assert stall_log.parse_line("[scheduler] an unrelated line") is None


def test_a_vetoed_compile_logs_nothing(clean, capsys):
    """A cache hook returning True tells Triton to skip the compile; ours passes that on and logs nothing."""
    clean.setattr(knobs.runtime, "jit_cache_hook", lambda **a: True)
    clean.setenv(stall_log.ENV, "1")
    stall_log.install()
    assert _compile("k") == (True, None)
    assert capsys.readouterr().err == ""


def test_collections_from_the_threshold_up_are_logged(clean, capsys):
    clean.setenv(stall_log.ENV, "1")
    clean.setenv(stall_log.GC_MS_ENV, "0")  # every collection
    stall_log.install()
    gc.collect()
    assert "gen2" in [s.what for s in _stalls(capsys.readouterr().err) if s.kind == "gc"]
    _remove_ours()
    clean.setenv(stall_log.GC_MS_ENV, "60000")  # a minute: none
    stall_log.install()
    gc.collect()
    assert not [s for s in _stalls(capsys.readouterr().err) if s.kind == "gc"]


@pytest.mark.parametrize("bad", ["abc", "-5", "nan", ""])
def test_a_bad_gc_threshold_stops_with_a_clear_message_and_installs_nothing(clean, bad):
    clean.setenv(stall_log.ENV, "1")
    clean.setenv(stall_log.GC_MS_ENV, bad)
    callbacks = gc.callbacks[:]
    with pytest.raises(SettingError, match=f"{stall_log.GC_MS_ENV}=.*want a number of milliseconds >= 0"):
        stall_log.install()
    assert gc.callbacks == callbacks
    assert knobs.runtime.jit_cache_hook is None and knobs.runtime.jit_post_compile_hook is None


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


@pytest.mark.gpu
def test_a_real_compile_is_logged_once(clean, capsys):
    clean.setenv(stall_log.ENV, "1")
    stall_log.install()
    x = torch.zeros(16, device="cuda")
    for n in (5, 5, 16):  # 5 twice: one compile; 16 is divisible by 16: another specialisation
        _add_one[(1,)](x, n, BLOCK=16)
    torch.cuda.synchronize()
    compiles = [s.what for s in _stalls(capsys.readouterr().err) if s.kind == "compile"]
    assert compiles == [f"{__name__}._add_one"] * 2
