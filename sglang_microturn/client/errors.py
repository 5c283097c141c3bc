"""What the client raises: one typed error per error name of sglang_microturn/protocol.py (an error response
with that name's HTTP status), and the errors of a request that got no usable response.

    MicroTurnClientError                  every error of the client
      MicroTurnHTTPError                  an error response: .status, .message, .body (the raw text),
                                          .retry_after_s (Retry-After, seconds, or None)
        BadRequestError 400, UnauthorizedError 401, SessionNotFoundError 404, SessionBusyError 409,
        SessionGoneError 410, LengthMismatchError 412, PayloadTooLargeError 413, OverBudgetError 429,
        ServerError 500 (and any status the table does not list), ServiceUnavailableError 503
      ConnectionLostError                 the connection failed before a response came (the request may or
                                          may not have reached the server)
      RequestTimeoutError                 no response within the client's timeout_s
      ProtocolError                       a response that is not what the protocol says (not JSON, an append
                                          reply that does not follow from the append)
        GatewayRouteError                 SGLang Model Gateway's own 404 for a route it does not forward
"""

from __future__ import annotations

import email.utils
import json
import math
import time

from sglang_microturn import protocol

# An error body that is not our JSON (a proxy's HTML page, a traceback) is kept whole in .body; the message
# quotes this much of it.
_MESSAGE_CHARS = 500


class MicroTurnClientError(Exception):
    """Anything the client raises about the server or the connection to it."""


class MicroTurnHTTPError(MicroTurnClientError):
    """An error response from the server. Each subclass is one error `name` of sglang_microturn.protocol and
    has that name's HTTP `status` as a class attribute; an instance's `status` is the status received."""

    name: str = protocol.SERVER_ERROR
    status: int = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.status = protocol.status_of(cls.name)

    def __init__(self, status: int, message: str, *, body: str = "", retry_after_s: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.body, self.retry_after_s = status, message, body, retry_after_s


class BadRequestError(MicroTurnHTTPError):
    name = protocol.BAD_REQUEST


class UnauthorizedError(MicroTurnHTTPError):
    """SGLang's --api-key is set: pass it as MicroTurnClient(api_key=...)."""

    name = protocol.UNAUTHORIZED


class SessionNotFoundError(MicroTurnHTTPError):
    name = protocol.SESSION_NOT_FOUND


class SessionBusyError(MicroTurnHTTPError):
    name = protocol.SESSION_BUSY


class SessionGoneError(MicroTurnHTTPError):
    name = protocol.SESSION_GONE


class LengthMismatchError(MicroTurnHTTPError):
    """The append's expected_length was not the session's committed length. When a MicroTurnSession raises
    it, it has re-read the session: `expected_length` is what the append sent, `committed_length` what the
    server holds (and what the session's next append expects)."""

    name = protocol.LENGTH_MISMATCH
    expected_length: int | None = None
    committed_length: int | None = None


class PayloadTooLargeError(MicroTurnHTTPError):
    name = protocol.PAYLOAD_TOO_LARGE


class OverBudgetError(MicroTurnHTTPError):
    """Every 429: the sessions' KV budget, or admission refusing a new session (over_capacity, which sends
    Retry-After: `retry_after_s`)."""

    name = protocol.OVER_BUDGET


class ServerError(MicroTurnHTTPError):
    name = protocol.SERVER_ERROR


class ServiceUnavailableError(MicroTurnHTTPError):
    """503: the server aborted the turn and the session rolled back to its committed length; retry the append
    (after `retry_after_s` when given)."""

    name = protocol.TURN_ABORTED


class ConnectionLostError(MicroTurnClientError, ConnectionError):
    """The connection failed before a whole response came; the request may or may not have reached the server."""


class RequestTimeoutError(MicroTurnClientError, TimeoutError):
    """No response within the client's timeout_s. The connection was closed, so a running append sees a client
    disconnect and rolls back, unless it committed first; the session re-reads which on its next call."""


class ProtocolError(MicroTurnClientError):
    """A response that is not what the /microturn protocol says: `status` and the raw `body` are kept."""

    def __init__(self, message: str, status: int | None = None, body: str = ""):
        super().__init__(message)
        self.status, self.body = status, body


class GatewayRouteError(ProtocolError):
    """SGLang Model Gateway answered a /microturn route itself: it forwards SGLang's own routes only. Nothing
    reached a worker; the same call in its gateway form (sglang_microturn/protocol.py) does."""


HTTP_ERRORS = {c.name: c for c in (BadRequestError, UnauthorizedError, SessionNotFoundError, SessionBusyError,
                                   SessionGoneError, LengthMismatchError, PayloadTooLargeError, OverBudgetError,
                                   ServerError, ServiceUnavailableError)}


def error_for(status: int, message: str, *, body: str = "", retry_after_s: float | None = None) -> MicroTurnHTTPError:
    """The typed error of HTTP error `status` (ServerError for a status the protocol does not list)."""
    return HTTP_ERRORS.get(protocol.name_of(status), ServerError)(status, message, body=body,
                                                                  retry_after_s=retry_after_s)


def error_from_response(status: int, text: str, retry_after: str | None) -> MicroTurnHTTPError:
    """The typed error of one error response: its status, body text and Retry-After header."""
    return error_for(status, message_of(text), body=text, retry_after_s=parse_retry_after(retry_after))


def message_of(text: str) -> str:
    """The message of an error body: ours ({"error": {"message"}}), SGLang's API-key middleware's
    ({"error": "Unauthorized"}), FastAPI's ({"detail": ...}), or the start of any other text."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
        if data.get("detail"):
            return str(data["detail"])
    text = text.strip()
    if not text:
        return "(empty body)"
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + f"... ({len(text)} characters)"


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
