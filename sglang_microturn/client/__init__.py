"""The asyncio client of the /microturn API (aiohttp for HTTP, websockets for WS /microturn/ws; no torch, no SGLang)."""

from sglang_microturn.client.connection import HTTPConnection  # noqa: F401
from sglang_microturn.client.errors import (  # noqa: F401
    BadRequestError,
    ConnectionLostError,
    LengthMismatchError,
    MicroTurnClientError,
    MicroTurnHTTPError,
    OverBudgetError,
    PayloadTooLargeError,
    ProtocolError,
    RequestTimeoutError,
    ServerError,
    ServiceUnavailableError,
    SessionBusyError,
    SessionGoneError,
    SessionNotFoundError,
    UnauthorizedError,
    error_for,
)
from sglang_microturn.client.microturn_client import MicroTurnClient, MicroTurnSession, TurnRecord  # noqa: F401
from sglang_microturn.client.ws_session import MicroTurnWebSocket  # noqa: F401
