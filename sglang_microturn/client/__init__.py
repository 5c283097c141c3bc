"""The asyncio client of the /microturn API (stdlib only: no torch, no SGLang)."""

from sglang_microturn.client.microturn_client import (  # noqa: F401
    BadRequestError,
    HTTPConnection,
    LengthMismatchError,
    MicroTurnClient,
    MicroTurnHTTPError,
    MicroTurnSession,
    OverBudgetError,
    ServerError,
    SessionBusyError,
    SessionGoneError,
    SessionNotFoundError,
    TurnRecord,
    UnauthorizedError,
    error_for,
)
