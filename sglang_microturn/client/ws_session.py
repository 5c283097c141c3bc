"""One micro-turn session over WS /microturn/ws (the `websockets` library; events: sglang_microturn/protocol.py).

    async with await MicroTurnWebSocket.open("http://127.0.0.1:30000", output_budget=16) as ws:
        reply = await ws.append(input_ids)          # the HTTP append's reply: output_ids, committed_length, ...
        reply = await ws.append_input(pcm, "hi")    # or audio and text, encoded by the server: + output.text
    ...
    ws = await MicroTurnWebSocket.resume(url, session_id)   # after a dropped connection

Appends are sent one at a time, each with the committed length this session last saw as `expected_length`, so
an append resent after a dropped connection applies at most once (a LengthMismatchError then carries the
server's length). An `error` event raises the typed error of its HTTP status (client/errors.py), as the HTTP
client does. Every request carries an event_id and a reader task hands each server event to the request it
answers, so `cancel()` (barge-in) can go while an append waits. A dropped connection raises
ConnectionLostError; the session stays open on the server for its idle timeout.
"""

from __future__ import annotations

import array
import asyncio
import base64
import itertools
import json
import numbers
import sys
from typing import Any

import websockets

from sglang_microturn import protocol
from sglang_microturn.client.errors import ConnectionLostError, ProtocolError, RequestTimeoutError, error_for


def pcm_base64(pcm) -> str:
    """The wire form of a micro-turn's audio: base64 of little-endian int16 samples. `pcm`: those bytes, or
    mono samples (ints as int16, floats in [-1, 1] scaled by 32768 and clipped, as a microphone's are)."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(pcm)).decode("ascii")
    samples = array.array("h", (int(x) if isinstance(x, numbers.Integral)
                                else max(-32768, min(32767, round(float(x) * 32768))) for x in pcm))
    if sys.byteorder == "big":
        samples.byteswap()
    return base64.b64encode(samples.tobytes()).decode("ascii")


def ws_url(base_url: str) -> str:
    """The WebSocket URL of a server's base URL (http -> ws, https -> wss)."""
    scheme, _, rest = base_url.rstrip("/").partition("://")
    return {"http": "ws", "https": "wss"}.get(scheme, scheme) + "://" + rest + protocol.WS_PATH


