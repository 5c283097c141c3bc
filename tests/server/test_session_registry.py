"""The session registry on its own (no HTTP, no SGLang): the committed sequence, one append at a time, the
shared KV budget, idle expiry, and the protocol names its errors carry."""

import pytest

from sglang_microturn import protocol
from sglang_microturn.server.session_registry import (
    BadRequest,
    LengthMismatch,
    OverBudget,
    OverCapacity,
    SessionBusy,
    SessionGone,
    SessionNotFound,
    SessionOptions,
    SessionRegistry,
    SessionState,
)


@pytest.fixture
def registry():
    return SessionRegistry(kv_budget_tokens=100, vocab_size=50, max_chunk_tokens=8, bos_id=0)


def test_append_commits_input_and_output_and_uses_the_sessions_default_budget(registry):
    session = registry.open(SessionOptions(output_budget=3))
    assert registry.used_tokens() == 0
    same, budget = registry.begin_append(session.session_id, [0, 5, 6])
    assert same is session and budget == 3 and session.in_flight and registry.used_tokens() == 6
    registry.commit(session, [0, 5, 6], [7, 8])
    assert session.tokens == [0, 5, 6, 7, 8] and not session.in_flight and registry.used_tokens() == 5
    _, budget = registry.begin_append(session.session_id, [9], output_budget=0)  # listen only
    assert budget == 0
    registry.abandon(session)
    assert session.tokens == [0, 5, 6, 7, 8] and registry.used_tokens() == 5 and session.appends == 1


@pytest.mark.parametrize("ids, budget, error, message", [
    ([], None, BadRequest, "input_ids is empty"),
    (list(range(1, 10)), None, BadRequest, "exceeds the 8-token limit"),
    ([5, 50], None, BadRequest, "input id 50 is outside the vocabulary"),
    ([0, 5], None, BadRequest, "starts with the BOS id 0"),
    ([5], -1, BadRequest, "output budget -1 is negative"),
    ([5], 99, OverBudget, "needs 100 KV tokens"),
])
def test_a_refused_append_changes_nothing(registry, ids, budget, error, message):
    session = registry.open(SessionOptions())
    registry.begin_append(session.session_id, [0, 1])
    registry.commit(session, [0, 1], [])
    used = registry.used_tokens()
    with pytest.raises(error, match=message):
        registry.begin_append(session.session_id, ids, budget)
    assert session.tokens == [0, 1] and not session.in_flight and registry.used_tokens() == used


def test_one_append_at_a_time_and_the_expected_length_precondition(registry):
    sid = registry.open(SessionOptions()).session_id
    session, _ = registry.begin_append(sid, [1])
    with pytest.raises(SessionBusy):
        registry.begin_append(sid, [2])
    registry.commit(session, [1], [2])
    with pytest.raises(LengthMismatch, match="has 2 committed tokens, not the expected 1"):
        registry.begin_append(sid, [3], expected_length=1)
    registry.begin_append(sid, [3], expected_length=2)


def test_closed_and_expired_sessions_are_gone_and_free_their_budget(registry):
    closed = registry.open(SessionOptions())
    registry.begin_append(closed.session_id, [1, 2])
    registry.commit(closed, [1, 2], [3])
    assert registry.close(closed.session_id) == (closed, True)
    assert registry.close(closed.session_id) == (closed, False)  # idempotent
    idle = registry.open(SessionOptions(idle_timeout_s=5))
    assert registry.sweep_idle(now=idle.last_activity + 6) == [idle] and idle.state is SessionState.EXPIRED
    assert registry.used_tokens() == 0 and registry.open_sessions == 0
    for session in (closed, idle):
        with pytest.raises(SessionGone):
            registry.begin_append(session.session_id, [1])
    with pytest.raises(SessionNotFound):
        registry.get("nope")


def test_errors_carry_protocol_names_not_http_codes():
    for error, name in ((BadRequest, protocol.BAD_REQUEST), (SessionNotFound, protocol.SESSION_NOT_FOUND),
                        (SessionBusy, protocol.SESSION_BUSY), (SessionGone, protocol.SESSION_GONE),
                        (LengthMismatch, protocol.LENGTH_MISMATCH), (OverBudget, protocol.OVER_BUDGET)):
        assert error.name == name and not hasattr(error, "status")


