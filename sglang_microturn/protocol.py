"""The /microturn wire protocol's errors: each error's name, its HTTP status and what it means (stdlib only).

The server's domain errors (server/session_registry.py) carry a name from here and the HTTP layer
(server/routes.py) answers with its status; the client (client/microturn_client.py) turns a status back into
its typed exception. This table is the only place the status codes are written down.

An error response is JSON `{"error": {"code": <status>, "message": <what was wrong and the fix>}}` and changes
nothing on the server; a 429 from admission also carries `Retry-After` (seconds).
"""

from __future__ import annotations

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
SERVICE_UNAVAILABLE = "service_unavailable"

# name -> (HTTP status, meaning). A status shared by two names (429) reads back as the first of them.
ERRORS: dict[str, tuple[int, str]] = {
    BAD_REQUEST: (400, "malformed body, empty or oversized chunk, ids outside the vocabulary, a BOS id in a "
                       "later chunk, a negative budget"),
    UNAUTHORIZED: (401, "SGLang's --api-key is set and the request does not carry it"),
    SESSION_NOT_FOUND: (404, "unknown session id"),
    SESSION_BUSY: (409, "an append of this session is already in flight"),
    SESSION_GONE: (410, "the session is closed or expired"),
    LENGTH_MISMATCH: (412, "the append's expected_length is not the session's committed length"),
    PAYLOAD_TOO_LARGE: (413, "the request body is over the server's size limit"),
    OVER_BUDGET: (429, "the sessions' KV budget is exhausted"),
    OVER_CAPACITY: (429, "a new session would take the server past its real-time capacity (Retry-After)"),
    SERVER_ERROR: (500, "the server failed"),
    SERVICE_UNAVAILABLE: (503, "the server aborted the request (out of memory, a timeout) and changed nothing: "
                               "retry, after Retry-After seconds when it is given"),
}


def status_of(name: str) -> int:
    """The HTTP status the server answers error `name` with."""
    return ERRORS[name][0]


def name_of(status: int) -> str:
    """The error name a client reads from an HTTP error status (SERVER_ERROR for any status not listed)."""
    return next((name for name, (code, _) in ERRORS.items() if code == status), SERVER_ERROR)
