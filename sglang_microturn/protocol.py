"""The /microturn wire protocol's errors: each error's name, its HTTP status and what it means (stdlib only).

The server's domain errors (server/session_registry.py) carry a name from here and the HTTP layer
(server/routes.py) answers with its status; the client (client/microturn_client.py) turns a status back into
its typed exception. This table is the only place the status codes are written down.

An error response is JSON `{"error": {"code": <status>, "message": <what was wrong and the fix>}}` and changes
nothing on the server; a 429 from admission or the session cap also carries `Retry-After` (seconds).
"""

from __future__ import annotations

from urllib.parse import quote

BAD_REQUEST = "bad_request"
UNAUTHORIZED = "unauthorized"
SESSION_NOT_FOUND = "session_not_found"
SESSION_BUSY = "session_busy"
SESSION_GONE = "session_gone"
LENGTH_MISMATCH = "length_mismatch"
OVER_BUDGET = "over_budget"
OVER_CAPACITY = "over_capacity"
PAYLOAD_TOO_LARGE = "payload_too_large"
SERVER_ERROR = "server_error"
TURN_ABORTED = "turn_aborted"

# name -> (HTTP status, meaning). A status shared by two names (429) reads back as the first of them.
ERRORS: dict[str, tuple[int, str]] = {
    BAD_REQUEST: (400, "malformed body, an unknown field, a number that is not finite or out of range, empty or "
                       "oversized chunk, ids outside the vocabulary, a BOS id in a later chunk, a negative budget "
                       "or one no session could ever be granted"),
    UNAUTHORIZED: (401, "SGLang's --api-key is set and the request does not carry it"),
    SESSION_NOT_FOUND: (404, "unknown session id"),
    SESSION_BUSY: (409, "an append of this session is already in flight"),
    SESSION_GONE: (410, "the session is closed or expired"),
    LENGTH_MISMATCH: (412, "the append's expected_length is not the session's committed length"),
    OVER_BUDGET: (429, "the sessions' KV budget is exhausted"),
    OVER_CAPACITY: (429, "a new session would take the server past its real-time capacity or its session cap "
                         "(Retry-After)"),
    PAYLOAD_TOO_LARGE: (413, "the request body is larger than MICROTURN_MAX_BODY_BYTES"),
    SERVER_ERROR: (500, "the server failed"),
    TURN_ABORTED: (503, "the server aborted the turn (a running timeout, out of memory, an operator's abort); "
                        "the session rolled back to its committed length: retry the append"),
}


def status_of(name: str) -> int:
    """The HTTP status the server answers error `name` with."""
    return ERRORS[name][0]


def name_of(status: int) -> str:
    """The error name a client reads from an HTTP error status (SERVER_ERROR for any status not listed)."""
    return next((name for name, (code, _) in ERRORS.items() if code == status), SERVER_ERROR)


# The calls of the API: name -> (method, path). The status call's body is {"session_id", "tokens"}: they go in
# its path and query.
ROUTES: dict[str, tuple[str, str]] = {
    "open": ("POST", "/microturn/open"),
    "append": ("POST", "/microturn/append"),
    "close": ("POST", "/microturn/close"),
    "cancel": ("POST", "/microturn/cancel"),
    "status": ("GET", "/microturn/sessions/{session_id}"),
}

# Through SGLang Model Gateway (smg, docs/scale-out.md). The gateway forwards SGLang's own routes only: for
# /microturn/* it answers 404 itself, with GATEWAY_ERROR_HEADER `unknown_url`. So every call also has a gateway
# form, POST GATEWAY_PATH with the body {GATEWAY_FIELD: {"op": <call>, ...the call's body...}}, which the
# plugin serves before SGLang's /generate sees it, exactly as the direct route. Top-level fields beside
# GATEWAY_FIELD are ignored (a gateway may add its own). ROUTING_KEY_HEADER, the same on every call of a
# session, keeps the session on the worker its open reached.
GATEWAY_PATH = "/generate"
GATEWAY_FIELD = "microturn"
ROUTING_KEY_HEADER = "X-SMG-Routing-Key"
GATEWAY_ERROR_HEADER = "X-SMG-Error-Code"
GATEWAY_UNKNOWN_ROUTE = "unknown_url"


def direct_request(call: str, body: dict) -> tuple[str, str, dict | None]:
    """(method, path with query, JSON body or None) of `call` on its own route."""
    method, path = ROUTES[call]
    if call != "status":
        return method, path, body
    path = path.format(session_id=quote(str(body["session_id"]), safe=""))
    return method, path + ("?tokens=1" if body.get("tokens") else ""), None


def gateway_request(call: str, body: dict) -> tuple[str, str, dict]:
    """(method, path, JSON body) of `call` in its gateway form."""
    return "POST", GATEWAY_PATH, {GATEWAY_FIELD: {"op": call, **body}}


# WebSocket transport: one connection = one session's stream of micro-turns. Every frame is a JSON text frame,
# an object with a "type" (after the OpenAI Realtime API's event shape). A client event's optional "event_id"
# comes back as "in_reply_to" on the server event that answers it. Client events and their fields (the same
# fields, checks and errors as the HTTP call named beside each):
#   session.update   {"session": {output_budget?, stop_ids?, idle_timeout?, temperature?, ignore_eos?, seed?,
#                    deadline_ms?}}: opens the connection's session (HTTP open); only before one is attached
#   session.resume   {"session_id"}: attaches an open session again after a dropped connection (HTTP status);
#                    the next input.append's expected_length says which turn the client saw last
#   input.append     {input_ids, output_budget?, return_logprob?, expected_length?} (HTTP append): one micro-turn;
#                    or {input: {audio?, text?}, ...} instead of input_ids: the period's 16 kHz PCM (base64 of
#                    little-endian int16) and typed text, encoded by the server (server/layout_turns.py)
#   response.cancel  {} (HTTP cancel): barge-in: the running micro-turn stops generating; its response.done
#                    follows with what it generated (finish_reason {"type": "cancelled"}), all committed
#   session.close    {} (HTTP close)
# Server events:
#   session.created / session.resumed   {"session": {"id", "committed_length"}}
#   response.done    the HTTP append's reply: {output_ids, committed_length, finish_reason, timestamps, ...}
#   response.cancelled  the HTTP cancel's reply: {"session_id", "cancelled": whether a micro-turn was running}
#   session.closed   the HTTP close's reply
#   error            {"error": {"code": <HTTP status of the same error>, "type": <error name>, "message"}}:
#                    nothing changed; the connection stays open
# A dropped connection aborts the turn in flight (the session rolls back to its committed length, as when an
# HTTP client disconnects) and leaves the session open for its idle timeout.
WS_PATH = "/microturn/ws"
WS_SESSION_UPDATE = "session.update"
WS_SESSION_RESUME = "session.resume"
WS_INPUT_APPEND = "input.append"
WS_SESSION_CLOSE = "session.close"
WS_RESPONSE_CANCEL = "response.cancel"
WS_CLIENT_EVENTS = (WS_SESSION_UPDATE, WS_SESSION_RESUME, WS_INPUT_APPEND, WS_RESPONSE_CANCEL, WS_SESSION_CLOSE)
WS_SESSION_CREATED = "session.created"
WS_SESSION_RESUMED = "session.resumed"
WS_RESPONSE_DONE = "response.done"
WS_SESSION_CLOSED = "session.closed"
WS_RESPONSE_CANCELLED = "response.cancelled"
WS_ERROR = "error"
