"""Per micro-turn deadline accounting: misses, lateness and jitter of each session, and the server's totals.

A micro-turn's deadline is its session's `deadline_ms` (open option; default `MICROTURN_DEADLINE_MS`, 200:
the micro-turn period) after the HTTP process received the append: the output must be back before the next
micro-turn is due. The server sees only its own part of the latency (receive to response), so its miss count
is a lower bound of what a client on the other side of a network sees; benchmarks report both.

`DeadlineStats` lives in each session (shown by GET /microturn/sessions/<id> under `deadline`);
`DuplexMetrics` exports the same figures through SGLang's Prometheus endpoint when the server runs with
`--enable-metrics` (SGLang sets up the multi-process collector; metrics made in the HTTP process join it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Latency buckets (seconds) around a 200 ms micro-turn: fine below the deadline, coarse past it.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.5, 1.0, 2.0)
LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


@dataclass
class DeadlineStats:
    """One session's turns against its deadline. Jitter is RFC 3550's estimator over consecutive turn
    latencies (J += (|L_k - L_k-1| - J) / 16): how unevenly its outputs arrive, in the units users hear."""

    deadline_s: float
    turns: int = 0
    misses: int = 0
    lateness_total_s: float = 0.0
    lateness_max_s: float = 0.0
    jitter_s: float = 0.0
    _last_latency_s: float | None = field(default=None, repr=False)

    def record(self, latency_s: float) -> tuple[float, float | None]:
        """Count one turn; returns (its lateness, 0 when in time; |latency change| since the session's previous
        turn, None for its first)."""
        self.turns += 1
        late = max(0.0, latency_s - self.deadline_s)
        if late > 0:
            self.misses += 1
            self.lateness_total_s += late
            self.lateness_max_s = max(self.lateness_max_s, late)
        change = None if self._last_latency_s is None else abs(latency_s - self._last_latency_s)
        if change is not None:
            self.jitter_s += (change - self.jitter_s) / 16
        self._last_latency_s = latency_s
        return late, change

    def describe(self) -> dict:
        return {
            "deadline_ms": self.deadline_s * 1e3,
            "turns": self.turns,
            "misses": self.misses,
            "lateness_ms_mean": self.lateness_total_s / self.misses * 1e3 if self.misses else 0.0,
            "lateness_ms_max": self.lateness_max_s * 1e3,
            "jitter_ms": self.jitter_s * 1e3,
        }


class DuplexMetrics:
    """Server-wide Prometheus series (created on first use, after SGLang has set up its collector):
    microturn_turns_total, microturn_deadline_misses_total, microturn_turn_latency_seconds,
    microturn_turn_lateness_seconds (missed turns only), microturn_turn_jitter_seconds (per-turn change of
    latency within a session)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._series = None

    def _make(self):
        from prometheus_client import Counter, Histogram

        return (
            Counter("microturn_turns_total", "Micro-turn appends that finished"),
            Counter("microturn_deadline_misses_total", "Micro-turns whose output came after their deadline"),
            Histogram("microturn_turn_latency_seconds", "Append received to output ready", buckets=LATENCY_BUCKETS),
            Histogram("microturn_turn_lateness_seconds", "How late a missed micro-turn was",
                      buckets=LATENESS_BUCKETS),
            Histogram("microturn_turn_jitter_seconds", "|latency change| between consecutive turns of a session",
                      buckets=LATENESS_BUCKETS),
        )

    def observe(self, latency_s: float, lateness_s: float, latency_change_s: float | None) -> None:
        if not self.enabled:
            return
        if self._series is None:
            self._series = self._make()
        turns, misses, latency, lateness, jitter = self._series
        turns.inc()
        latency.observe(latency_s)
        if lateness_s > 0:
            misses.inc()
            lateness.observe(lateness_s)
        if latency_change_s is not None:
            jitter.observe(latency_change_s)
