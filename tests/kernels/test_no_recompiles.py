"""The aligned attention kernels keep one Triton specialisation per path as sessions grow and batches change.

Triton compiles a kernel once per specialisation key: the constexprs, the dtypes, and for every integer or
pointer argument not listed in `do_not_specialize` whether it equals 1 or is divisible by 16 (pointers: 16-byte
aligned). A key first seen mid-session is a compile inside a micro-turn (~0.5 s on an H100, far past the
200 ms budget). The workspace's split-slot strides were such a key until the extend workspace was padded to a
multiple of 16 split slots; this pins that down.

On the CPU the kernels run in Triton's interpreter, which compiles nothing; each launch's arguments go
through the binder Triton's CUDA launcher uses (an sm_90 target), so the recorded keys are the ones an H100
would compile. A negative control shows that a stride's divisibility changes the recorded key.
"""

import pytest
import torch
from test_aligned_attention import Pool
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from microturn_kernels import aligned_attention
from microturn_kernels.aligned_attention import AlignedAttentionConfig, aligned_decode

CFG = AlignedAttentionConfig(split_size=16, block_n=16, block_m=16)
KERNELS = {"partials": aligned_attention._split_partials_kernel, "merge": aligned_attention._merge_splits_kernel}
CHUNK, DECODES_PER_TURN, TURNS = 16, 1, 16  # 17 tokens per turn: the session ends past 16 splits of 16


class SpecialisationKeys:
    """The H100 specialisation key of every launch of the watched kernels, in launch order, by kernel name."""

    def __init__(self, kernels: dict):
        backend = make_backend(GPUTarget("cuda", 90, 32))
        self.keys, self._hooks = {name: [] for name in kernels}, []
        for name, kernel in kernels.items():
            jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
            bind = create_function_from_signature(jit.signature, jit.params, backend)

            def record(*args, _bind=bind, _name=name, **kwargs):
                _, specialisation, options = _bind(*args, **kwargs)
                self.keys[_name].append(f"{specialisation} {sorted(options.items())}")

            kernel.add_pre_run_hook(record)
            self._hooks.append((kernel, record))

    def mark(self) -> dict:
        return {name: len(keys) for name, keys in self.keys.items()}

    def remove(self):
        for kernel, hook in self._hooks:
            kernel.pre_run_hooks.remove(hook)


@pytest.fixture
def keys():
    recorder = SpecialisationKeys(KERNELS)
    yield recorder
    recorder.remove()


def test_growing_sessions_in_changing_batches_add_no_specialisation(keys):
    """Two sessions as a server runs them: each turn a 16-token extend (the real longest sequence bounds the
    split grid, as the backend passes it) and a decode step (SGLang's fixed workspace, sized by the context
    length); the second session joins the batch for some turns. Everything compiled after the first turn is
    a mid-session stall."""
    context = TURNS * (CHUNK + DECODES_PER_TURN) + 8
    pool = Pool([context, context], kv_heads=1, group=2, head_dim=16)
    sp_ctx = CFG.max_splits(context)
    workspace = (torch.empty(2, pool.h, sp_ctx, pool.dv), torch.empty(2, pool.h, sp_ctx))
    pos, first_turn = [0, 0], None
    for turn in range(TURNS):
        active = [0, 1] if 4 <= turn < 9 else [0]
        chunks = [(r, pos[r], pos[r] + CHUNK) for r in active]
        pool.extend(chunks, CFG, max_kv_len=max(e for _, _, e in chunks))
        for r in active:
            pos[r] += CHUNK
        for _ in range(DECODES_PER_TURN):
            q, kv, idx = pool.decode_args([(r, pos[r]) for r in active])
            aligned_decode(q, pool.k, pool.v, torch.empty_like(q), kv, idx, context, config=CFG,
                           workspace=workspace)
            for r in active:
                pos[r] += 1
        if turn == 0:
            first_turn = keys.mark()
    assert CFG.max_splits(pos[0]) > 16  # the session crossed 1, 2..15, 16 and 17 splits
    for name, seen in keys.keys.items():
        assert len(seen) > first_turn[name]
        late = set(seen[first_turn[name]:]) - set(seen[:first_turn[name]])
        assert not late, f"{name}: {len(late)} specialisation(s) first compiled after turn 1"


def test_a_stride_off_a_multiple_of_16_is_another_specialisation(keys):
    """Negative control: a workspace with 15 split slots (what the extend path allocated for 225-240 keys
    before it was padded) and one with 16 give two keys, so the test above can see a recompile."""
    pool = Pool([240], kv_heads=1, group=2, head_dim=16)
    q, kv, idx = pool.decode_args([(0, 200)])
    for max_kv_len in (240, 256):
        sp = CFG.max_splits(max_kv_len)
        aligned_decode(q, pool.k, pool.v, torch.empty_like(q), kv, idx, max_kv_len, config=CFG,
                       workspace=(torch.empty(1, pool.h, sp, pool.dv), torch.empty(1, pool.h, sp)))
    assert len(set(keys.keys["partials"])) == 2
