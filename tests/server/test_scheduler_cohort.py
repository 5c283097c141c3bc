"""Cohort prefill: when SGLang's scheduler forms a prefill now and when it lets the decode batch step first."""

import functools
import inspect
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from sglang_microturn.config import SettingError
from sglang_microturn.server import scheduler_cohort
from sglang_microturn.server.scheduler_cohort import ENV_WAIT_MS, TARGET, CohortPolicy, make_hook, read_wait_ms

NOW = 1000.0
POLICY = CohortPolicy(max_wait_s=0.010)


class Batch:
    def __init__(self, rows: int, prefill_only: bool = False):
        self.rows, self.is_prefill_only = rows, prefill_only

    def is_empty(self) -> bool:
        return self.rows == 0


def scheduler(*waited_s: float, chunked=None):
    """A scheduler whose waiting queue holds appends that entered it waited_s seconds before NOW (oldest first)."""
    queue = [SimpleNamespace(time_stats=SimpleNamespace(wait_queue_entry_time=NOW - w)) for w in waited_s]
    return SimpleNamespace(waiting_queue=queue, chunked_req=chunked, prefill_delayer=None)


def test_holds_young_appends_behind_a_running_decode_batch():
    assert POLICY.holds_prefill(scheduler(0.004, 0.001), Batch(8), NOW)


def test_releases_the_cohort_once_the_oldest_append_waited_the_bound():
    assert not POLICY.holds_prefill(scheduler(0.0101, 0.001), Batch(8), NOW)
    assert not POLICY.holds_prefill(scheduler(0.050), Batch(8), NOW)


@pytest.mark.parametrize("case", ["no decode", "prefill-only batch", "chunked prefill", "empty queue", "off"])
def test_never_holds_when_nothing_else_would_run(case):
    sched, batch, policy = scheduler(0.001), Batch(8), POLICY
    if case == "no decode":
        batch = Batch(0)
    elif case == "prefill-only batch":
        batch = Batch(3, prefill_only=True)
    elif case == "chunked prefill":
        sched = scheduler(0.001, chunked=object())
    elif case == "empty queue":
        sched = scheduler()
    else:
        policy = CohortPolicy(max_wait_s=0.0)
    assert not policy.holds_prefill(sched, batch, NOW)


def test_hook_on_sglangs_real_method():
    """Through SGLang's own get_new_batch_prefill: a hold returns a plan with no batch (so the scheduler
    decodes) and the running batch unchanged; a release runs SGLang's method, which forms the prefill."""
    from sglang.srt.managers.schedule_batch import NextBatchPlan
    from sglang.srt.managers.scheduler import Scheduler

    assert list(inspect.signature(Scheduler.get_new_batch_prefill).parameters) == ["self", "running_batch"]
    hooked = functools.partial(make_hook(CohortPolicy(max_wait_s=3600.0)), Scheduler.get_new_batch_prefill)
    running, formed = Batch(4), object()

    class Sched(SimpleNamespace):
        def _get_new_batch_prefill_raw(self, prefill_delayer_single_pass, running_batch):
            return formed, running_batch

    def waited(seconds):
        entered = time.perf_counter() - seconds
        return Sched(waiting_queue=[SimpleNamespace(time_stats=SimpleNamespace(wait_queue_entry_time=entered))],
                     chunked_req=None, prefill_delayer=None)

    plan = hooked(waited(0.0), running)
    assert isinstance(plan, NextBatchPlan) and plan.batch_to_run is None and plan.running_batch is running
    assert hooked(waited(7200.0), running).batch_to_run is formed


def test_setting_default_and_bad_values_refused(monkeypatch):
    monkeypatch.delenv(ENV_WAIT_MS, raising=False)
    assert read_wait_ms() == scheduler_cohort.DEFAULT_WAIT_MS
    monkeypatch.setenv(ENV_WAIT_MS, "0")
    assert scheduler_cohort.install() == "cohort prefill off"
    for bad in ("ten", "-1", "nan", "5000"):
        monkeypatch.setenv(ENV_WAIT_MS, bad)
        with pytest.raises(SettingError, match=f"{ENV_WAIT_MS}='{bad}'"):
            scheduler_cohort.install()


def test_bad_value_registers_nothing():
    code = ("import os; os.environ['%s'] = 'x'\n"
            "from sglang.srt.plugins.hook_registry import HookRegistry\n"
            "from sglang_microturn.server import scheduler_cohort\n"
            "try:\n    scheduler_cohort.install()\nexcept ValueError:\n    pass\n"
            "print(%r in HookRegistry._hooks)" % (ENV_WAIT_MS, TARGET))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
