"""Every MICROTURN_* setting: its name, default, what it allows, and the one parser that reads it (stdlib only).

A setting is read where it takes effect, at call time (a server process reads its own environment when the
plugin installs a piece; tests set variables and call again), always through `value(NAME)`: one parser per
variable, one error for every bad value. `SettingError` names the variable, the bad value and what is allowed;
it is a ValueError, and the plugin turns it into a one-line SystemExit (SGLang's plugin loader only logs
exceptions). README's settings table lists the same names (a test keeps the two in step).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass


class SettingError(ValueError):
    """A MICROTURN_* variable holds a value its setting does not allow."""

    def __init__(self, name: str, raw: str, allowed: str):
        super().__init__(f"{name}={raw!r}: want {allowed}")
        self.name, self.raw, self.allowed = name, raw, allowed


@dataclass(frozen=True)
class Setting:
    name: str
    default: object  # the value when the variable is unset (None: the reader decides, e.g. "from the pool")
    parse: Callable[[str], object]  # raw text -> value; raises ValueError on a value it does not allow
    allowed: str  # what the error says is allowed
    doc: str  # one line: what it changes


def _number(lo: float, hi: float, integer: bool = False, lo_open: bool = False) -> Callable[[str], float]:
    def parse(raw: str):
        value = float(raw)  # ValueError on non-numbers
        if math.isnan(value) or value < lo or value > hi or (lo_open and value == lo):
            raise ValueError(raw)
        if integer:
            if value != int(value):
                raise ValueError(raw)
            return int(value)
        return value

    return parse


def _switch(raw: str) -> bool:
    raw = raw.strip().lower()
    if raw not in ("", "0", "1", "false", "true"):
        raise ValueError(raw)
    return raw in ("1", "true")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        raw = raw.strip().lower()
        if raw not in choices:
            raise ValueError(raw)
        return raw

    return parse


def _path(raw: str) -> str:
    if not raw:
        raise ValueError(raw)
    return raw


_SWITCH = "0 or 1 (also false / true)"

# The HTTP API and its sessions (server/api_handlers.py, server/session_registry.py)
SESSION_KV_TOKENS = "MICROTURN_SESSION_KV_TOKENS"
SESSION_KV_FRACTION = "MICROTURN_SESSION_KV_FRACTION"
MAX_CHUNK_TOKENS = "MICROTURN_MAX_CHUNK_TOKENS"
MAX_SESSIONS = "MICROTURN_MAX_SESSIONS"
IDLE_TIMEOUT_S = "MICROTURN_IDLE_TIMEOUT_S"
CLOSED_GRACE_S = "MICROTURN_CLOSED_GRACE_S"
MAX_BODY_BYTES = "MICROTURN_MAX_BODY_BYTES"
DEADLINE_MS = "MICROTURN_DEADLINE_MS"
# Real-time admission, scheduling and warm-up (server/realtime_*.py, server/scheduler_cohort.py)
ADMIT_P99_FRACTION = "MICROTURN_ADMIT_P99_FRACTION"
ADMIT_WINDOW_S = "MICROTURN_ADMIT_WINDOW_S"
MAX_LIVE_SESSIONS = "MICROTURN_MAX_LIVE_SESSIONS"
WARMUP_SESSIONS = "MICROTURN_WARMUP_SESSIONS"
COHORT_WAIT_MS = "MICROTURN_COHORT_WAIT_MS"
# Stall log (server/stall_log.py)
LOG_STALLS = "MICROTURN_LOG_STALLS"
STALL_LOG_GC_MS = "MICROTURN_STALL_LOG_GC_MS"
# Kernels: MoE dispatch (server/moe_dispatch.py), aligned attention (server + alignment/aligned_forward.py)
MOE_GEMV_MAX_TOKENS = "MICROTURN_MOE_GEMV_MAX_TOKENS"
MOE_ALIGNED = "MICROTURN_MOE_ALIGNED"
ALIGNMENT = "MICROTURN_ALIGNMENT"
ALIGNED_ATTENTION = "MICROTURN_ALIGNED_ATTENTION"
ATTN_SPLIT = "MICROTURN_ATTN_SPLIT"
ATTN_BLOCK_N = "MICROTURN_ATTN_BLOCK_N"
ATTN_BLOCK_M = "MICROTURN_ATTN_BLOCK_M"
ATTN_WORKSPACE_MB = "MICROTURN_ATTN_WORKSPACE_MB"
# Files (model/checkpoints.py, patchset/patching.py)
CACHE = "MICROTURN_CACHE"
PATCHES_DIR = "MICROTURN_PATCHES_DIR"

MAX_DEADLINE_MS = 60_000
MAX_IDLE_TIMEOUT_S = 7 * 24 * 3600.0  # a week: longer is a leak, not a timeout

SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting(SESSION_KV_TOKENS, None, _number(0, 2**62, integer=True), "a whole number of tokens >= 0",
            "KV budget of all micro-turn sessions, in tokens (default: MICROTURN_SESSION_KV_FRACTION of the pool)"),
    Setting(SESSION_KV_FRACTION, 0.9, _number(0, 1, lo_open=True), "a fraction in (0, 1]",
            "the sessions' KV budget as a fraction of SGLang's KV pool, when MICROTURN_SESSION_KV_TOKENS is unset"),
    Setting(MAX_CHUNK_TOKENS, 512, _number(1, 2**31, integer=True), "a whole number of tokens >= 1",
            "largest input block of one micro-turn; a longer chunk is refused with 400"),
    Setting(MAX_SESSIONS, None, _number(1, 1 << 20, integer=True), "a whole number of sessions in [1, 1048576]",
            "most open micro-turn sessions (default: SGLang's req_to_token_pool rows minus an eighth, at least "
            "1, kept for plain requests; never more than rows - 1)"),
    Setting(IDLE_TIMEOUT_S, 300.0, _number(0, MAX_IDLE_TIMEOUT_S), f"seconds in [0, {MAX_IDLE_TIMEOUT_S:g}] (0 = never)",
            "a session idle this long expires (410) unless it opens with idle_timeout (0 there = never)"),
    Setting(CLOSED_GRACE_S, 600.0, _number(0, MAX_IDLE_TIMEOUT_S), f"seconds in [0, {MAX_IDLE_TIMEOUT_S:g}]",
            "how long a closed or expired session's record stays readable before only its 410 tombstone is left"),
    Setting(MAX_BODY_BYTES, 1 << 20, _number(1024, 1 << 30, integer=True), "a whole number of bytes in [1024, 2**30]",
            "largest /microturn request body; a larger one is refused with 413"),
    Setting(DEADLINE_MS, 200.0, _number(0, MAX_DEADLINE_MS, lo_open=True),
            f"milliseconds in (0, {MAX_DEADLINE_MS}]", "a session's micro-turn deadline unless it opens with deadline_ms"),
    Setting(ADMIT_P99_FRACTION, 0.75, _number(0, 100), "a number in [0, 100]",
            "refuse opens (429) while recent p99 latency / deadline is above this (0 = off)"),
    Setting(ADMIT_WINDOW_S, 2.0, _number(0.1, 3600), "seconds in [0.1, 3600]",
            "how much recent history the admission p99 looks at"),
    Setting(MAX_LIVE_SESSIONS, 0, _number(0, 1 << 20, integer=True), "a whole number of sessions in [0, 1048576]",
            "fixed ceiling of open sessions (0 = none)"),
    Setting(WARMUP_SESSIONS, 64, _number(0, 4096, integer=True), "a session count in [0, 4096] (0 = off)",
            "largest group of concurrent sessions the `microturn` server warm-up drives (0 = no warm-up)"),
    Setting(COHORT_WAIT_MS, 10.0, _number(0, 1000), "milliseconds in [0, 1000] (0 = off)",
            "how long appends may wait behind a running decode batch to be prefilled together (0 = off)"),
    Setting(LOG_STALLS, False, _switch, _SWITCH, "every server process logs its Triton compiles and long GCs"),
    Setting(STALL_LOG_GC_MS, 20.0, _number(0, math.inf), "a number of milliseconds >= 0",
            "the stall log lists garbage collections from this long up"),
    Setting(MOE_GEMV_MAX_TOKENS, 16, _number(0, 2**31, integer=True), "a whole number of tokens >= 0 (0 = off)",
            "MoE calls with M <= this (and M x top-k <= E/2) use the gather+GEMV kernels (0 = never)"),
    Setting(MOE_ALIGNED, False, _switch, _SWITCH, "every MoE call uses the GEMV kernels (bitwise prefill = decode)"),
    Setting(ALIGNMENT, False, _switch, _SWITCH,
            "MicroTurnForCausalLM runs the aligned forward (set by `serve --alignment-mode`)"),
    Setting(ALIGNED_ATTENTION, "", _choice("", "triton"), "triton, or empty",
            "triton: `--attention-backend triton` is served by the aligned backend too"),
    Setting(ATTN_SPLIT, 256, _number(1, 2**31, integer=True), "a whole number of keys >= 1",
            "aligned attention: keys per left-aligned split (server and trainer must match)"),
    Setting(ATTN_BLOCK_N, 64, _number(1, 2**31, integer=True), "a whole number >= 1",
            "aligned attention: key tile (server and trainer must match)"),
    Setting(ATTN_BLOCK_M, 16, _number(1, 2**31, integer=True), "a whole number >= 1",
            "aligned attention: query tile (server and trainer must match)"),
    Setting(ATTN_WORKSPACE_MB, 512, _number(1, 2**31, integer=True), "a whole number of MiB >= 1",
            "aligned attention: cap on one extend launch's fp32 split partials"),
    Setting(CACHE, None, _path, "a folder path",
            "where default checkpoints are built (default: $XDG_CACHE_HOME or ~/.cache, /sglang-microturn)"),
    Setting(PATCHES_DIR, None, _path, "a folder path",
            "read the patch-set from this folder instead of the one inside the package"),
)}


def value(name: str):
    """The setting `name` from the environment (its default when unset); SettingError on a bad value."""
    setting = SETTINGS[name]
    raw = os.environ.get(name)
    if raw is None:
        return setting.default
    try:
        return setting.parse(raw)
    except (ValueError, OverflowError):
        raise SettingError(name, raw, setting.allowed) from None
