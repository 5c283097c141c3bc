"""Patch 0006: while the engine stays idle, the scheduler's idle housekeeping runs once per idle period (and
then at most every IDLE_HOUSEKEEPING_INTERVAL_S), not on every pass of the spinning loop.

The scenario calls SGLang's real `Scheduler.on_idle` on a stand-in scheduler that counts what the method does.
It runs against the installed, patched SGLang and against SGLang as shipped (tests/rigs/pristine_sglang.py),
where every pass runs the housekeeping: that run proves the test can fail.
"""

import time
from collections import Counter
from types import MethodType, SimpleNamespace

from pristine_sglang import run_on_pristine_sglang

from sglang_microturn.patchset import patching


class IdleScheduler:
    """What `on_idle` touches, each call counted."""

    enable_unified_memory = False
    enable_hisparse = False

    def __init__(self):
        self.calls = Counter()
        self.forward_ct = 0
        count = self.count
        self.invariant_checker = SimpleNamespace(
            _check_all_pools=lambda stats: count("pool check") or (False, []),
            _report_leak=lambda *a: count("leak"), _check_req_pool=lambda: count("req pool check"),
            _check_tree_cache=lambda: count("tree check"))
        self.pool_stats_observer = SimpleNamespace(get_pool_stats=lambda: None)
        self.metrics_reporter = SimpleNamespace(_maybe_log_idle_metrics=lambda: count("idle metrics"))
        self.kv_events_publisher = SimpleNamespace(publish_kv_events=lambda: count("kv events"))
        self.new_token_ratio_tracker = SimpleNamespace(reset=lambda: count("ratio reset"))

    def count(self, what: str) -> None:
        self.calls[what] += 1

    def maybe_send_health_check_signal(self):
        self.count("health flush")

    def is_fully_idle(self):
        return True

    def publish_load_snapshot(self, force=False):
        self.count("publish forced" if force else "publish")

    def maybe_sleep_on_idle(self):
        self.count("sleep")


def idle_scenario() -> dict:
    """100 idle passes, a batch, 100 more passes, then one pass after the refresh interval."""
    from sglang.srt.managers import scheduler as scheduler_module

    scheduler = scheduler_module.Scheduler
    on_idle = scheduler.on_idle
    s = IdleScheduler()
    if hasattr(scheduler, "_run_idle_housekeeping"):  # the patch's helper, also SGLang's real code
        s._run_idle_housekeeping = MethodType(scheduler._run_idle_housekeeping, s)
    phases = {}
    for _ in range(100):
        on_idle(s)
    phases["first idle period"] = dict(s.calls)
    s.calls.clear()
    s.forward_ct += 1  # a batch ran: the engine turns idle again after it
    for _ in range(100):
        on_idle(s)
    phases["after a batch"] = dict(s.calls)
    s.calls.clear()
    time.sleep(getattr(scheduler_module, "IDLE_HOUSEKEEPING_INTERVAL_S", 0.05) + 0.01)
    on_idle(s)
    phases["after the interval"] = dict(s.calls)
    return phases


EVERY_PASS = {"health flush", "idle metrics", "ratio reset", "sleep"}
HOUSEKEEPING = {"pool check", "req pool check", "tree check", "kv events", "publish forced"}


def test_patched_scheduler_runs_housekeeping_once_per_idle_period(sglang_ctx):
    assert patching.unapplied() == [], "run `sglang-microturn patch apply` (tests/run.sh does)"
    phases = idle_scenario()
    for name in ("first idle period", "after a batch"):
        assert phases[name] == {**{k: 100 for k in EVERY_PASS}, **{k: 1 for k in HOUSEKEEPING}}, name
    assert phases["after the interval"] == {k: 1 for k in EVERY_PASS | HOUSEKEEPING}


def test_pristine_scheduler_runs_housekeeping_on_every_pass():
    phases = run_on_pristine_sglang("test_idle_housekeeping_patch", "idle_scenario")
    assert phases["first idle period"] == {k: 100 for k in EVERY_PASS | HOUSEKEEPING}
