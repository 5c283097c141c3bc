"""Micro-turn sessions as the HTTP process sees them: state, the committed sequence, admission control.

`SessionRegistry` lives in the HTTP server process beside SGLang's tokenizer manager. It owns, per session,
the committed token sequence (what every acknowledged append added, inputs and outputs), the in-flight flag
(one append at a time), and the session's share of the KV budget. SGLang's scheduler owns the KV itself; the
registry only changes a session's sequence from the scheduler's own verdict on an append (finished: commit;
aborted: nothing changed), so the two never disagree.

Every method is O(1) or O(chunk) (the sweep: O(what expires)): nothing here grows with session length except
the stored sequence, and nothing on the append path grows with the number of sessions.
"""

from __future__ import annotations

import enum
import heapq
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from sglang_microturn import protocol
from sglang_microturn.server.realtime_deadlines import DeadlineStats


def shown(text: str, limit: int = 64) -> str:
    """`text` as an error message may quote it: whole up to `limit` characters, else its head and its length
    (a 1 MB session id or field name is not echoed back)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class MicroTurnError(Exception):
    """An API error: its `name` (sglang_microturn.protocol, which maps names to HTTP statuses) and a message
    naming what was wrong."""

    name = protocol.BAD_REQUEST

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(MicroTurnError):
    name = protocol.BAD_REQUEST


INSTANCE_TAG_BYTES = 4
SESSION_ID_CHARS = 2 * (INSTANCE_TAG_BYTES + 16)  # hex: the instance tag, then 128 random bits


def is_minted_id(session_id: str) -> bool:
    """Whether `session_id` has the shape of an id some registry minted (tag + random, lowercase hex)."""
    return len(session_id) == SESSION_ID_CHARS and all(c in "0123456789abcdef" for c in session_id)


class SessionNotFound(MicroTurnError):
    name = protocol.SESSION_NOT_FOUND


class SessionBusy(MicroTurnError):
    name = protocol.SESSION_BUSY


class LengthMismatch(MicroTurnError):
    """The append's `expected_length` precondition failed: the client's view of the session is stale."""

    name = protocol.LENGTH_MISMATCH


class SessionGone(MicroTurnError):
    name = protocol.SESSION_GONE


class OverBudget(MicroTurnError):
    name = protocol.OVER_BUDGET


class TurnAborted(MicroTurnError):
    """SGLang aborted a turn for a reason of its own (running timeout, out of memory, an operator's abort): the
    session rolled back, a retry of the same append is safe."""

    name = protocol.TURN_ABORTED


class PayloadTooLarge(MicroTurnError):
    name = protocol.PAYLOAD_TOO_LARGE


class ServerError(MicroTurnError):
    name = protocol.SERVER_ERROR


class OverCapacity(MicroTurnError):
    """A new session would take the server past what it serves in time (realtime_admission)."""

    name = protocol.OVER_CAPACITY

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"
    EXPIRED = "expired"  # idle longer than its timeout: its KV was freed


@dataclass(frozen=True)
class SessionOptions:
    output_budget: int = 8  # max output tokens per micro-turn (an append may override; 0 = listen only)
    stop_ids: tuple[int, ...] = ()
    idle_timeout_s: float | None = None
    temperature: float = 0.0
    ignore_eos: bool = False  # generate the whole output budget even past the model's EOS (benchmarks)
    # Sampling seed (temperature > 0): the sampled token depends only on (seed, position, probabilities), so
    # a seeded session replays the same tokens whatever it shares batches with (SGLang patch 0005).
    seed: int | None = None
    # A micro-turn's output is due this long after its append arrived (realtime_deadlines).
    deadline_s: float = 0.2


@dataclass
class SessionRecord:
    """One session as the HTTP process keeps it, owned by the registry from `open` until `grace_s` after it
    closes or expires; after that only its tombstone (id -> state) is left, so a late call still gets 410."""

    session_id: str
    options: SessionOptions
    tokens: list[int] = field(default_factory=list)  # the committed sequence
    state: SessionState = SessionState.OPEN
    in_flight_reserve: int = 0  # KV tokens reserved by the running append (0 = none running)
    running_rid: str | None = None  # SGLang's request id of the running append (cancel stops it)
    appends: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    last_activity_unix: float = field(default_factory=time.time)
    deadline: DeadlineStats = field(init=False)
    last_output: list[int] = field(default_factory=list)  # the last committed turn's output ids
    front_end: object = None  # server/layout_turns.FrontEnd once a micro-turn came as audio / text

    def __post_init__(self):
        self.deadline = DeadlineStats(self.options.deadline_s)

    @property
    def in_flight(self) -> bool:
        return self.in_flight_reserve > 0

    def touch(self) -> None:
        self.last_activity = time.monotonic()
        self.last_activity_unix = time.time()

    def idle_deadline(self) -> float | None:
        """When the session expires if nothing touches it (monotonic seconds), None: never."""
        timeout = self.options.idle_timeout_s
        return None if timeout is None else self.last_activity + timeout

    def describe(self, with_tokens: bool = False) -> dict:
        out = {
            "session_id": self.session_id,
            "state": self.state.value,
            "length": len(self.tokens),
            "appends": self.appends,
            "in_flight": self.in_flight,
            "last_activity": self.last_activity_unix,
            "deadline": self.deadline.describe(),
        }
        if with_tokens:
            out["tokens"] = list(self.tokens)
        return out


MAX_TOMBSTONES = 1 << 20  # ~100 bytes each; past this the oldest go (a call for one then gets 404, not 410)


class SessionRegistry:
    """All micro-turn sessions of one server, the KV budget they share (in tokens) and the session cap.

    A session's KV footprint is its committed length plus, while an append runs, that append's input and
    output budget. `open` reserves nothing: it refuses a session when one micro-turn of headroom (a full chunk
    plus the session's output budget) is not free now, or when `max_sessions` are open (each idle streaming
    session holds one row of SGLang's req_to_token_pool; the cap keeps rows free for plain requests).

    Expiry and clean-up are O(what expires): `_expiry` is a heap of (deadline, id) pushed once at open; an
    append moves a session's deadline without touching the heap (the per-append path stays O(chunk)), and the
    sweep re-pushes an entry whose session was active since, so each session is re-examined at most once per
    idle timeout. Closed and expired records wait `grace_s` in `_retired` (time order) and are then replaced by
    a tombstone.
    """

    def __init__(self, kv_budget_tokens: int, vocab_size: int, max_chunk_tokens: int, bos_id: int | None,
                 max_sessions: int | None = None, grace_s: float = 600.0):
        self.kv_budget_tokens = kv_budget_tokens
        self.vocab_size = vocab_size
        self.max_chunk_tokens = max_chunk_tokens
        self.bos_id = bos_id
        self.max_sessions = max_sessions  # None: no cap
        self.grace_s = grace_s
        self.sessions: dict[str, SessionRecord] = {}  # open, and retired within their grace period
        self.tombstones: OrderedDict[str, SessionState] = OrderedDict()  # retired past grace: id -> final state
        self._expiry: list[tuple[float, str]] = []  # heap of (idle deadline when pushed, id), open sessions
        self._retired: deque[tuple[float, str]] = deque()  # (retired at, id), time order
        self._used = 0  # sum over open sessions of footprint(); kept incrementally
        self.open_sessions = 0
        self.sweep_interval_s = 0.0  # the sweep is O(expired): it may run on every call
        # Every id this registry mints starts with this tag, so an id minted elsewhere is told apart from one
        # never minted: a session of another worker behind the gateway (routed here once its own worker
        # died) or of this server before a restart is gone (410: open a new one), not unknown (404).
        self.instance = secrets.token_hex(INSTANCE_TAG_BYTES)

    # -- budget --

    def _footprint(self, s: SessionRecord) -> int:
        return len(s.tokens) + s.in_flight_reserve

    @staticmethod
    def _turn_reserve(n_input: int, n_output: int) -> int:
        return max(1, n_input + n_output)

    def used_tokens(self) -> int:
        return self._used

    def _admit(self, extra: int, what: str) -> None:
        if extra > self.kv_budget_tokens:  # no retry can help: say so (400), not "retry later" (429)
            raise BadRequest(f"{what} needs {extra} KV tokens, more than the whole {self.kv_budget_tokens}-token "
                             "session budget (MICROTURN_SESSION_KV_TOKENS); ask for a smaller output_budget")
        if self._used + extra > self.kv_budget_tokens:
            raise OverBudget(
                f"{what} needs {extra} KV tokens but only {self.kv_budget_tokens - self._used} of the "
                f"{self.kv_budget_tokens}-token session budget are free; close idle sessions or retry later"
            )

    # -- lifecycle --

    def open(self, options: SessionOptions) -> SessionRecord:
        """A new open session (refused with 429 past the session cap or when one turn's headroom is not free
        now; nothing is reserved)."""
        if self.max_sessions is not None and self.open_sessions >= self.max_sessions:
            raise OverCapacity(f"the server holds its maximum of {self.max_sessions} open sessions "
                               "(MICROTURN_MAX_SESSIONS; each holds a row of SGLang's request pool); close idle "
                               "sessions or retry later", retry_after_s=2)
        headroom = self._turn_reserve(self.max_chunk_tokens, options.output_budget)
        self._admit(headroom, "opening a session")
        session = SessionRecord(self.instance + secrets.token_hex(16), options)  # 128 random bits: unguessable
        self.sessions[session.session_id] = session
        self.open_sessions += 1
        deadline = session.idle_deadline()
        if deadline is not None:
            heapq.heappush(self._expiry, (deadline, session.session_id))
        return session

    def knows(self, session_id: str) -> bool:
        """Whether `session_id` is (or was) one of ours: O(1)."""
        return session_id in self.sessions or session_id in self.tombstones

    def get(self, session_id: str) -> SessionRecord:
        session = self.sessions.get(session_id)
        if session is None:
            state = self.tombstones.get(session_id)
            if state is not None:
                raise SessionGone(f"session {session_id} is {state.value}")
            if is_minted_id(session_id) and not session_id.startswith(self.instance):
                raise SessionGone(f"session {session_id} was opened on another server instance (a worker behind "
                                  "the gateway that stopped, or this server before a restart) and is gone; open "
                                  "a new session")
            raise SessionNotFound(f"unknown session {shown(repr(session_id))}")
        return session

    def get_open(self, session_id: str) -> SessionRecord:
        """`get`, and 410 unless the session is still open."""
        session = self.get(session_id)
        if session.state is not SessionState.OPEN:
            raise SessionGone(f"session {session_id} is {session.state.value}")
        return session

    def begin_append(self, session_id: str, input_ids: list[int], output_budget: int | None = None,
                     expected_length: int | None = None) -> tuple[SessionRecord, int]:
        """Validate and reserve one append; the caller must end it with `commit` or `abandon`. Returns the
        session and this append's output budget (`output_budget`, or the session's default when None).

        `expected_length` (optional) is the committed length the client believes the session has. A client
        that lost a response (e.g. dropped its connection) sends it on the next append: a late-arriving copy
        of the lost append then fails this check instead of silently adding a turn the client never saw."""
        session = self.get_open(session_id)
        if session.in_flight:
            raise SessionBusy(f"session {session_id} already has an append in flight; send the next micro-turn "
                              "after the previous one's response")
        if expected_length is not None and expected_length != len(session.tokens):
            raise LengthMismatch(f"session {session_id} has {len(session.tokens)} committed tokens, not the "
                                 f"expected {expected_length}; re-read it with GET /microturn/sessions/{session_id}")
        budget = session.options.output_budget if output_budget is None else output_budget
        self._validate_chunk(session, input_ids, budget)
        reserve = self._turn_reserve(len(input_ids), budget)
        self._admit(reserve, f"appending {len(input_ids)} input + {budget} output tokens")
        session.in_flight_reserve = reserve
        self._used += reserve
        session.touch()
        return session, budget

    def commit(self, session: SessionRecord, input_ids: list[int], output_ids: list[int]) -> None:
        """The scheduler finished the append: both blocks are now part of the session's sequence."""
        self._end(session)
        session.tokens.extend(input_ids)
        session.tokens.extend(output_ids)
        session.last_output = list(output_ids)
        session.appends += 1
        if session.state is SessionState.OPEN:
            self._used += len(input_ids) + len(output_ids)

    def abandon(self, session: SessionRecord) -> None:
        """The append was aborted or failed: the session's sequence is unchanged."""
        self._end(session)

    def _end(self, session: SessionRecord) -> None:
        if session.state is SessionState.OPEN:
            self._used -= session.in_flight_reserve
        session.in_flight_reserve = 0
        session.touch()

    def close(self, session_id: str) -> tuple[SessionRecord | None, bool]:
        """Close (idempotent). Returns the session (None once only its tombstone is left) and whether this
        call closed it."""
        if session_id in self.tombstones:
            return None, False
        session = self.get(session_id)
        if session.state is not SessionState.OPEN:
            return session, False
        self._retire(session, SessionState.CLOSED)
        return session, True

    def lose(self, session: SessionRecord) -> bool:
        """SGLang no longer has `session` (it closed or reaped it): retire it as expired, releasing its budget.
        Returns whether this call retired it."""
        if session.state is not SessionState.OPEN:
            return False
        self._retire(session, SessionState.EXPIRED)
        return True

    def _retire(self, session: SessionRecord, state: SessionState, now: float | None = None) -> None:
        self._used -= self._footprint(session)
        self.open_sessions -= 1
        session.state = state
        self._retired.append((time.monotonic() if now is None else now, session.session_id))

    def sweep_idle(self, now: float | None = None) -> list[SessionRecord]:
        """Expire open sessions idle past their timeout and return them (the caller closes them in SGLang,
        which frees their KV); drop retired records past their grace period. O(what expires or is dropped)."""
        now = time.monotonic() if now is None else now
        expired = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, session_id = heapq.heappop(heap)
            session = self.sessions.get(session_id)
            if session is None or session.state is not SessionState.OPEN:
                continue
            if session.in_flight:  # its deadline starts again when the turn ends: look again one timeout later
                heapq.heappush(heap, (now + session.options.idle_timeout_s, session_id))
                continue
            deadline = session.idle_deadline()
            if deadline > now:  # active since it was pushed: look again at its new deadline
                heapq.heappush(heap, (deadline, session_id))
                continue
            self._retire(session, SessionState.EXPIRED, now)
            expired.append(session)
        if len(heap) > 2 * self.open_sessions + 1024:  # entries of sessions closed early: rebuild, amortised O(1)
            self._expiry = [(s.idle_deadline(), sid) for sid, s in self.sessions.items()
                            if s.state is SessionState.OPEN and s.options.idle_timeout_s is not None]
            heapq.heapify(self._expiry)
        retired = self._retired
        while retired and now - retired[0][0] >= self.grace_s:
            _, session_id = retired.popleft()
            session = self.sessions.pop(session_id, None)
            if session is not None:
                self.tombstones[session_id] = session.state
                if len(self.tombstones) > MAX_TOMBSTONES:
                    self.tombstones.popitem(last=False)
        return expired

    # -- validation --

    def _validate_chunk(self, session: SessionRecord, input_ids: list[int], output_budget: int) -> None:
        if not input_ids:
            raise BadRequest("input_ids is empty: a micro-turn appends at least one input token")
        if len(input_ids) > self.max_chunk_tokens:
            raise BadRequest(f"chunk of {len(input_ids)} tokens exceeds the {self.max_chunk_tokens}-token limit "
                             "per micro-turn (MICROTURN_MAX_CHUNK_TOKENS)")
        if min(input_ids) < 0 or max(input_ids) >= self.vocab_size:  # C loops: this runs on every append
            bad = next(t for t in input_ids if not 0 <= t < self.vocab_size)
            raise BadRequest(f"input id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if session.tokens and self.bos_id is not None and input_ids[0] == self.bos_id:
            raise BadRequest(f"chunk starts with the BOS id {self.bos_id}, which SGLang drops from appended turns; "
                             "send BOS only in a session's first chunk")
        if output_budget < 0:
            raise BadRequest(f"output budget {output_budget} is negative (0 = listen only)")
