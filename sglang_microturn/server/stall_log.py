"""Opt-in log of the one-off stalls of a server process: Triton JIT compiles and long garbage collections.

A compile inside a micro-turn (~0.5 s on an H100 for an attention kernel) or a full collection of a large
Python heap stalls that turn and every turn batched with it, far past the 200 ms budget, and leaves no trace in
a latency histogram. `MICROTURN_LOG_STALLS=1` makes every SGLang process that loads the plugin (the scheduler,
where kernels compile and batches are built, included) print one stderr line per event:

    [microturn] stall: compile <module.kernel> <ms> ms at <unix time> pid <pid>
    [microturn] stall: gc gen<N> <ms> ms at <unix time> pid <pid>

Every compile is logged (each is a new specialisation); collections from MICROTURN_STALL_LOG_GC_MS (default
20) up. The time is when the event ended, on the wall clock, so a client on the same machine can line events
up with its own timestamps (benchmarks/microturn_latency.py lists them per scenario). Built on Triton's JIT
hooks (triton.knobs.runtime: jit_cache_hook before a compile, jit_post_compile_hook after), chained with hooks
already installed, and on Python's gc.callbacks.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from typing import NamedTuple

from sglang_microturn import config

ENV = config.LOG_STALLS
GC_MS_ENV = config.STALL_LOG_GC_MS
PREFIX = "[microturn] stall:"


class Stall(NamedTuple):
    kind: str  # "compile" or "gc"
    what: str  # the kernel, or the collected generation
    ms: float
    at: float  # unix time at its end
    pid: int


def format_line(stall: Stall) -> str:
    return f"{PREFIX} {stall.kind} {stall.what} {stall.ms:.0f} ms at {stall.at:.3f} pid {stall.pid}"


def parse_line(line: str) -> Stall | None:
    """The stall a line written by this module reports, else None."""
    if PREFIX not in line:
        return None
    kind, what, ms, _, _, at, _, pid = line.split(PREFIX, 1)[1].split()
    return Stall(kind, what, float(ms), float(at), int(pid))


def _emit(kind: str, what: str, seconds: float) -> None:
    print(format_line(Stall(kind, what, seconds * 1e3, time.time(), os.getpid())), file=sys.stderr, flush=True)


def _install_compile_hooks() -> None:
    from triton import knobs

    runtime = knobs.runtime
    before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    started: dict[int, float] = {}

    def on_compile_start(**hook_args):
        started[id(hook_args["key"])] = time.perf_counter()
        return before(**hook_args) if before else None

    def on_compile_end(**hook_args):
        t0 = started.pop(id(hook_args["key"]), None)
        if t0 is not None:
            fn = hook_args["fn"]
            _emit("compile", f"{fn.module}.{fn.name}", time.perf_counter() - t0)
        return after(**hook_args) if after else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = on_compile_start, on_compile_end


def _install_gc_callback(threshold_s: float) -> None:
    started: dict[int, float] = {}

    def on_gc(phase, info):
        generation = info.get("generation", -1)
        if phase == "start":
            started[generation] = time.perf_counter()
        elif generation in started:
            seconds = time.perf_counter() - started.pop(generation)
            if seconds >= threshold_s:
                _emit("gc", f"gen{generation}", seconds)

    on_gc.microturn_stall_log = True
    gc.callbacks.append(on_gc)


def install() -> str:
    if not config.value(config.LOG_STALLS):
        return "stall log off"
    threshold_s = config.value(config.STALL_LOG_GC_MS) / 1e3  # before anything is installed: a bad value changes nothing
    # Idempotent: the plugin may be registered twice in one process.
    if not any(getattr(cb, "microturn_stall_log", False) for cb in gc.callbacks):
        _install_compile_hooks()
        _install_gc_callback(threshold_s)
    return "stall log on"
