"""Asyncio client for the /microturn API: `MicroTurnClient` opens sessions, `MicroTurnSession` streams them.

A `MicroTurnSession` keeps at most one append in flight (appends queue on a lock) and, in `stream()`, paces
appends on a real-time clock: micro-turn k is sent at `start + k * period_s` (default 200 ms), or as soon as
the previous one returns if that is later (the turn is then recorded as late). Every turn's timing is kept
in `session.turns`. Server errors raise typed exceptions (`SessionBusyError` for 409, ...; client/errors.py,
from the table in sglang_microturn/protocol.py that the server answers with).

Staying in sync with the server's sequence:
  * Every append carries `expected_length`, the committed length the session last saw, so the server applies
    it only on top of exactly that sequence (else 412). A copy of an append can therefore never apply twice.
  * A reply is accepted only if it follows from the append: its session, and committed_length = expected +
    input + output. The transport (client/connection.py, aiohttp) never hands a request an earlier request's
    reply; this check makes sure of it.
  * After a dropped connection the session waits until the server holds no append in flight and reads the
    sequence: if the lost copy committed, its turn is the reply (marked "recovered"); if not, the append is
    resent with the same expected_length (APPEND_ATTEMPTS sends in all). A copy stuck in the network that
    arrives after the resend committed meets 412 and applies nothing; a resend that meets 409 (a copy still
    runs) or 412 (one may have committed) makes the session look again.
  * An append that ends without an answer (timeout, cancellation, a connection lost for good, a reply that
    does not follow) leaves the session "unsynced": its next append first waits for the server to resolve that
    turn and re-reads the session. If the turn committed after all it is recorded in `turns` (recovered).
  * A 412 on a first attempt means someone else changed the session: the session re-reads its length, adopts
    it and raises LengthMismatchError with both lengths.

Through SGLang Model Gateway (docs/scale-out.md) nothing changes but the URL: every session sends a routing key
of its own (protocol.ROUTING_KEY_HEADER, random, fixed at open) on each call, which keeps it on the worker its
open reached, and once the gateway answers that it forwards no /microturn route (GatewayRouteError) the client
sends every call in its gateway form.

Runs without SGLang or torch; its one dependency is aiohttp (why: client/connection.py).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from sglang_microturn import protocol
from sglang_microturn.client.connection import HTTPConnection
from sglang_microturn.client.errors import (
    ConnectionLostError,
    GatewayRouteError,
    LengthMismatchError,
    MicroTurnClientError,
    OverBudgetError,
    MicroTurnHTTPError,
    ProtocolError,
    RequestTimeoutError,
    SessionBusyError,
)

# An append whose connection dropped is sent at most this many times in all (each with the same
# expected_length, so at most one of them applies).
APPEND_ATTEMPTS = 3
# Behind a gateway, an open refused with 429 (that worker is full) is sent this many times in all, each under a
# fresh routing key. The gateway assigns a new key to the least loaded worker and breaks ties at random, so
# between opens (no request in flight) a key lands on a full worker with odds (full workers / workers): with
# one of two full, 16 attempts all fail once in 65536 opens (4 failed about one open in 16 on the CI machine).
# A refusal costs one short request.
GATEWAY_OPEN_ATTEMPTS = 16
# How often a session polls the server while it waits for a lost append to commit or roll back.
SETTLE_POLL_S = 0.01


@dataclass
class TurnRecord:
    index: int
    input_ids: list[int]
    output_ids: list[int]
    committed_length: int
    due: float  # when pacing wanted it sent (time.monotonic)
    sent: float
    done: float
    server: dict  # server timestamps (unix seconds): received, first_token, done (None when recovered)
    output_logprobs: list[float] | None = None  # the sampled tokens' logprobs, when appended with return_logprob
    recovered: bool = False  # its reply was lost; the turn was read back from the session's sequence

    @property
    def latency_ms(self) -> float:
        return (self.done - self.sent) * 1e3

    @property
    def late_ms(self) -> float:
        """How much later than its slot on the real-time clock this micro-turn was sent."""
        return max(0.0, (self.sent - self.due) * 1e3)


@dataclass
class _LostTurn:
    """An append that ended without an answer: what it asked for, to recognise it in the server's sequence."""

    expected_length: int
    input_ids: list[int]
    due: float
    sent: float


