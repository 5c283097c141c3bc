"""Asyncio client for the /microturn API: `MicroTurnClient` opens sessions, `MicroTurnSession` streams them.

A `MicroTurnSession` keeps at most one append in flight (appends queue on a lock) and, in `stream()`, paces
appends on a real-time clock: micro-turn k is sent at `start + k * period_s` (default 200 ms), or as soon as
the previous one returns if that is later (the turn is then recorded as late). Every turn's timing is kept
in `session.turns`. Server errors raise typed exceptions (`SessionBusyError` for 409, ...; the table is
sglang_microturn/protocol.py, the server's too).

Stdlib only (HTTP/1.1 over asyncio streams, one keep-alive connection per session), so it runs anywhere the
server's users run, without SGLang.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from sglang_microturn import protocol


class MicroTurnHTTPError(Exception):
    """An error response from the server. Each subclass is one error `name` of sglang_microturn.protocol and
    has that name's HTTP `status`."""

    name: str = protocol.SERVER_ERROR
    status: int = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.status = protocol.status_of(cls.name)

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class BadRequestError(MicroTurnHTTPError):
    name = protocol.BAD_REQUEST


class UnauthorizedError(MicroTurnHTTPError):
    name = protocol.UNAUTHORIZED


class SessionNotFoundError(MicroTurnHTTPError):
    name = protocol.SESSION_NOT_FOUND


class SessionBusyError(MicroTurnHTTPError):
    name = protocol.SESSION_BUSY


class SessionGoneError(MicroTurnHTTPError):
    name = protocol.SESSION_GONE


class LengthMismatchError(MicroTurnHTTPError):
    name = protocol.LENGTH_MISMATCH


class OverBudgetError(MicroTurnHTTPError):
    name = protocol.OVER_BUDGET  # every 429: the KV budget or admission (over_capacity)


class ServerError(MicroTurnHTTPError):
    name = protocol.SERVER_ERROR


_ERRORS = {c.name: c for c in (BadRequestError, UnauthorizedError, SessionNotFoundError, SessionBusyError,
                               SessionGoneError, LengthMismatchError, OverBudgetError, ServerError)}


def error_for(status: int, message: str) -> MicroTurnHTTPError:
    return _ERRORS.get(protocol.name_of(status), ServerError)(status, message)