class MicroTurnWebSocket:
    """A connection attached to one session. Not safe for concurrent appends: one micro-turn at a time."""

    def __init__(self, connection, session_id: str, committed_length: int, timeout_s: float):
        self.connection, self.session_id, self.committed_length = connection, session_id, committed_length
        self.timeout_s = timeout_s
        self._lock = asyncio.Lock()  # one micro-turn at a time; a cancel goes beside it
        self._pending: dict[str, asyncio.Future] = {}  # event_id -> the server event answering it
        self._ids = itertools.count()
        self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    @classmethod
    async def _connect(cls, base_url: str, api_key: str | None, timeout_s: float):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        try:
            return await websockets.connect(ws_url(base_url), additional_headers=headers, open_timeout=timeout_s)
        except websockets.InvalidStatus as e:
            status = e.response.status_code
            raise error_for(401 if status == 403 else status, f"WebSocket handshake refused ({status})") from e
        except (OSError, websockets.WebSocketException, asyncio.TimeoutError) as e:
            raise ConnectionLostError(f"cannot connect to {ws_url(base_url)}: {type(e).__name__}: {e}") from e

    @classmethod
    async def open(cls, base_url: str, *, api_key: str | None = None, timeout_s: float = 60.0,
                   **options: Any) -> MicroTurnWebSocket:
        """Connect and open a session with `options` (the HTTP open's fields: output_budget, stop_ids, ...)."""
        connection = await cls._connect(base_url, api_key, timeout_s)
        return await cls._attach(connection, {"type": protocol.WS_SESSION_UPDATE, "session": options},
                                 protocol.WS_SESSION_CREATED, timeout_s)

    @classmethod
    async def resume(cls, base_url: str, session_id: str, *, api_key: str | None = None,
                     timeout_s: float = 60.0) -> MicroTurnWebSocket:
        """Connect and attach an open session again (after a dropped connection)."""
        connection = await cls._connect(base_url, api_key, timeout_s)
        return await cls._attach(connection, {"type": protocol.WS_SESSION_RESUME, "session_id": session_id},
                                 protocol.WS_SESSION_RESUMED, timeout_s)

    @classmethod
    async def _attach(cls, connection, event: dict, expect: str, timeout_s: float) -> MicroTurnWebSocket:
        try:
            reply = await _exchange(connection, event, expect, timeout_s)
        except BaseException:
            await connection.close()
            raise
        session = reply["session"]
        return cls(connection, session["id"], session["committed_length"], timeout_s)

    async def append(self, input_ids: list[int], output_budget: int | None = None, *,
                     return_logprob: bool = False, expected_length: int | None = None) -> dict:
        """One micro-turn; returns the `response.done` event (the HTTP append's reply)."""
        fields: dict[str, Any] = {"input_ids": list(input_ids)}
        if output_budget is not None:
            fields["output_budget"] = output_budget
        return await self._append_event(fields, return_logprob, expected_length)

    async def append_input(self, pcm=None, text: str = "", *, return_logprob: bool = False,
                           expected_length: int | None = None) -> dict:
        """One micro-turn as audio and text, for the server to encode (no tokenizer here): `pcm` is the period's
        mono 16 kHz samples (int16, or floats in [-1, 1]), None for none. The reply adds `input_ids` (what the
        server built) and `output` ({text, yielded})."""
        given: dict[str, str] = {"text": text}
        if pcm is not None:
            given["audio"] = pcm_base64(pcm)
        return await self._append_event({"input": given}, return_logprob, expected_length)

    async def _append_event(self, fields: dict, return_logprob: bool, expected_length: int | None) -> dict:
        event = {"type": protocol.WS_INPUT_APPEND, **fields, "return_logprob": return_logprob,
                 "expected_length": self.committed_length if expected_length is None else expected_length}
        async with self._lock:
            reply = await self._request(event, protocol.WS_RESPONSE_DONE)
            self.committed_length = reply["committed_length"]
        return reply

    async def cancel(self) -> bool:
        """Barge-in: stop the running micro-turn (call it while an append awaits, from another task); that
        append then returns what was generated, committed (finish_reason cancelled). False: nothing ran."""
        reply = await self._request({"type": protocol.WS_RESPONSE_CANCEL}, protocol.WS_RESPONSE_CANCELLED)
        return bool(reply["cancelled"])

    async def close(self) -> dict:
        """Close the session on the server, then the connection."""
        try:
            async with self._lock:
                return await self._request({"type": protocol.WS_SESSION_CLOSE}, protocol.WS_SESSION_CLOSED)
        finally:
            await self.disconnect()

    async def disconnect(self) -> None:
        """Drop the connection and keep the session (resume it with `resume`)."""
        self._reader.cancel()
        self._fail_pending(ConnectionLostError("disconnected by this client"))
        await self.connection.close()

    async def _request(self, event: dict, expect: str) -> dict:
        """Send `event` with an event_id of its own; return the server event that answers it."""
        event_id = f"c{next(self._ids)}"
        future = self._pending[event_id] = asyncio.get_running_loop().create_future()
        try:
            await self.connection.send(json.dumps({**event, "event_id": event_id}))
            raw = await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError as e:
            raise RequestTimeoutError(f"no reply to {event['type']} within {self.timeout_s} s") from e
        except websockets.ConnectionClosed as e:
            raise ConnectionLostError(f"the connection closed before the reply to {event['type']}: {e}") from e
        finally:
            self._pending.pop(event_id, None)
        return _checked(raw, event, expect)

    async def _read_replies(self) -> None:
        """Hand each server event to the request it answers (`in_reply_to`); a lost connection or an event
        that answers nothing we asked fails every request waiting."""
        try:
            async for raw in self.connection:
                try:
                    key = json.loads(raw).get("in_reply_to")
                except (TypeError, ValueError, AttributeError):
                    key = None
                future = self._pending.get(key) if isinstance(key, str) else None
                if future is None:
                    self._fail_pending(ProtocolError(f"a server event that answers no request: {raw[:200]!r}"))
                elif not future.done():
                    future.set_result(raw)
            failure: Exception = ConnectionLostError("the server closed the connection")
        except websockets.ConnectionClosed as e:
            failure = ConnectionLostError(f"the connection closed: {e}")
        self._fail_pending(failure)

    def _fail_pending(self, error: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)

    async def __aenter__(self) -> MicroTurnWebSocket:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.disconnect()


async def _exchange(connection, event: dict, expect: str, timeout_s: float) -> dict:
    """Send `event` and return the next server event, which must answer it (type `expect`), or raise its error:
    attaching, before anything else is in flight on the connection."""
    try:
        await connection.send(json.dumps(event))
        raw = await asyncio.wait_for(connection.recv(), timeout_s)
    except asyncio.TimeoutError as e:
        raise RequestTimeoutError(f"no reply to {event['type']} within {timeout_s} s") from e
    except websockets.ConnectionClosed as e:
        raise ConnectionLostError(f"the connection closed before the reply to {event['type']}: {e}") from e
    return _checked(raw, event, expect)


def _checked(raw, event: dict, expect: str) -> dict:
    """The server event `raw` answering `event`: of type `expect`, or its error raised as the HTTP client's."""
    try:
        reply = json.loads(raw)
    except (TypeError, ValueError):
        raise ProtocolError(f"a reply to {event['type']} that is not a JSON text frame: {raw[:200]!r}") from None
    if not isinstance(reply, dict):
        raise ProtocolError(f"a reply to {event['type']} that is not an event object: {raw[:200]!r}")
    if reply.get("type") == protocol.WS_ERROR:
        error = reply.get("error") or {}
        raise error_for(int(error.get("code", 500)), str(error.get("message", "")), body=raw,
                        retry_after_s=error.get("retry_after_s"))
    if reply.get("type") != expect:
        raise ProtocolError(f"expected {expect} in reply to {event['type']}, got {reply.get('type')!r}")
    return reply