@dataclass
class MicroTurnSession:
    """One open session. Owns nothing on the wire: its requests go through its client's connection pool, one
    at a time. `committed_length` is the server's committed length as the session last saw it (None: unknown,
    read before the next append)."""

    client: MicroTurnClient
    session_id: str
    routing_key: str | None = None  # sent on every call (protocol.ROUTING_KEY_HEADER): keeps it on one worker
    period_s: float = 0.2
    turns: list[TurnRecord] = field(default_factory=list)
    committed_length: int | None = None

    def __post_init__(self):
        self._lock = asyncio.Lock()
        self._lost: _LostTurn | None = None  # set while unsynced: the turn whose outcome is not known

    async def _call(self, call: str, body: dict):
        return await self.client.call(call, body, self.routing_key)

    async def append(self, input_ids: list[int], output_budget: int | None = None, *,
                     return_logprob: bool = False, expected_length: int | None = None,
                     due: float | None = None) -> dict:
        """One micro-turn; waits for the previous one (never two in flight). Returns the server's reply.
        Sends `expected_length` (default: the committed length this session last saw; pass it to assert your
        own view): LengthMismatchError unless the session has exactly that many tokens."""
        input_ids = list(input_ids)
        async with self._lock:
            if self._lost is not None or self.committed_length is None:
                await self._resync()
            expected = self.committed_length if expected_length is None else expected_length
            body = {"session_id": self.session_id, "input_ids": input_ids, "return_logprob": return_logprob,
                    "expected_length": expected}
            if output_budget is not None:
                body["output_budget"] = output_budget
            sent = time.monotonic()
            due = sent if due is None else due
            turn = _LostTurn(expected, input_ids, due, sent)
            try:
                reply = await self._send_append(body, turn)
                self._check_reply(reply, expected, input_ids)
            except LengthMismatchError as e:
                await self._adopt_length(e, expected)
                raise
            except MicroTurnHTTPError:
                raise  # refused, nothing changed (unless a copy was lost first: _send_append noted it)
            except BaseException:  # timed out, cancelled, lost for good, or a reply not to this append
                self._lost = turn
                raise
            done = time.monotonic()
            self.committed_length, self._lost = reply["committed_length"], None
            self.turns.append(TurnRecord(len(self.turns), input_ids, reply["output_ids"], reply["committed_length"],
                                         due, sent, done, reply["timestamps"], reply.get("output_logprobs"),
                                         bool(reply.get("recovered"))))
        return reply

    async def _send_append(self, body: dict, turn: _LostTurn) -> dict:
        """POST the append; after a dropped connection, resend it with the same expected_length (at most
        APPEND_ATTEMPTS sends in all), resolving any earlier copy first: see the module docstring. Leaves
        `self._lost` set if a copy was lost and nothing showed what became of it."""
        for attempt in range(APPEND_ATTEMPTS):
            last = attempt == APPEND_ATTEMPTS - 1
            try:
                return await self._call("append", body)
            except ConnectionLostError:
                self._lost = turn
                if last:
                    raise
                refusal = None
            except (SessionBusyError, LengthMismatchError) as e:
                if attempt == 0:
                    raise  # no copy of ours is out there: another writer has the session
                refusal = e  # 409: an earlier copy may still run; 412: it may have committed
            # An earlier copy may have reached the server: let it commit or roll back, then look.
            state = await self._settled_state(tokens=True)
            reply = self._reply_from_state(state, turn.expected_length, turn.input_ids)
            if reply is not None:
                return reply
            if state["length"] != turn.expected_length:
                self._lost = None  # our copy is not in the sequence, and cannot apply to a longer one
                error = LengthMismatchError(412, f"session {self.session_id} has {state['length']} committed "
                                                 f"tokens, not the expected {turn.expected_length}, after a "
                                                 "dropped connection")
                error.committed_length = state["length"]
                raise error
            if last:
                raise refusal
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _reply_from_state(self, state: dict, expected: int, input_ids: list[int]) -> dict | None:
        """The reply of our lost append if the session's sequence shows it committed (its input right after
        the expected length; everything after that is its output: a session has one writer), else None."""
        tokens, n = state.get("tokens") or [], len(input_ids)
        if not n or len(tokens) < expected + n or tokens[expected: expected + n] != input_ids:
            return None
        return {"session_id": self.session_id, "output_ids": tokens[expected + n:], "committed_length": len(tokens),
                "server_length": len(tokens), "finish_reason": None, "recovered": True,
                "timestamps": {"received": None, "scheduled": None, "first_token": None, "done": None}}

    def _check_reply(self, reply, expected: int, input_ids: list[int]) -> None:
        """Accept only the reply to this append: our session, and the length it must have produced."""
        if not isinstance(reply, dict) or not isinstance(reply.get("output_ids"), list):
            raise ProtocolError(f"session {self.session_id}: an append reply without output_ids: {reply!r:.200}")
        if reply.get("session_id", self.session_id) != self.session_id:
            raise ProtocolError(f"session {self.session_id}: got the reply of session {reply['session_id']}")
        want = expected + len(input_ids) + len(reply["output_ids"])
        if reply.get("committed_length") != want:
            raise ProtocolError(f"session {self.session_id}: reply committed_length {reply.get('committed_length')} "
                                f"!= {want} (expected_length {expected} + {len(input_ids)} input + "
                                f"{len(reply['output_ids'])} output): not this append's reply")

    async def _settled_state(self, tokens: bool = False) -> dict:
        """GET the session once it has no append in flight (polls every SETTLE_POLL_S, for up to timeout_s)."""
        deadline = time.monotonic() + self.client.timeout_s
        while True:
            state = await self._get_state(tokens)
            if not state.get("in_flight"):
                return state
            if time.monotonic() > deadline:
                raise RequestTimeoutError(f"session {self.session_id} still has an append in flight after "
                                          f"{self.client.timeout_s} s (timeout_s)")
            await asyncio.sleep(SETTLE_POLL_S)

    async def _get_state(self, tokens: bool) -> dict:
        body = {"session_id": self.session_id, "tokens": tokens}
        try:
            return await self._call("status", body)
        except ConnectionLostError:  # reading changes nothing: once more on a fresh connection
            return await self._call("status", body)

    async def _resync(self) -> None:
        """Re-read the session after an append that ended without an answer (or for a session of unknown
        length); a lost turn that committed after all goes into `turns`, marked recovered."""
        lost = self._lost
        state = await self._settled_state(tokens=lost is not None)
        if lost is not None:
            reply = self._reply_from_state(state, lost.expected_length, lost.input_ids)
            if reply is not None:
                self.turns.append(TurnRecord(len(self.turns), lost.input_ids, reply["output_ids"], len(state["tokens"]),
                                             lost.due, lost.sent, time.monotonic(), reply["timestamps"],
                                             recovered=True))
        self.committed_length, self._lost = state["length"], None

    async def _adopt_length(self, error: LengthMismatchError, expected: int) -> None:
        """After a 412: re-read the session's length, adopt it, and say both on the error."""
        error.expected_length = expected
        if error.committed_length is None:
            try:
                error.committed_length = (await self._settled_state())["length"]
            except MicroTurnClientError:  # the 412 is the error to report; the next append re-reads
                self.committed_length = None
                return
        self.committed_length = error.committed_length

    async def stream(self, chunks: Iterable[list[int]], output_budget: int | None = None) -> AsyncIterator[dict]:
        """Append each chunk on its real-time slot (`period_s` apart); yields each reply."""
        start = time.monotonic()
        for k, chunk in enumerate(chunks):
            due = start + k * self.period_s
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            yield await self.append(chunk, output_budget, due=due)

    async def cancel(self) -> bool:
        """Barge-in: stop the running micro-turn (call it from another task while `append` waits); that append
        then returns what was generated, committed (finish_reason cancelled). False: nothing was running."""
        return bool((await self._call("cancel", {"session_id": self.session_id}))["cancelled"])

    async def status(self, tokens: bool = False) -> dict:
        """The session's state (GET /microturn/sessions/<id>); `tokens` adds the committed sequence."""
        async with self._lock:
            return await self._get_state(tokens)

    async def close(self) -> dict:
        """Close the session (idempotent on the server, so retried once after a dropped connection)."""
        body = {"session_id": self.session_id}
        async with self._lock:
            try:
                return await self._call("close", body)
            except ConnectionLostError:
                return await self._call("close", body)


