"""The `microturn` warm-up: which shapes it runs, that it leaves no session open, and that SGLang runs it."""

import asyncio
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sglang_microturn.server import realtime_warmup
from sglang_microturn.server.realtime_warmup import BUDGETS, ENV_SESSIONS, NAME, group_sizes, run, warmup_plan


def _class(n: int) -> str:
    """Triton's specialisation class of an integer argument."""
    return "one" if n == 1 else "multiple of 16" if n % 16 == 0 else "other"


def test_plan_covers_every_group_size_class_with_every_budget():
    plan = warmup_plan(64)
    sizes = {r.sessions for r in plan}
    assert sizes >= {1, 2, 3, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64}
    assert max(sizes) == 64
    for n in sizes:
        assert {r.budget for r in plan if r.sessions == n} == set(BUDGETS), f"group of {n}"
    for budget in BUDGETS:
        assert {_class(r.chunk) for r in plan if r.budget == budget} == {"one", "multiple of 16", "other"}


def test_group_sizes_stop_at_the_setting():
    assert group_sizes(1) == [1]
    assert group_sizes(20) == [1, 2, 3, 15, 16, 17, 20]


class FakeAPI:
    def __init__(self, fail_at: int | None = None, max_sessions: int | None = None):
        self.open_ids, self.closed, self.appends, self.fail_at = [], [], [], fail_at
        self.in_flight = self.max_in_flight = 0
        self.admission = SimpleNamespace(forget=lambda: self.appends.append("forgot"))
        self.registry = SimpleNamespace(max_sessions=max_sessions)

    async def open(self, body):
        sid = f"s{len(self.open_ids)}"
        self.open_ids.append(sid)
        return {"session_id": sid}

    async def append(self, body):
        if self.fail_at is not None and len(self.appends) == self.fail_at:
            raise RuntimeError("server error")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0)
        self.in_flight -= 1
        self.appends.append(body)
        return {"output_ids": []}

    async def close(self, body):
        self.closed.append(body["session_id"])


def test_run_drives_each_round_concurrently_and_closes_every_session():
    api, plan = FakeAPI(), warmup_plan(20)
    assert asyncio.run(run(api, plan, vocab=300)) == sum(r.sessions for r in plan) == len(api.appends)
    assert api.max_in_flight == 20 and sorted(api.closed) == sorted(api.open_ids) and len(api.open_ids) == 20
    assert all(100 <= t < 300 for body in api.appends for t in body["input_ids"])
    first = [b for b in api.appends if len(b["input_ids"]) == plan[0].chunk][: plan[0].sessions]
    assert all(b["output_budget"] == plan[0].budget for b in first)


def test_a_failing_append_still_closes_every_session():
    api = FakeAPI(fail_at=5)
    with pytest.raises(RuntimeError):
        asyncio.run(run(api, warmup_plan(8), vocab=300))
    assert sorted(api.closed) == sorted(api.open_ids)


@pytest.mark.parametrize("cap, opened", [(None, 4), (3, 3)])
def test_install_registers_with_sglangs_warmups(monkeypatch, cap, opened):
    from sglang.srt.entrypoints import warmup

    monkeypatch.setenv(ENV_SESSIONS, "4")
    api = FakeAPI(max_sessions=cap)  # the warm-up never opens past the session cap (MICROTURN_MAX_SESSIONS)
    assert "up to 4 sessions" in realtime_warmup.install(lambda: api)
    flushes = []

    async def flush_cache(timeout_s=None):
        flushes.append(len(api.closed))
        return SimpleNamespace(success=True)

    async def freeze_gc():
        flushes.append("frozen")

    tm = SimpleNamespace(model_config=SimpleNamespace(vocab_size=500), flush_cache=flush_cache, freeze_gc=freeze_gc)
    asyncio.run(warmup.execute_warmups("null", [NAME], tm))
    assert api.appends.pop() == "forgot"  # the admission guard forgets the warm-up's turns
    assert len(api.appends) == sum(r.sessions for r in warmup_plan(opened)) and len(api.closed) == opened
    assert flushes == [opened, "frozen"]  # the radix cache is flushed after every session closed, then heaps frozen


def test_bad_setting_registers_nothing():
    code = ("import os; os.environ['%s'] = 'many'\n"
            "from sglang.srt.entrypoints import warmup\n"
            "from sglang_microturn.server import realtime_warmup\n"
            "try:\n    realtime_warmup.install(lambda: None)\nexcept ValueError as e:\n    print(e)\n"
            "print(%r in warmup._warmup_registry)" % (ENV_SESSIONS, NAME))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "False" and f"{ENV_SESSIONS}='many'" in lines[0], out.stderr[-2000:]
