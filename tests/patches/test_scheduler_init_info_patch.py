"""Patch 0009: the scheduler's init handshake reports its req_to_token_pool rows, and the /microturn session
cap derived from them keeps rows free for plain requests.

SGLang's real `Scheduler.get_init_info` runs over a real `ReqToTokenPool`; the cap is then exercised on the
real session classes (tests/rigs/session_rig.py): idle streaming sessions keep their row between turns, so
without a cap 8 two-token sessions on an 8-row pool leave no row for any new request (issue 15). On SGLang as
shipped (tests/rigs/pristine_sglang.py) the handshake has no row count.
"""

from types import SimpleNamespace

from pristine_sglang import run_on_pristine_sglang

ROWS = 8


def init_info_scenario() -> dict:
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    pool = ReqToTokenPool(ROWS, 64, device="cpu", enable_memory_saver=False)
    scheduler = SimpleNamespace(max_total_num_tokens=4096, max_req_input_len=60, startup_time=0.0,
                                req_to_token_pool=pool)
    info = Scheduler.get_init_info(scheduler)
    return {"rows": info.get("req_to_token_pool_size")}


def test_the_handshake_reports_the_pools_rows(sglang_ctx):
    assert init_info_scenario() == {"rows": ROWS}


def test_sglang_as_shipped_reports_no_rows():
    assert run_on_pristine_sglang("test_scheduler_init_info_patch", "init_info_scenario") == {"rows": None}


def test_the_session_cap_keeps_rows_free_for_plain_requests(sglang_ctx, monkeypatch):
    from session_rig import SessionRig

    from sglang_microturn.server.api_handlers import session_cap
    from sglang_microturn.server.session_registry import OverCapacity, SessionOptions, SessionRegistry

    monkeypatch.delenv("MICROTURN_MAX_SESSIONS", raising=False)
    rig = SessionRig(kv_tokens=4096, rows=ROWS)
    cap = session_cap(init_info_scenario()["rows"])
    assert cap == ROWS - 1  # an eighth of 8 rows, at least one, kept for plain requests
    registry = SessionRegistry(kv_budget_tokens=4000, vocab_size=1000, max_chunk_tokens=8, bos_id=None,
                               max_sessions=cap)
    for _ in range(cap):  # each session's first turn takes a row it keeps while idle
        session = registry.open(SessionOptions())
        assert rig.open(session.session_id)
        rig.run_turn(session.session_id, [1, 2], [])
    free_rows, free_kv = rig.req_to_token_pool.available_size(), rig.allocator.available_size()
    try:
        registry.open(SessionOptions())
        raise AssertionError("the cap let one session too many open")
    except OverCapacity as e:
        assert "MICROTURN_MAX_SESSIONS" in e.message
    assert registry.open_sessions == cap and rig.req_to_token_pool.available_size() == free_rows == 1
    plain = SimpleNamespace(req_pool_idx=None, kv_committed_len=0, is_dllm=lambda: False)
    assert rig.req_to_token_pool.alloc([plain]) is not None  # a plain request still gets a row
    assert free_kv == 4096 - 2 * cap  # the KV budget alone would never have noticed


def test_an_explicit_cap_never_takes_the_last_row(monkeypatch):
    from sglang_microturn.server.api_handlers import session_cap

    monkeypatch.setenv("MICROTURN_MAX_SESSIONS", "100")
    assert session_cap(ROWS) == ROWS - 1 and session_cap(None) == 100
    monkeypatch.setenv("MICROTURN_MAX_SESSIONS", "3")
    assert session_cap(ROWS) == 3
    monkeypatch.delenv("MICROTURN_MAX_SESSIONS")
    assert session_cap(64) == 56 and session_cap(2) == 1 and session_cap(None) is None