class MicroTurnClient:
    """Opens sessions on the server at `base_url`. Owns one HTTPConnection (aiohttp's connection pool) from
    construction until `close()`; the sessions it opens send through it. Use `async with` or call
    `await client.close()`."""

    def __init__(self, base_url: str = "http://127.0.0.1:30000", api_key: str | None = None, timeout_s: float = 60.0):
        self.base_url, self.api_key, self.timeout_s = base_url, api_key, timeout_s
        self.connection = HTTPConnection(base_url, api_key, timeout_s)
        self.via_gateway = False  # set once the URL turns out to be SGLang Model Gateway

    async def call(self, call: str, body: dict, routing_key: str | None = None):
        """One API call (`call` of protocol.ROUTES) on its own route, or in its gateway form once the URL is
        known to be a gateway. A gateway's refusal of the route forwarded nothing, so the call is resent in
        the gateway form at once."""
        headers = {protocol.ROUTING_KEY_HEADER: routing_key} if routing_key else None
        if not self.via_gateway:
            try:
                return await self.connection.request(*protocol.direct_request(call, body), headers)
            except GatewayRouteError:
                self.via_gateway = True
        return await self.connection.request(*protocol.gateway_request(call, body), headers)

    async def open(self, output_budget: int = 8, stop_ids: Iterable[int] = (), idle_timeout: float | None = None,
                   temperature: float = 0.0, period_s: float = 0.2, ignore_eos: bool = False,
                   seed: int | None = None) -> MicroTurnSession:
        """Open a session. Never resent after a lost reply (that open may have opened one, which the server's idle
        timeout reclaims); behind a gateway, resent under a fresh routing key when a full worker refused it."""
        body = {"output_budget": output_budget, "stop_ids": list(stop_ids), "temperature": temperature,
                "ignore_eos": ignore_eos}
        if idle_timeout is not None:
            body["idle_timeout"] = idle_timeout
        if seed is not None:
            body["seed"] = seed
        for attempt in range(GATEWAY_OPEN_ATTEMPTS):
            routing_key = secrets.token_hex(16)  # chosen here: the gateway pins it to the worker this open reaches
            try:
                reply = await self.call("open", body, routing_key)
                break
            except OverBudgetError:
                # Refused, nothing opened. Behind a gateway another worker may have room: a fresh key is
                # assigned anew. A single server would refuse again.
                if not self.via_gateway or attempt == GATEWAY_OPEN_ATTEMPTS - 1:
                    raise
        if not isinstance(reply, dict) or not isinstance(reply.get("session_id"), str):
            raise ProtocolError(f"POST /microturn/open: a reply without a session_id: {reply!r:.200}")
        return MicroTurnSession(self, reply["session_id"], routing_key, period_s, committed_length=0)

    async def close(self) -> None:
        """Close the connection pool (sessions stay open on the server: close them first)."""
        await self.connection.close()

    async def __aenter__(self) -> MicroTurnClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