def test_retired_sessions_are_dropped_after_their_grace_and_a_tombstone_keeps_the_410():
    registry = SessionRegistry(kv_budget_tokens=100, vocab_size=50, max_chunk_tokens=8, bos_id=0, grace_s=10)
    closed = registry.open(SessionOptions())
    registry.begin_append(closed.session_id, [1, 2])
    registry.commit(closed, [1, 2], [3])
    registry.close(closed.session_id)
    idle = registry.open(SessionOptions(idle_timeout_s=5))
    t0 = idle.last_activity
    assert registry.sweep_idle(now=t0 + 6) == [idle]
    assert registry.get(closed.session_id).tokens == [1, 2, 3]  # readable during the grace period
    registry.sweep_idle(now=t0 + 1e6)
    assert registry.sessions == {} and registry.knows(closed.session_id) and registry.knows(idle.session_id)
    for sid, state in ((closed.session_id, "closed"), (idle.session_id, "expired")):
        with pytest.raises(SessionGone, match=f"is {state}"):
            registry.get(sid)
        with pytest.raises(SessionGone):
            registry.begin_append(sid, [1])
        assert registry.close(sid) == (None, False)
    assert registry.used_tokens() == 0 and registry.open_sessions == 0


def test_the_sweep_is_o_expired_and_appends_never_touch_the_heap():
    registry = SessionRegistry(kv_budget_tokens=10**9, vocab_size=50, max_chunk_tokens=8, bos_id=None, grace_s=0)
    many = [registry.open(SessionOptions(idle_timeout_s=1000)) for _ in range(20_000)]
    short = registry.open(SessionOptions(idle_timeout_s=1))
    looked_at = []

    class Counting(dict):
        def get(self, key, default=None):
            looked_at.append(key)
            return super().get(key, default)

    registry.sessions = Counting(registry.sessions)
    heap_before = list(registry._expiry)
    for s in many[:100]:  # appends move deadlines without touching the heap
        registry.begin_append(s.session_id, [1])
        registry.commit(s, [1], [])
    assert registry._expiry == heap_before
    looked_at.clear()
    assert registry.sweep_idle(now=short.last_activity + 2) == [short]
    assert looked_at == [short.session_id]  # one expired session: one session looked at, not 20,001
    assert short.session_id not in registry.sessions and registry.knows(short.session_id)  # grace 0: tombstone


def test_an_active_or_in_flight_session_is_not_expired_at_its_first_deadline():
    registry = SessionRegistry(kv_budget_tokens=100, vocab_size=50, max_chunk_tokens=8, bos_id=None)
    active = registry.open(SessionOptions(idle_timeout_s=5))
    busy = registry.open(SessionOptions(idle_timeout_s=5))
    registry.begin_append(busy.session_id, [1])  # never ends in this test
    registry.begin_append(active.session_id, [1])
    registry.commit(active, [1], [])
    active.last_activity += 4  # it was active 4 s after it opened
    t = active.last_activity - 4
    assert registry.sweep_idle(now=t + 6) == []  # both re-pushed, neither expired
    assert registry.sweep_idle(now=t + 10) == [active] and busy.state is SessionState.OPEN
    registry.sweep_idle(now=t + 1000)
    assert busy.state is SessionState.OPEN  # an append in flight is never expired underneath


def test_the_session_cap_and_the_open_docstring():
    registry = SessionRegistry(kv_budget_tokens=100, vocab_size=50, max_chunk_tokens=8, bos_id=None, max_sessions=2)
    with pytest.raises(BadRequest, match="more than the whole 100-token session budget"):
        registry.open(SessionOptions(output_budget=200))
    a, _ = registry.open(SessionOptions()), registry.open(SessionOptions())
    with pytest.raises(OverCapacity, match="maximum of 2 open sessions"):
        registry.open(SessionOptions())
    assert registry.used_tokens() == 0  # open reserves nothing
    registry.close(a.session_id)
    registry.open(SessionOptions())


def test_a_lost_session_releases_its_budget_once():
    registry = SessionRegistry(kv_budget_tokens=100, vocab_size=50, max_chunk_tokens=8, bos_id=None)
    s = registry.open(SessionOptions())
    registry.begin_append(s.session_id, [1, 2])
    registry.commit(s, [1, 2], [3])
    assert registry.lose(s) and not registry.lose(s)
    assert s.state is SessionState.EXPIRED and registry.used_tokens() == 0 and registry.open_sessions == 0


def test_the_expiry_heap_does_not_keep_sessions_closed_long_before_their_deadline():
    registry = SessionRegistry(kv_budget_tokens=10**9, vocab_size=50, max_chunk_tokens=8, bos_id=None, grace_s=0)
    for _ in range(5000):  # a week-long timeout, closed at once
        registry.close(registry.open(SessionOptions(idle_timeout_s=604800)).session_id)
    keep = registry.open(SessionOptions(idle_timeout_s=604800))
    registry.sweep_idle()
    assert registry._expiry == [(keep.idle_deadline(), keep.session_id)] and registry.sessions == {keep.session_id: keep}
