"""install() registers the aligned attention backend and the server-arg choices (in a subprocess: it mutates
SGLang's module-level registries)."""

import os
import subprocess
import sys

_PROBE = r"""
import types
from sglang_microturn.server import aligned_attention_backend as aab
line = aab.install()
assert aab.install() == line  # idempotent
from sglang.srt import server_args as sa
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.arg_groups.overrides import _deterministic_attention_backend
name = aab.BACKEND_NAME
assert ATTENTION_BACKENDS[name] is aab.create_aligned_backend
for choices in (sa.ATTENTION_BACKEND_CHOICES, sa.DETERMINISTIC_ATTENTION_BACKEND_CHOICES,
                sa.RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND):
    assert choices.count(name) == 1, choices
# the deterministic-mode gate accepts the name
assert _deterministic_attention_backend(
    types.SimpleNamespace(enable_deterministic_inference=True, attention_backend=name)) == {}
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
cls = aab.aligned_backend_class()
assert issubclass(cls, TritonAttnBackend) and cls.__name__ == "AlignedTritonAttnBackend"
for m in ("get_num_kv_splits", "_aligned_decode_fwd", "_aligned_extend_fwd"):
    assert m in cls.__dict__, m
print("TRITON_REPLACED" if ATTENTION_BACKENDS["triton"] is aab.create_aligned_backend else "TRITON_KEPT")
print(line)
"""


def _probe(extra_env):
    env = {**os.environ, **extra_env}
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_install_registers_name_and_choices():
    out = _probe({"MICROTURN_ALIGNED_ATTENTION": "", "MICROTURN_ATTN_SPLIT": "1024"})
    assert "TRITON_KEPT" in out
    assert "'microturn_aligned' registered (split S=1024" in out


def test_install_can_serve_the_triton_name():
    out = _probe({"MICROTURN_ALIGNED_ATTENTION": "triton"})
    assert "TRITON_REPLACED" in out and "also serves --attention-backend triton" in out
