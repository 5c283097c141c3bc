"""The /microturn HTTP API, served by SGLang's own FastAPI app in the HTTP server process.

    POST /microturn/open                {output_budget?, stop_ids?, idle_timeout?, temperature?, ignore_eos?,
                                         seed?}
                                        -> {session_id}
    POST /microturn/append              {session_id, input_ids, output_budget?, return_logprob?, expected_length?}
                                        -> {output_ids, committed_length, finish_reason, timestamps, ...}
    POST /microturn/close               {session_id}  (idempotent)
    GET  /microturn/sessions/{id}       -> {state, length, appends, in_flight, last_activity}; ?tokens=1 adds
                                           the committed sequence

Each append is one SGLang streaming-session turn (`/generate` with `session_params`), so plain SGLang clients
(`/open_session` + `/generate`) use the same machinery. Errors are JSON `{"error": {"code", "message"}}` with
400 (bad input), 404 (unknown session), 409 (an append already in flight), 410 (closed or expired session),
412 (`expected_length` is not the committed length), 429 (KV budget exhausted). Routes sit behind SGLang's API-key middleware like SGLang's own.

If the client disconnects mid-append, the turn is aborted and the session rolls back to its last committed
length (patch 0003); the registry commits an append only when SGLang reports it finished.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, Router

from sglang_microturn.realtime_admission import AdmissionGuard, AdmissionRefused, settings_from_env
from sglang_microturn.realtime_deadlines import DuplexMetrics
from sglang_microturn.session_registry import (
    BadRequest,
    MicroTurnError,
    OverCapacity,
    SessionGone,
    SessionOptions,
    SessionRegistry,
)

logger = logging.getLogger(__name__)

PREFIX = "/microturn"
ENV_KV_TOKENS = "MICROTURN_SESSION_KV_TOKENS"  # KV budget for all sessions, in tokens
ENV_KV_FRACTION = "MICROTURN_SESSION_KV_FRACTION"  # ... or this fraction of SGLang's KV pool (default 0.9)
ENV_MAX_CHUNK = "MICROTURN_MAX_CHUNK_TOKENS"  # largest input block of one micro-turn (default 512)
ENV_DEADLINE_MS = "MICROTURN_DEADLINE_MS"  # default micro-turn deadline of a session (default 200)
# SGLang's own idle timeout for our sessions: a backstop that frees KV if no API call sweeps (we close expired
# sessions ourselves on the next call); later than ours, so the scheduler never drops a session we show open.
SCHEDULER_TIMEOUT_GRACE_S = 30.0
# SGLang's scheduler rejects a turn whose session it no longer has with one of these messages.
_SESSION_GONE_MESSAGES = ("does not exist", "close was requested")


@dataclass
class Backend:
    """What the API needs from SGLang's HTTP process: the tokenizer manager and the scheduler's pool size."""

    tokenizer_manager: object
    max_total_num_tokens: int


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return default if raw is None else int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def registry_for(backend: Backend) -> SessionRegistry:
    tm = backend.tokenizer_manager
    budget = os.environ.get(ENV_KV_TOKENS)
    if budget is not None:
        kv_tokens = _int_env(ENV_KV_TOKENS, 0)
    else:
        fraction = float(os.environ.get(ENV_KV_FRACTION, "0.9"))
        kv_tokens = int(backend.max_total_num_tokens * fraction)
    tokenizer = getattr(tm, "tokenizer", None)
    return SessionRegistry(
        kv_budget_tokens=kv_tokens,
        vocab_size=tm.model_config.vocab_size,
        max_chunk_tokens=_int_env(ENV_MAX_CHUNK, 512),
        bos_id=getattr(tokenizer, "bos_token_id", None),
    )


# ------------------------------------------------------------------------------------------ request parsing


def _field(body: dict, name: str, kind: type | tuple, default=None, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise BadRequest(f"missing field {name!r}")
        return default
    value = body[name]
    if isinstance(value, bool) and kind is not bool:  # bool is an int in Python; never accept it as one
        raise BadRequest(f"field {name!r} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise BadRequest(f"field {name!r} must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind) -> str:
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", bool: "true or false"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _int_list(body: dict, name: str, required: bool) -> list[int]:
    values = _field(body, name, list, default=[], required=required)
    if values and set(map(type, values)) != {int}:  # C loops, as this runs on every append; bool is no int here
        bad = next(v for v in values if type(v) is not int)
        raise BadRequest(f"field {name!r} must be a list of integers, found {bad!r}")
    return values


def _non_negative(value, name: str):
    if value is not None and value < 0:
        raise BadRequest(f"field {name!r} must be >= 0, got {value}")
    return value


def default_deadline_ms() -> float:
    raw = os.environ.get(ENV_DEADLINE_MS, "200")
    try:
        ms = float(raw)
    except ValueError:
        ms = -1.0
    if not 0 < ms <= MAX_DEADLINE_MS:
        raise ValueError(f"{ENV_DEADLINE_MS}={raw!r}: want milliseconds in (0, {MAX_DEADLINE_MS}]")
    return ms


MAX_DEADLINE_MS = 60_000


def parse_open(body: dict, vocab_size: int, deadline_ms: float = 200.0) -> SessionOptions:
    deadline_ms = _field(body, "deadline_ms", (int, float), default=deadline_ms)
    if not 0 < deadline_ms <= MAX_DEADLINE_MS:
        raise BadRequest(f"field 'deadline_ms' must be in (0, {MAX_DEADLINE_MS}] milliseconds, got {deadline_ms}")
    options = SessionOptions(
        output_budget=_non_negative(_field(body, "output_budget", int, default=SessionOptions.output_budget),
                                    "output_budget"),
        stop_ids=tuple(_int_list(body, "stop_ids", required=False)),
        idle_timeout_s=_field(body, "idle_timeout", (int, float)),
        temperature=float(_non_negative(_field(body, "temperature", (int, float), default=0.0), "temperature")),
        ignore_eos=_field(body, "ignore_eos", bool, default=False),
        seed=_non_negative(_field(body, "seed", int), "seed"),
        deadline_s=deadline_ms / 1e3,
    )
    if options.seed is not None and options.seed >= 1 << 63:
        raise BadRequest(f"field 'seed' must be < 2**63 (SGLang keeps seeds as int64), got {options.seed}")
    if options.idle_timeout_s is not None and options.idle_timeout_s <= 0:
        raise BadRequest(f"field 'idle_timeout' must be > 0 seconds, got {options.idle_timeout_s}")
    bad = next((t for t in options.stop_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise BadRequest(f"stop id {bad} is outside the vocabulary [0, {vocab_size})")
    return options


# ------------------------------------------------------------------------------------------ the API


class MicroTurnAPI:
    """Route handlers. `backend` is resolved on first use: SGLang creates the tokenizer manager after the
    routes are registered."""

    def __init__(self, backend: Callable[[], Backend]):
        self._backend_factory = backend
        self._backend: Backend | None = None
        self._registry: SessionRegistry | None = None
        self._metrics: DuplexMetrics | None = None
        self.admission = AdmissionGuard(settings_from_env())
        self.deadline_ms = default_deadline_ms()

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = self._backend_factory()
        return self._backend

    @property
    def metrics(self) -> DuplexMetrics:
        if self._metrics is None:
            self._metrics = DuplexMetrics(bool(getattr(self.backend.tokenizer_manager, "enable_metrics", False)))
        return self._metrics

    @property
    def registry(self) -> SessionRegistry:
        if self._registry is None:
            self._registry = registry_for(self.backend)
        return self._registry

    async def sweep(self) -> None:
        """Close, in SGLang too, the sessions idle past their timeout (runs at the start of every call)."""
        from sglang.srt.managers.io_struct import CloseSessionReqInput

        for session in self.registry.sweep_idle():
            await self.backend.tokenizer_manager.close_session(CloseSessionReqInput(session_id=session.session_id))

    async def open(self, body: dict) -> dict:
        from sglang.srt.managers.io_struct import OpenSessionReqInput

        options = parse_open(body, self.registry.vocab_size, self.deadline_ms)
        try:
            self.admission.check_open(time.monotonic(), self.registry.open_sessions)
        except AdmissionRefused as e:
            raise OverCapacity(e.message, e.retry_after_s) from None
        timeout = None if options.idle_timeout_s is None else options.idle_timeout_s + SCHEDULER_TIMEOUT_GRACE_S
        session = self.registry.open(options)
        try:
            opened = await self.backend.tokenizer_manager.open_session(
                OpenSessionReqInput(capacity_of_str_len=0, session_id=session.session_id, streaming=True,
                                    timeout=timeout)
            )
        except BaseException:
            self.registry.close(session.session_id)
            raise
        if opened is None:
            self.registry.close(session.session_id)
            raise MicroTurnError(f"SGLang refused to open session {session.session_id}")
        return {"session_id": session.session_id, "kv_budget_free": self.registry.kv_budget_tokens
                - self.registry.used_tokens()}

    async def append(self, body: dict, wait_disconnect: Callable[[], object] | None = None) -> dict:
        received = time.time()
        session_id = _field(body, "session_id", str, required=True)
        input_ids = _int_list(body, "input_ids", required=True)
        session = self.registry.get(session_id)
        budget = _non_negative(_field(body, "output_budget", int, default=session.options.output_budget),
                               "output_budget")
        return_logprob = _field(body, "return_logprob", bool, default=False)
        expected = _non_negative(_field(body, "expected_length", int), "expected_length")
        session = self.registry.begin_append(session_id, input_ids, budget, expected)
        try:
            outcome = await self._run_turn(session, input_ids, budget, return_logprob, wait_disconnect)
        except BaseException:
            self.registry.abandon(session)
            raise
        final, disconnected = outcome
        meta = final["meta_info"]
        reason = meta.get("finish_reason") or {}
        if reason.get("type") == "abort":
            self.registry.abandon(session)
            message = reason.get("message") or "aborted"
            if disconnected:
                return {"aborted": True, "message": "client disconnected; the session rolled back"}
            if any(m in message for m in _SESSION_GONE_MESSAGES):
                self.registry.close(session_id)
                raise SessionGone(f"session {session_id} no longer exists on the server: {message}")
            raise MicroTurnError(f"append aborted by the server: {message}")
        output_ids = list(final.get("output_ids") or [])
        self.registry.commit(session, input_ids, output_ids)
        done = time.time()
        latency = done - received
        lateness, change = session.deadline.record(latency)
        self.admission.observe(time.monotonic(), latency, session.deadline.deadline_s)
        self.metrics.observe(latency, lateness, change)
        server_len = meta["prompt_tokens"] + meta["completion_tokens"]
        if server_len != len(session.tokens):
            logger.error("microturn session %s: server length %d != committed %d", session_id, server_len,
                         len(session.tokens))
        out = {
            "session_id": session_id,
            "output_ids": output_ids,
            "committed_length": len(session.tokens),
            "server_length": server_len,
            "cached_tokens": meta.get("cached_tokens"),
            "finish_reason": reason,
            # scheduled / first_token: when SGLang's scheduler launched the turn's first forward / finished
            # it (the first output token exists then); SGLang reports both only with --enable-metrics (its
            # scheduler time stats), else null.
            "timestamps": {"received": received, "scheduled": meta.get("forward_entry_time"),
                           "first_token": meta.get("prefill_finished_time") if output_ids else None,
                           "done": done},
        }
        if return_logprob:
            out["output_logprobs"] = [lp[0] for lp in meta.get("output_token_logprobs") or []]
        return out

    async def _run_turn(self, session, input_ids, budget, return_logprob, wait_disconnect):
        """Run one SGLang streaming-session turn. Returns (final output, disconnected)."""
        from sglang.srt.managers.io_struct import GenerateReqInput

        opts = session.options
        rid = uuid.uuid4().hex
        obj = GenerateReqInput(
            rid=rid,
            input_ids=list(input_ids),
            session_params={"id": session.session_id},
            sampling_params={
                "max_new_tokens": budget,
                "temperature": opts.temperature,
                "stop_token_ids": list(opts.stop_ids),
                "skip_special_tokens": False,
                "no_stop_trim": True,  # a stop id the model emitted is part of the sequence: return it
                "ignore_eos": opts.ignore_eos,
                "sampling_seed": opts.seed,
            },
            return_logprob=return_logprob,
            # Not streamed: a streamed request makes the scheduler send every decode step's token through the
            # detokenizer to us (one IPC hop per token); a micro-turn only needs its whole output.
            stream=False,
        )
        tm = self.backend.tokenizer_manager
        final = None

        async def consume():
            nonlocal final
            async for out in tm.generate_request(obj, None):
                final = out

        turn = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(wait_disconnect()) if wait_disconnect else None
        disconnected = False
        try:
            if watcher is not None:
                await asyncio.wait({turn, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if watcher.done() and not turn.done():
                    # The client is gone: abort, then still wait for SGLang's verdict (finished or rolled back).
                    disconnected = True
                    tm.abort_request(rid)
            await turn
        finally:
            if watcher is not None:
                watcher.cancel()
        if final is None:
            raise MicroTurnError("SGLang returned no output for the append")
        return final, disconnected

    async def close(self, body: dict) -> dict:
        from sglang.srt.managers.io_struct import CloseSessionReqInput

        session_id = _field(body, "session_id", str, required=True)
        session, closed_now = self.registry.close(session_id)
        if closed_now:
            await self.backend.tokenizer_manager.close_session(CloseSessionReqInput(session_id=session_id))
        return {"session_id": session_id, "state": session.state.value, "already_closed": not closed_now}

    def status(self, session_id: str, with_tokens: bool) -> dict:
        return self.registry.get(session_id).describe(with_tokens)


# ------------------------------------------------------------------------------------------ FastAPI wiring


class MicroTurnFront:
    """ASGI middleware that serves /microturn/* from our own four-route router; every other request goes on to
    SGLang's FastAPI app unchanged.

    Why not `app.include_router`: FastAPI matches a request against SGLang's whole route table (~150 routes)
    and runs its per-route machinery; profiled on an H200 at 640 appends/s, routing and FastAPI's request
    handling took about a quarter of the HTTP process, the process that sets the real-time capacity. Added
    with `app.add_middleware` before the server starts, it sits inside Starlette's error middleware (an
    uncaught exception is still a 500) and inside every middleware SGLang adds at launch, its API-key check
    included (`launch_server` adds that after our BEFORE hook has run)."""

    def __init__(self, app, router: Router):
        self.app = app
        # The CORS policy SGLang's app gives its own routes (sglang.srt.entrypoints.http_server), so a browser
        # page on another origin reaches /microturn as it reaches /generate.
        self.router = CORSMiddleware(router, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                                     allow_headers=["*"])

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _route_path(scope).startswith(PREFIX + "/"):
            return await self.app(scope, receive, send)
        try:
            await self.router(scope, receive, send)
        except HTTPException as e:  # Starlette's method-not-allowed; FastAPI's handlers sit past us
            await _error(e.status_code, f"{scope['method']} {scope['path']}: {e.detail}")(scope, receive, send)


def _route_path(scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message}}, status_code=status, headers=headers)


def build_router(api: MicroTurnAPI) -> Router:
    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        return body

    async def guarded(handler, *args):
        try:
            await api.sweep()
            return JSONResponse(await handler(*args))
        except OverCapacity as e:
            return _error(e.status, e.message, {"Retry-After": str(e.retry_after_s)})
        except MicroTurnError as e:
            return _error(e.status, e.message)
        except ValueError as e:  # SGLang's own request validation (e.g. context length)
            return _error(400, str(e))

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

    async def status(request: Request):
        async def run():
            tokens = request.query_params.get("tokens", "0").lower() in ("1", "true", "yes", "on")
            return api.status(request.path_params["session_id"], tokens)

        return await guarded(run)

    async def _with_body(request, handler):
        return await handler(await json_body(request))

    async def not_found(scope, receive, send):
        await _error(404, f"no micro-turn route {scope['method']} {scope['path']}")(scope, receive, send)

    return Router(routes=[
        Route(f"{PREFIX}/open", open_session, methods=["POST"]),
        Route(f"{PREFIX}/append", append, methods=["POST"]),
        Route(f"{PREFIX}/close", close, methods=["POST"]),
        Route(f"{PREFIX}/sessions/{{session_id}}", status, methods=["GET"]),
    ], default=not_found)


def mount(app, api: MicroTurnAPI) -> None:
    """Serve `api` in front of `app` (a Starlette/FastAPI app that has not started yet)."""
    app.add_middleware(MicroTurnFront, router=build_router(api))


def _sglang_backend() -> Backend:
    from sglang.srt.entrypoints.http_server import get_global_state

    state = get_global_state()
    return Backend(state.tokenizer_manager, int(state.scheduler_info["max_total_num_tokens"]))


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

    from sglang_microturn import realtime_warmup

    try:
        api = MicroTurnAPI(_sglang_backend)  # the backend resolves on first use, once SGLang has built it
    except ValueError as e:  # a bad setting; SystemExit because SGLang's plugin loader only logs exceptions
        raise SystemExit(f"sglang-microturn: {e}") from None

    def before_http_launch(*args, **kwargs):
        from sglang.srt.entrypoints import http_server

        mount(http_server.app, api)

    warmup = realtime_warmup.install(lambda: api)  # before registering: a bad setting registers nothing
    HookRegistry.register("sglang.srt.entrypoints.http_server.launch_server", before_http_launch, HookType.BEFORE)
    return f"HTTP API {PREFIX}/{{open,append,close,sessions}}; {warmup}"
