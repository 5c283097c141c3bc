"""The /microturn routes in SGLang's HTTP server process: an ASGI front ahead of SGLang's FastAPI app, the
HTTP routes it serves (also in their gateway form on POST /generate, sglang_microturn/protocol.py), WS
/microturn/ws (server/ws_transport.py), the browser console page (server/console_page.py), the error shape
they share, and the plugin hook that mounts them.

Every error a /microturn route answers, whatever raised it (a domain error, SGLang's HTTPExceptions, a
body over MICROTURN_MAX_BODY_BYTES, a bug), is JSON `{"error": {"code", "message"}}` with the status
sglang_microturn/protocol.py gives the error's name. Routes sit behind SGLang's API-key middleware like
SGLang's own; SGLang applies `--api-key` in single-tokenizer mode only, so the plugin refuses to start with
`--tokenizer-worker-num` > 1 (its routes and registry would live in one worker of several, unauthenticated).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route, Router, WebSocketRoute

from sglang_microturn import config, protocol
from sglang_microturn.server import console_page, ws_transport
from sglang_microturn.server.api_handlers import Backend, MicroTurnAPI
from sglang_microturn.server.api_requests import parse_json_body
from sglang_microturn.server.session_registry import MicroTurnError, OverCapacity, PayloadTooLarge, shown

logger = logging.getLogger(__name__)

PREFIX = "/microturn"


class MicroTurnFront:
    """ASGI middleware that serves /microturn/* (and the WebSocket at protocol.WS_PATH) from our own router; every
    other request goes on to SGLang's FastAPI app unchanged.

    Why not `app.include_router`: FastAPI matches a request against SGLang's whole route table (~150 routes)
    and runs its per-route machinery; profiled on an H200 at 640 appends/s, routing and FastAPI's request
    handling took about a quarter of the HTTP process, the process that sets the real-time capacity. Added
    with `app.add_middleware` before the server starts, it sits inside Starlette's error middleware (an
    uncaught exception is still a 500) and inside every middleware SGLang adds at launch, its API-key check
    included (`launch_server` adds that after our BEFORE hook has run)."""

    def __init__(self, app, router: Router, body_limit: int):
        self.app, self.body_limit = app, body_limit
        # The CORS policy SGLang's app gives its own routes (sglang.srt.entrypoints.http_server), so a browser
        # page on another origin reaches /microturn as it reaches /generate.
        self.router = CORSMiddleware(router, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                                     allow_headers=["*"])

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and _route_path(scope) == protocol.WS_PATH:
            return await self.router(scope, receive, send)
        if scope["type"] == "http":
            path = _route_path(scope)
            if path.startswith(PREFIX + "/"):
                return await self._serve(scope, receive, send)
            if path == protocol.GATEWAY_PATH and scope["method"] == "POST":
                return await self._generate(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _serve(self, scope, receive, send):
        try:
            await self.router(scope, receive, send)
        except HTTPException as e:  # Starlette's method-not-allowed; FastAPI's handlers sit past us
            await _error(e.status_code, f"{scope['method']} {shown(scope['path'])}: {e.detail}")(scope, receive, send)

    async def _generate(self, scope, receive, send):
        """POST /generate: a call in its gateway form (protocol.GATEWAY_FIELD) is served as its own route would
        serve it; any other body goes on to SGLang's /generate, replayed as received. Only a body that mentions
        the field is parsed here, so plain /generate requests are not parsed twice."""
        messages, body = await _buffer_body(receive, self.body_limit)
        call = gateway_call(body) if body is not None else None
        if call is None:
            return await self.app(scope, _replaying(messages, receive), send)
        if isinstance(call, str):
            return await _error(protocol.status_of(protocol.BAD_REQUEST), call)(scope, receive, send)
        method, target, inner = call
        path, _, query = target.partition("?")
        payload = b"" if inner is None else json.dumps(inner).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(payload)).encode()))
        path = scope.get("root_path", "") + path
        inner_scope = dict(scope, method=method, path=path, raw_path=path.encode(), query_string=query.encode(),
                           headers=headers)
        replay = [{"type": "http.request", "body": payload, "more_body": False}]
        await self._serve(inner_scope, _replaying(replay, receive), send)


def gateway_call(body: bytes) -> tuple[str, str, dict | None] | str | None:
    """The direct form (method, path, body) of the call `body` carries in its gateway form; None when `body` is
    not one (a plain /generate request); a message when it is one but malformed."""
    if f'"{protocol.GATEWAY_FIELD}"'.encode() not in body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or protocol.GATEWAY_FIELD not in data:
        return None
    call = data[protocol.GATEWAY_FIELD]
    if not isinstance(call, dict) or call.get("op") not in protocol.ROUTES:
        return (f'"{protocol.GATEWAY_FIELD}" must be an object whose "op" is one of '
                f"{', '.join(protocol.ROUTES)}, got {shown(repr(call), 200)}")
    fields = {k: v for k, v in call.items() if k != "op"}
    if call["op"] == "status":
        unknown = sorted(set(fields) - {"session_id", "tokens"})
        if unknown:
            return f"unknown field(s) for status: {', '.join(shown(k, 100) for k in unknown)}"
        if not isinstance(fields.get("session_id"), str):
            return "status needs a session_id (a string)"
    return protocol.direct_request(call["op"], fields)


async def _buffer_body(receive, limit: int) -> tuple[list[dict], bytes | None]:
    """The request's messages read so far and its whole body; the body is None (and reading stops) once it
    passes `limit` bytes or the client disconnects: such a request goes on to SGLang as it came."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        size += len(message.get("body", b""))
        if size > limit:
            return messages, None
        if not message.get("more_body", False):
            return messages, b"".join(m.get("body", b"") for m in messages)


def _replaying(messages: list[dict], receive):
    """An ASGI receive that first hands out `messages`, then reads on from `receive`."""
    pending = list(messages)

    async def replay():
        return pending.pop(0) if pending else await receive()

    return replay


def _route_path(scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def error_reply(error: Exception, what: str) -> tuple[int, str, dict | None]:
    """(status, message, headers) every /microturn transport answers `error` with, raised while serving `what`."""
    if isinstance(error, OverCapacity):
        return protocol.status_of(error.name), error.message, {"Retry-After": str(error.retry_after_s)}
    if isinstance(error, MicroTurnError):
        return protocol.status_of(error.name), error.message, None
    if isinstance(error, HTTPException):  # SGLang's own (e.g. 503 from its tokenizer manager), in our shape
        return error.status_code, shown(str(error.detail), 1000), None
    if isinstance(error, ValueError):  # SGLang's own request validation (e.g. context length)
        return protocol.status_of(protocol.BAD_REQUEST), shown(str(error), 1000), None
    # A bug: still our shape, and logged with its traceback.
    logger.error("microturn: %s failed", what, exc_info=error)
    return protocol.status_of(protocol.SERVER_ERROR), f"the server failed: {type(error).__name__}", None


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message}}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 (PayloadTooLarge) as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the {limit}-byte limit "
                              "(MICROTURN_MAX_BODY_BYTES)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the {limit}-byte limit (MICROTURN_MAX_BODY_BYTES)")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def build_router(api: MicroTurnAPI, authorized: Callable[[str | None], bool] = ws_transport.api_key_check(None)
                 ) -> Router:
    """The /microturn routes; `authorized` decides a WebSocket handshake's Authorization header (SGLang's API-key
    middleware, which guards the HTTP routes, lets WebSockets through)."""
    body_limit = config.value(config.MAX_BODY_BYTES)

    async def json_body(request: Request) -> dict:
        return parse_json_body(await read_body(request, body_limit))

    async def guarded(handler, *args):
        try:
            await api.sweep()
            return JSONResponse(await handler(*args))
        except Exception as e:
            return _error(*error_reply(e, getattr(handler, "__name__", "a route")))

    def disconnect_waiter(request: Request):
        async def wait():
            while True:
                if (await request.receive())["type"] == "http.disconnect":
                    return

        return wait

    async def open_session(request: Request):
        return await guarded(lambda: _with_body(request, api.open))

    async def append(request: Request):
        async def run():
            body = await json_body(request)
            return await api.append(body, disconnect_waiter(request))

        return await guarded(run)

    async def close(request: Request):
        return await guarded(lambda: _with_body(request, api.close))

    async def cancel(request: Request):
        return await guarded(lambda: _with_body(request, api.cancel))

    async def status(request: Request):
        async def run():
            tokens = request.query_params.get("tokens", "0").lower() in ("1", "true", "yes", "on")
            return api.status(request.path_params["session_id"], tokens)

        return await guarded(run)

    async def console(request: Request):
        try:
            return HTMLResponse(console_page.page(api.layout_turns.layout))
        except Exception as e:
            return _error(*error_reply(e, "the console"))

    async def _with_body(request, handler):
        return await handler(await json_body(request))

    async def not_found(scope, receive, send):
        await _error(404, f"no micro-turn route {scope['method']} {scope['path']}")(scope, receive, send)

    return Router(routes=[
        Route(f"{PREFIX}/open", open_session, methods=["POST"]),
        Route(f"{PREFIX}/append", append, methods=["POST"]),
        Route(f"{PREFIX}/close", close, methods=["POST"]),
        Route(f"{PREFIX}/cancel", cancel, methods=["POST"]),
        Route(f"{PREFIX}/sessions/{{session_id}}", status, methods=["GET"]),
        Route(console_page.PATH, console, methods=["GET"]),
        WebSocketRoute(protocol.WS_PATH, ws_transport.endpoint(api, body_limit, authorized, error_reply)),
    ], default=not_found)


def mount(app, api: MicroTurnAPI, authorized: Callable[[str | None], bool] = ws_transport.api_key_check(None)
          ) -> None:
    """Serve `api` in front of `app` (a Starlette/FastAPI app that has not started yet)."""
    app.add_middleware(MicroTurnFront, router=build_router(api, authorized),
                       body_limit=config.value(config.MAX_BODY_BYTES))


def _sglang_backend() -> Backend:
    from sglang.srt.entrypoints.http_server import get_global_state

    state = get_global_state()
    rows = state.scheduler_info.get("req_to_token_pool_size")  # patch 0009
    return Backend(state.tokenizer_manager, int(state.scheduler_info["max_total_num_tokens"]),
                   None if rows is None else int(rows))


def require_single_tokenizer(server_args) -> None:
    """SGLang applies --api-key only with one tokenizer worker, and our registry lives in one process: refuse
    any other mode at startup, in one line."""
    workers = getattr(server_args, "tokenizer_worker_num", 1) or 1
    if workers != 1:
        raise SystemExit(f"sglang-microturn: cannot start: --tokenizer-worker-num {workers}: the /microturn API "
                         "needs 1 (SGLang applies --api-key in single-tokenizer mode only, and the session "
                         "registry lives in one process); drop the flag")


def add_routes(app, backend: Callable[[], Backend] = _sglang_backend) -> MicroTurnAPI:
    api = MicroTurnAPI(backend)
    mount(app, api)
    return api


def install() -> str:
    """Register the routes and the warm-up that drives them (HTTP server process only: scheduler processes
    serve no HTTP)."""
    if multiprocessing.parent_process() is not None:
        return "microturn API (HTTP process only)"
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_microturn.server import realtime_warmup
    api = MicroTurnAPI(_sglang_backend)  # the backend resolves on first use; a bad setting raises SettingError
    api.reap_in_background = True
    config.value(config.MAX_BODY_BYTES)

    def before_http_launch(*args, **kwargs):
        server_args = kwargs.get("server_args", args[0] if args else None)
        require_single_tokenizer(server_args)
        from sglang.srt.entrypoints import http_server

        mount(http_server.app, api, ws_transport.api_key_check(getattr(server_args, "api_key", None),
                                                               getattr(server_args, "admin_api_key", None)))

    warmup = realtime_warmup.install(lambda: api)  # before registering: a bad setting registers nothing
    HookRegistry.register("sglang.srt.entrypoints.http_server.launch_server", before_http_launch, HookType.BEFORE)
    return (f"HTTP API {PREFIX}/{{open,append,cancel,close,sessions}}, WebSocket {protocol.WS_PATH}, console "
            f"{console_page.PATH}; {warmup}")
