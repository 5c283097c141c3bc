"""WS /microturn/ws: the micro-turn API over one WebSocket per session (events: sglang_microturn/protocol.py).

A live user is one long connection, not an HTTP request every 200 ms: no request parsing, routing or connection
work per micro-turn. Each client event runs the HTTP call it names on the same `MicroTurnAPI`, with the same
checks, so every error is the HTTP API's, sent as an `error` event that changes nothing; the connection stays
open. Frames that are not a JSON object (binary frames, bad JSON, an unknown type) are errors of the same kind.

`SocketSession` owns what one connection holds: the session it is attached to (at most one; opened by
`session.update`, attached again by `session.resume`) and its turns in flight. The session itself belongs to
the registry and outlives the connection: a dropped connection aborts the turn in flight (the session rolls
back, as when an HTTP client disconnects) and leaves the session to its idle timeout.

SGLang's `--api-key` middleware checks HTTP requests only, so the handshake is checked here with SGLang's own
decision function (`Authorization: Bearer <key>`): a refused handshake is closed with code 1008 before it is
accepted (the client sees HTTP 403).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from starlette.websockets import WebSocket, WebSocketDisconnect

from sglang_microturn import protocol
from sglang_microturn.server.api_handlers import MicroTurnAPI
from sglang_microturn.server.api_requests import APPEND_FIELDS, parse_json_body, refuse_unknown_fields
from sglang_microturn.server.session_registry import BadRequest, PayloadTooLarge, shown

logger = logging.getLogger(__name__)

POLICY_VIOLATION = 1008  # WebSocket close code of a refused handshake (RFC 6455)
APPEND_EVENT_FIELDS = APPEND_FIELDS - {"session_id"}  # the connection names the session


def api_key_check(api_key: str | None, admin_api_key: str | None = None) -> Callable[[str | None], bool]:
    """Whether a handshake's Authorization header passes SGLang's --api-key rule for a normal endpoint."""
    if api_key is None and admin_api_key is None:
        return lambda authorization: True
    from sglang.srt.utils.auth import AuthLevel, decide_request_auth

    def allowed(authorization: str | None) -> bool:
        return decide_request_auth(method="GET", path=protocol.WS_PATH, authorization_header=authorization,
                                   api_key=api_key, admin_api_key=admin_api_key,
                                   auth_level=AuthLevel.NORMAL).allowed

    return allowed


class SocketSession:
    """One connection: the session it is attached to and its turns in flight (see the module docstring)."""

    def __init__(self, api: MicroTurnAPI, websocket: WebSocket, frame_limit: int,
                 error_reply: Callable[[Exception, str], tuple[int, str, dict | None]]):
        self.api, self.websocket, self.frame_limit, self.error_reply = api, websocket, frame_limit, error_reply
        self.session_id: str | None = None
        self.turns: set[asyncio.Task] = set()
        self.gone = asyncio.Event()  # set when the connection drops: aborts the turn in flight
        self._send_lock = asyncio.Lock()

    async def send(self, event: dict) -> None:
        if self.gone.is_set():
            return
        async with self._send_lock:
            try:
                await self.websocket.send_json(event)
            except (WebSocketDisconnect, RuntimeError, OSError):  # the peer left between our check and the send
                self.gone.set()

    async def send_error(self, error: Exception, event_id, what: str) -> None:
        status, message, headers = self.error_reply(error, what)
        body = {"code": status, "type": getattr(error, "name", None) or protocol.name_of(status), "message": message}
        if headers and "Retry-After" in headers:
            body["retry_after_s"] = float(headers["Retry-After"])
        await self.send(_reply(protocol.WS_ERROR, event_id, error=body))

    async def receive_frame(self, message: dict) -> None:
        """One frame from the client: parse it and run its event (an append runs as a task of its own, so a
        later event of the connection is read while the turn runs)."""
        event_id = None
        try:
            text = message.get("text")
            if text is None:
                raise BadRequest("binary frames are not accepted: send each event as a JSON text frame")
            if len(text) > self.frame_limit:
                raise PayloadTooLarge(f"event of {len(text)} characters is over the {self.frame_limit}-byte limit "
                                      "(MICROTURN_MAX_BODY_BYTES)")
            event = parse_json_body(text.encode())
            event_id = event.get("event_id")
            if event_id is not None and not isinstance(event_id, str):
                event_id = None
                raise BadRequest("event_id must be a string")
            kind = event.get("type")
            if kind not in protocol.WS_CLIENT_EVENTS:
                raise BadRequest(f"unknown event type {shown(repr(kind), 100)}; one of "
                                 f"{', '.join(protocol.WS_CLIENT_EVENTS)}")
            fields = {k: v for k, v in event.items() if k not in ("type", "event_id")}
            await self.api.sweep()
            await self._run(kind, fields, event_id)
        except Exception as e:  # every failure is an error event; the connection and the session stay
            await self.send_error(e, event_id, "a WebSocket event")

    async def _run(self, kind: str, fields: dict, event_id) -> None:
        if kind == protocol.WS_INPUT_APPEND:
            refuse_unknown_fields(fields, APPEND_EVENT_FIELDS, kind)
            body = dict(fields, session_id=self._attached(kind))
            task = asyncio.get_running_loop().create_task(self._append(body, event_id))
            self.turns.add(task)
            task.add_done_callback(self.turns.discard)
            return
        if kind == protocol.WS_RESPONSE_CANCEL:
            refuse_unknown_fields(fields, frozenset(), kind)
            reply = await self.api.cancel({"session_id": self._attached(kind)})
            await self.send(_reply(protocol.WS_RESPONSE_CANCELLED, event_id, **reply))
            return
        if kind == protocol.WS_SESSION_CLOSE:
            refuse_unknown_fields(fields, frozenset(), kind)
            reply = await self.api.close({"session_id": self._attached(kind)})
            self.session_id = None
            await self.send(_reply(protocol.WS_SESSION_CLOSED, event_id, **reply))
            return
        if self.session_id is not None:
            raise BadRequest(f"this connection already carries session {self.session_id}: open another connection "
                             "for another session (a session's options are fixed when it opens)")
        if kind == protocol.WS_SESSION_UPDATE:
            refuse_unknown_fields(fields, frozenset({"session"}), kind)
            options = fields.get("session", {})
            if not isinstance(options, dict):
                raise BadRequest(f'"session" must be an object, got {shown(repr(options), 100)}')
            reply = await self.api.open(options)
            self.session_id = reply["session_id"]
            await self.send(_reply(protocol.WS_SESSION_CREATED, event_id,
                                   session={"id": self.session_id, "committed_length": 0}))
            return
        refuse_unknown_fields(fields, frozenset({"session_id"}), kind)  # session.resume
        session_id = fields.get("session_id")
        if not isinstance(session_id, str):
            raise BadRequest("session.resume needs a session_id (a string)")
        session = self.api.registry.get_open(session_id)  # 404, or 410 when closed, expired or gone
        session.touch()  # a reconnect is activity: the idle timer starts again
        self.session_id = session_id
        await self.send(_reply(protocol.WS_SESSION_RESUMED, event_id,
                               session={"id": session_id, "committed_length": len(session.tokens)}))

    def _attached(self, kind: str) -> str:
        if self.session_id is None:
            raise BadRequest(f"{kind} before the connection has a session: send {protocol.WS_SESSION_UPDATE} "
                             f"(open) or {protocol.WS_SESSION_RESUME} first")
        return self.session_id

    async def _append(self, body: dict, event_id) -> None:
        try:
            reply = await self.api.append(body, self.gone.wait)
        except Exception as e:
            await self.send_error(e, event_id, protocol.WS_INPUT_APPEND)
            return
        if not reply.get("aborted"):  # aborted: the connection dropped and the session rolled back
            await self.send(_reply(protocol.WS_RESPONSE_DONE, event_id, **reply))

    async def drain(self) -> None:
        """After the connection dropped: let the turns in flight finish their abort and roll back."""
        self.gone.set()
        if self.turns:
            await asyncio.wait(set(self.turns))


def _reply(kind: str, event_id, **fields) -> dict:
    event = {"type": kind, **fields}
    if event_id is not None:
        event["in_reply_to"] = event_id
    return event


def endpoint(api: MicroTurnAPI, frame_limit: int, authorized: Callable[[str | None], bool],
             error_reply: Callable[[Exception, str], tuple[int, str, dict | None]]):
    """The Starlette WebSocket endpoint of WS /microturn/ws."""

    async def serve(websocket: WebSocket) -> None:
        if not authorized(websocket.headers.get("authorization")):
            await websocket.close(code=POLICY_VIOLATION, reason="missing or wrong API key (Authorization: Bearer)")
            return
        await websocket.accept()
        connection = SocketSession(api, websocket, frame_limit, error_reply)
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await connection.receive_frame(message)
        except WebSocketDisconnect:
            pass
        finally:
            await connection.drain()

    return serve
