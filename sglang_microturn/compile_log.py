"""Opt-in log of Triton JIT compiles: one stderr line per kernel compiled in this process, with its duration.

A compile inside a micro-turn stalls it (~0.5 s on an H100 for an attention kernel, far past the 200 ms
budget) and every turn batched with it. `MICROTURN_LOG_TRITON_COMPILES=1` makes each SGLang process (the
scheduler is where kernels compile) log them, so a latency tail can be attributed: benchmarks/
microturn_latency.py counts these lines per scenario. Built on Triton's JIT hooks (triton.knobs.runtime:
jit_cache_hook runs before a compile, jit_post_compile_hook after), chained with hooks already installed.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "MICROTURN_LOG_TRITON_COMPILES"
PREFIX = "[microturn] triton compile:"


def format_line(module: str, name: str, seconds: float, at: float) -> str:
    """`PREFIX module.name <ms> ms at <unix time>`: the time is when the compile ended (wall clock, so a
    client on the same machine can line it up with its own timestamps)."""
    return f"{PREFIX} {module}.{name} {seconds * 1e3:.0f} ms at {at:.3f}"


def parse_line(line: str) -> tuple[str, float, float] | None:
    """(kernel, ms, unix time) of a line written by this module, else None."""
    if PREFIX not in line:
        return None
    kernel, ms, _, _, at = line.split(PREFIX, 1)[1].split()
    return kernel, float(ms), float(at)


def install() -> str:
    if os.environ.get(ENV, "0") != "1":
        return "triton compile log off"
    from triton import knobs

    runtime = knobs.runtime
    if getattr(runtime.jit_post_compile_hook, "microturn_compile_log", False):
        return "triton compile log on"  # idempotent: the plugin may be registered twice in one process
    before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    started: dict[int, float] = {}

    def on_compile_start(**hook_args):
        started[id(hook_args["key"])] = time.perf_counter()
        return before(**hook_args) if before else None

    def on_compile_end(**hook_args):
        t0 = started.pop(id(hook_args["key"]), None)
        fn = hook_args["fn"]
        if t0 is not None:
            print(format_line(fn.module, fn.name, time.perf_counter() - t0, time.time()), file=sys.stderr,
                  flush=True)
        return after(**hook_args) if after else None

    on_compile_end.microturn_compile_log = True
    runtime.jit_cache_hook, runtime.jit_post_compile_hook = on_compile_start, on_compile_end
    return "triton compile log on"
