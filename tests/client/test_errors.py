"""Every error response reads back as its typed error (client/errors.py, from sglang_microturn/protocol.py),
whatever its body: ours, SGLang's API-key middleware's, FastAPI's, or not JSON at all. Over real HTTP (uvicorn
on loopback)."""

import asyncio

import pytest
from fake_sglang_http import FakeTokenizerManager, app_for, serve_on_loopback
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from sglang_microturn import protocol
from sglang_microturn.client import (
    BadRequestError,
    HTTPConnection,
    LengthMismatchError,
    MicroTurnClient,
    MicroTurnHTTPError,
    OverBudgetError,
    PayloadTooLargeError,
    ProtocolError,
    ServerError,
    ServiceUnavailableError,
    SessionBusyError,
    SessionGoneError,
    SessionNotFoundError,
    UnauthorizedError,
)
from sglang_microturn.server.api_handlers import Backend, MicroTurnAPI

TYPED = {400: BadRequestError, 401: UnauthorizedError, 404: SessionNotFoundError, 409: SessionBusyError,
         410: SessionGoneError, 412: LengthMismatchError, 413: PayloadTooLargeError, 429: OverBudgetError,
         500: ServerError, 503: ServiceUnavailableError}


def test_the_table_covers_every_status_the_server_sends():
    assert sorted(TYPED) == sorted({status for status, _ in protocol.ERRORS.values()})


async def _answer(request):
    """GET /answer/<status>?kind=ours|sglang|fastapi|text|html|empty[&retry_after=...]"""
    status, kind = int(request.path_params["status"]), request.query_params.get("kind", "ours")
    headers = {"Retry-After": request.query_params["retry_after"]} if "retry_after" in request.query_params else None
    if kind == "ours":
        return JSONResponse({"error": {"code": status, "message": f"ours {status}"}}, status, headers)
    if kind == "sglang":
        return JSONResponse({"error": "Unauthorized"}, status, headers)
    if kind == "fastapi":
        return JSONResponse({"detail": "Not Found"}, status, headers)
    if kind == "text":
        return PlainTextResponse("Internal Server Error", status, headers)
    if kind == "html":
        return Response("<html><body>" + "x" * 2000 + "</body></html>", status, headers, media_type="text/html")
    if kind == "badjson":
        return Response("{not json", status, headers, media_type="application/json")
    return Response(b"", status, headers)


@pytest.fixture(scope="module")
def answers():
    with serve_on_loopback(Starlette(routes=[Route("/answer/{status}", _answer)])) as url:
        yield url


def _get(url, path):
    async def run():
        conn = HTTPConnection(url)
        try:
            return await conn.request("GET", path)
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.mark.parametrize("status", sorted(TYPED))
def test_each_status_raises_its_typed_error(answers, status):
    with pytest.raises(TYPED[status]) as info:
        _get(answers, f"/answer/{status}")
    e = info.value
    assert type(e) is TYPED[status] and e.status == status and e.message == f"ours {status}"
    assert e.retry_after_s is None and f"ours {status}" in str(e)


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_read(answers, status):
    with pytest.raises(TYPED[status]) as info:
        _get(answers, f"/answer/{status}?retry_after=3")
    assert info.value.retry_after_s == 3.0
    with pytest.raises(TYPED[status]) as info:
        _get(answers, f"/answer/{status}?retry_after=soon")  # unreadable: no number rather than a crash
    assert info.value.retry_after_s is None


@pytest.mark.parametrize("kind, status, message", [
    ("text", 500, "Internal Server Error"),  # Starlette's own 500 page
    ("empty", 500, "(empty body)"),
    ("badjson", 503, "{not json"),
    ("fastapi", 404, "Not Found"),
    ("sglang", 401, "Unauthorized"),
])
def test_bodies_that_are_not_ours_keep_status_and_text(answers, kind, status, message):
    with pytest.raises(TYPED[status]) as info:
        _get(answers, f"/answer/{status}?kind={kind}")
    assert info.value.status == status and info.value.message == message


def test_an_unlisted_status_is_a_server_error_with_its_status_and_a_bounded_message(answers):
    with pytest.raises(ServerError) as info:
        _get(answers, "/answer/502?kind=html")
    e = info.value
    assert e.status == 502 and e.body.startswith("<html>") and len(e.body) > 2000
    assert len(e.message) < 600 and "characters)" in e.message


def test_a_success_whose_json_does_not_parse_is_a_protocol_error(answers):
    with pytest.raises(ProtocolError) as info:
        _get(answers, "/answer/200?kind=badjson")
    assert info.value.status == 200 and info.value.body == "{not json"


def test_a_text_success_comes_back_as_text(answers):
    assert _get(answers, "/answer/200?kind=text") == "Internal Server Error"  # like SGLang's /freeze_gc


def test_401_from_sglangs_api_key_middleware(monkeypatch):
    """SGLang's own --api-key middleware in front of the /microturn front (as launch_server stacks them)."""
    from sglang.srt.utils.auth import add_api_key_middleware

    monkeypatch.setenv("MICROTURN_SESSION_KV_TOKENS", "100000")
    app = app_for(MicroTurnAPI(lambda: Backend(FakeTokenizerManager(), max_total_num_tokens=100_000)))
    add_api_key_middleware(app, api_key="sekret", admin_api_key=None)

    async def run(url):
        async with MicroTurnClient(url) as anonymous:
            with pytest.raises(UnauthorizedError) as info:
                await anonymous.open()
        async with MicroTurnClient(url, api_key="sekret") as client:
            session = await client.open(output_budget=1)
            reply = await session.append([5])
            await session.close()
        return info.value, reply

    with serve_on_loopback(app) as url:
        error, reply = asyncio.run(run(url))
    assert error.status == 401 and error.message == "Unauthorized" and isinstance(error, MicroTurnHTTPError)
    assert reply["committed_length"] == 2