class HTTPConnection:
    """One keep-alive HTTP/1.1 connection sending JSON requests, reconnecting when the server closed it."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"base_url must be http://host:port, got {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.api_key, self.timeout_s = api_key, timeout_s
        self._reader = self._writer = None

    async def request(self, method: str, path: str, body: dict | None = None) -> dict:
        payload = b"" if body is None else json.dumps(body).encode()
        headers = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Connection: keep-alive",
                   f"Content-Length: {len(payload)}", "Content-Type: application/json"]
        if self.api_key:
            headers.append(f"Authorization: Bearer {self.api_key}")
        raw = ("\r\n".join(headers) + "\r\n\r\n").encode() + payload
        for attempt in (0, 1):  # a keep-alive connection the server closed is retried once on a fresh one
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            try:
                self._writer.write(raw)
                await self._writer.drain()
                status, data = await asyncio.wait_for(self._read_response(), self.timeout_s)
                break
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt:
                    raise
        out = json.loads(data or b"null")
        if status >= 400:
            message = out.get("error", {}).get("message") if isinstance(out, dict) else None
            raise error_for(status, message or str(out))
        return out

    async def _read_response(self) -> tuple[int, bytes]:
        reader = self._reader  # close() from another task drops self._reader; this read then just fails
        status_line = await reader.readuntil(b"\r\n")
        status = int(status_line.split()[1])
        length, close = 0, False
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode().partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        data = await reader.readexactly(length)
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        """Close the connection; a request still running on the server sees a client disconnect."""
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


@dataclass
class TurnRecord:
    index: int
    input_ids: list[int]
    output_ids: list[int]
    committed_length: int
    due: float  # when pacing wanted it sent (time.monotonic)
    sent: float
    done: float
    server: dict  # server timestamps (unix seconds): received, first_token, done
    output_logprobs: list[float] | None = None  # the sampled tokens' logprobs, when appended with return_logprob

    @property
    def latency_ms(self) -> float:
        return (self.done - self.sent) * 1e3

    @property
    def late_ms(self) -> float:
        """How much later than its slot on the real-time clock this micro-turn was sent."""
        return max(0.0, (self.sent - self.due) * 1e3)


@dataclass
class MicroTurnSession:
    client: MicroTurnClient
    session_id: str
    period_s: float = 0.2
    turns: list[TurnRecord] = field(default_factory=list)

    def __post_init__(self):
        self._conn = HTTPConnection(self.client.base_url, self.client.api_key, self.client.timeout_s)
        self._lock = asyncio.Lock()

    async def append(self, input_ids: list[int], output_budget: int | None = None, *,
                     return_logprob: bool = False, expected_length: int | None = None,
                     due: float | None = None) -> dict:
        """One micro-turn; waits for the previous one (never two in flight). Returns the server's reply.
        `expected_length`: fail with LengthMismatchError unless the session has exactly this many tokens."""
        body = {"session_id": self.session_id, "input_ids": list(input_ids), "return_logprob": return_logprob}
        if output_budget is not None:
            body["output_budget"] = output_budget
        if expected_length is not None:
            body["expected_length"] = expected_length
        async with self._lock:
            sent = time.monotonic()
            reply = await self._conn.request("POST", "/microturn/append", body)
            done = time.monotonic()
        self.turns.append(TurnRecord(len(self.turns), list(input_ids), reply["output_ids"], reply["committed_length"],
                                     sent if due is None else due, sent, done, reply["timestamps"],
                                     reply.get("output_logprobs")))
        return reply

    async def stream(self, chunks: Iterable[list[int]], output_budget: int | None = None) -> AsyncIterator[dict]:
        """Append each chunk on its real-time slot (`period_s` apart); yields each reply."""
        start = time.monotonic()
        for k, chunk in enumerate(chunks):
            due = start + k * self.period_s
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            yield await self.append(chunk, output_budget, due=due)

    async def status(self, tokens: bool = False) -> dict:
        async with self._lock:  # one request at a time on the session's connection
            return await self._conn.request("GET", f"/microturn/sessions/{self.session_id}" + ("?tokens=1" if tokens else ""))

    async def close(self) -> dict:
        async with self._lock:
            try:
                return await self._conn.request("POST", "/microturn/close", {"session_id": self.session_id})
            finally:
                self._conn.close()


class MicroTurnClient:
    def __init__(self, base_url: str = "http://127.0.0.1:30000", api_key: str | None = None, timeout_s: float = 60.0):
        self.base_url, self.api_key, self.timeout_s = base_url, api_key, timeout_s
        self._control = HTTPConnection(base_url, api_key, timeout_s)
        self._control_lock = asyncio.Lock()  # one keep-alive connection: concurrent opens take turns on it

    async def open(self, output_budget: int = 8, stop_ids: Iterable[int] = (), idle_timeout: float | None = None,
                   temperature: float = 0.0, period_s: float = 0.2, ignore_eos: bool = False,
                   seed: int | None = None) -> MicroTurnSession:
        body = {"output_budget": output_budget, "stop_ids": list(stop_ids), "temperature": temperature,
                "ignore_eos": ignore_eos}
        if idle_timeout is not None:
            body["idle_timeout"] = idle_timeout
        if seed is not None:
            body["seed"] = seed
        async with self._control_lock:
            reply = await self._control.request("POST", "/microturn/open", body)
        return MicroTurnSession(self, reply["session_id"], period_s)

    def close(self) -> None:
        self._control.close()
