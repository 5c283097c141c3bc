"""Admission by real-time capacity: refuse a new session (429 + Retry-After) rather than let every live session
miss its deadlines.

Capacity depends on everything users vary (chunk sizes, share of speaking turns, session lengths, the model,
the card), so it is not one number to configure but something to watch: the guard keeps the latency of the
last `MICROTURN_ADMIT_WINDOW_S` seconds of turns as fractions of their deadlines, and refuses an open while
the 99th percentile of that window is above `MICROTURN_ADMIT_P99_FRACTION` (default 0.75: p99 over 150 ms
of a 200 ms deadline, the capacity rule of benchmarks/realtime_capacity.py). That leaves headroom for the
sessions already admitted; a server that recovers admits again within a window. `MICROTURN_MAX_LIVE_SESSIONS`
adds a fixed ceiling for operators who measured their own capacity (0 = none). Appends of admitted sessions
are never refused by this guard: a live conversation is not cut off, new ones wait.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from sglang_microturn import config


@dataclass(frozen=True)
class AdmissionSettings:
    p99_fraction: float = 0.75  # refuse opens while recent p99 latency / deadline is above this (0 = off)
    window_s: float = 2.0  # how much recent history the p99 looks at
    max_live_sessions: int = 0  # fixed ceiling of open sessions (0 = none)
    retry_after_s: int = 2  # what the 429 tells the client to wait


def settings_from_env() -> AdmissionSettings:
    """The settings MICROTURN_ADMIT_P99_FRACTION, MICROTURN_ADMIT_WINDOW_S and MICROTURN_MAX_LIVE_SESSIONS
    give (sglang_microturn.config; SettingError on a bad value)."""
    return AdmissionSettings(p99_fraction=config.value(config.ADMIT_P99_FRACTION),
                             window_s=config.value(config.ADMIT_WINDOW_S),
                             max_live_sessions=config.value(config.MAX_LIVE_SESSIONS))


class AdmissionRefused(Exception):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


class AdmissionGuard:
    """Recent turns' latency/deadline ratios (time-ordered deque, pruned to the window) and the open rule.
    `observe` is O(1) amortised on the per-turn path; `check_open` sorts the window, on the rarer opens."""

    def __init__(self, settings: AdmissionSettings):
        self.settings = settings
        self._recent: deque[tuple[float, float]] = deque()  # (finished at, latency / deadline)

    def forget(self) -> None:
        """Drop the recent history (after the server's own warm-up, whose bursts say nothing of live load)."""
        self._recent.clear()

    def observe(self, now: float, latency_s: float, deadline_s: float) -> None:
        if self.settings.p99_fraction > 0:
            self._recent.append((now, latency_s / deadline_s))
            self._prune(now)

    def _prune(self, now: float) -> None:
        horizon = now - self.settings.window_s
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()

    def recent_p99(self, now: float) -> float | None:
        self._prune(now)
        if not self._recent:
            return None
        ratios = sorted(r for _, r in self._recent)
        return ratios[min(len(ratios) - 1, math.ceil(0.99 * len(ratios)) - 1)]

    def check_open(self, now: float, live_sessions: int) -> None:
        s = self.settings
        if s.max_live_sessions and live_sessions >= s.max_live_sessions:
            raise AdmissionRefused(f"the server holds its maximum of {s.max_live_sessions} live sessions "
                                   "(MICROTURN_MAX_LIVE_SESSIONS); retry later", s.retry_after_s)
        p99 = self.recent_p99(now) if s.p99_fraction > 0 else None
        if p99 is not None and p99 > s.p99_fraction:
            raise AdmissionRefused(
                f"the server is at its real-time capacity: p99 latency of the last {s.window_s:g} s of micro-turns "
                f"is {p99:.0%} of their deadlines, above {s.p99_fraction:.0%} (MICROTURN_ADMIT_P99_FRACTION); "
                "a new session would make live ones miss; retry later", s.retry_after_s)
