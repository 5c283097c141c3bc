"""Deadline accounting per session and the admission guard that refuses opens past real-time capacity."""

import pytest

from sglang_microturn.server.realtime_admission import AdmissionGuard, AdmissionRefused, AdmissionSettings
from sglang_microturn.server.realtime_deadlines import DeadlineStats, DuplexMetrics


def test_stats_count_misses_lateness_and_jitter():
    stats = DeadlineStats(deadline_s=0.2)
    assert stats.record(0.05) == (0.0, None)
    late, change = stats.record(0.25)
    assert late == pytest.approx(0.05) and change == pytest.approx(0.2)
    assert stats.record(0.2)[0] == 0.0  # exactly on time is in time
    assert stats.record(0.5)[0] == pytest.approx(0.3)
    d = stats.describe()
    assert (d["turns"], d["misses"], d["deadline_ms"]) == (4, 2, 200.0)
    assert d["lateness_ms_mean"] == pytest.approx(175.0) and d["lateness_ms_max"] == pytest.approx(300.0)
    j = 0.0
    for change in (0.2, 0.05, 0.3):  # RFC 3550: J += (|D| - J) / 16
        j += (change - j) / 16
    assert d["jitter_ms"] == pytest.approx(j * 1e3)


def test_steady_latency_has_no_jitter():
    stats = DeadlineStats(deadline_s=0.2)
    for _ in range(10):
        stats.record(0.04)
    assert stats.describe()["jitter_ms"] == 0.0 and stats.misses == 0


def test_metrics_disabled_create_nothing():
    metrics = DuplexMetrics(enabled=False)
    metrics.observe(0.3, 0.1, 0.2)
    assert metrics._series is None


def test_metrics_enabled_count_turns_and_misses():
    prometheus_client = pytest.importorskip("prometheus_client")
    metrics = DuplexMetrics(enabled=True)
    metrics.observe(0.05, 0.0, None)
    metrics.observe(0.3, 0.1, 0.25)
    registry = prometheus_client.REGISTRY
    assert registry.get_sample_value("microturn_turns_total") == 2
    assert registry.get_sample_value("microturn_deadline_misses_total") == 1
    assert registry.get_sample_value("microturn_turn_lateness_seconds_count") == 1
    assert registry.get_sample_value("microturn_turn_latency_seconds_bucket", {"le": "0.05"}) == 1


def test_guard_admits_while_recent_p99_is_under_the_fraction():
    guard = AdmissionGuard(AdmissionSettings(p99_fraction=0.75, window_s=2.0))
    guard.check_open(0.0, live_sessions=10)  # no history: admit
    for i in range(100):
        guard.observe(1.0 + i / 100, 0.1, 0.2)  # 50% of the deadline
    guard.check_open(2.0, live_sessions=10)


def test_guard_refuses_at_capacity_then_recovers_after_the_window():
    guard = AdmissionGuard(AdmissionSettings(p99_fraction=0.75, window_s=2.0, retry_after_s=3))
    for i in range(100):
        guard.observe(1.0 + i / 100, 0.19 if i % 10 == 0 else 0.05, 0.2)  # 10% of turns at 95%
    with pytest.raises(AdmissionRefused) as refused:
        guard.check_open(2.0, live_sessions=10)
    assert refused.value.retry_after_s == 3 and "95%" in refused.value.message
    assert len(guard._recent) == 100  # a refusal changes nothing
    guard.check_open(4.5, live_sessions=10)  # the slow turns left the window


def test_fixed_ceiling():
    guard = AdmissionGuard(AdmissionSettings(max_live_sessions=4))
    guard.check_open(0.0, live_sessions=3)
    with pytest.raises(AdmissionRefused, match="maximum of 4 live sessions"):
        guard.check_open(0.0, live_sessions=4)


def test_guard_off_keeps_no_history():
    guard = AdmissionGuard(AdmissionSettings(p99_fraction=0.0))
    guard.observe(0.0, 5.0, 0.2)
    guard.check_open(0.0, live_sessions=1000)
    assert not guard._recent
