"""The /microturn API's handlers: each takes a parsed request (server/api_requests.py), runs it against
SGLang's tokenizer manager and the session registry, and returns the JSON reply or raises a domain error
(server/session_registry.py; sglang_microturn/protocol.py gives each its HTTP status). server/routes.py
serves them over HTTP:

    POST /microturn/open                {output_budget?, stop_ids?, idle_timeout?, temperature?, ignore_eos?,
                                         seed?, deadline_ms?}
                                        -> {session_id}
    POST /microturn/append              {session_id, input_ids, output_budget?, return_logprob?, expected_length?}
                                        -> {output_ids, committed_length, finish_reason, timestamps, ...}
                                        or {session_id, input: {audio?, text?}, ...}: the server encodes the
                                        micro-turn (server/layout_turns.py); the reply adds input_ids, output
    POST /microturn/cancel              {session_id} -> {cancelled}: the running micro-turn stops generating
                                        and its append returns what it generated (barge-in)
    POST /microturn/close               {session_id}  (idempotent)
    GET  /microturn/sessions/{id}       -> {state, length, appends, in_flight, last_activity}; ?tokens=1 adds
                                           the committed sequence

Each append is one SGLang streaming-session turn (`/generate` with `session_params`), so plain SGLang clients
(`/open_session` + `/generate`) use the same machinery. SGLang's verdict on a turn is read in one place,
`decode_turn`.

If the client disconnects mid-append, the turn is aborted and the session rolls back to its last committed
length (patch 0003); the registry commits an append only when SGLang reports it finished.

The registry is the only idle timer of a /microturn session (SGLang's session is opened without a timeout, so
the two can never disagree and a long turn is never reaped underneath); a reaper task sweeps every second
whether or not calls arrive. Other routes cannot change a /microturn session behind the registry's back:
`guard_tokenizer_manager` makes SGLang's own `/close_session` (and the Engine's) close it in the registry too,
and refuses `/generate` / `/v1/completions` / `/v1/chat/completions` turns whose `session_params` name it
(they would bypass the registry's checks and budget).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from starlette.exceptions import HTTPException

from sglang_microturn import config
from sglang_microturn.server.api_requests import parse_append, parse_open, parse_session_call
from sglang_microturn.server.layout_turns import LayoutTurns, layout_of
from sglang_microturn.server.realtime_admission import AdmissionGuard, AdmissionRefused, settings_from_env
from sglang_microturn.server.realtime_deadlines import DuplexMetrics
from sglang_microturn.server.session_registry import (
    BadRequest,
    MicroTurnError,
    OverCapacity,
    ServerError,
    SessionGone,
    SessionRegistry,
    TurnAborted,
    shown,
)

logger = logging.getLogger(__name__)

REAP_INTERVAL_S = 1.0  # how often the reaper task sweeps when no call does


@dataclass
class Backend:
    """What the API needs from SGLang's HTTP process: the tokenizer manager, the scheduler's KV pool size and
    its req_to_token_pool rows (None where SGLang does not report them: no session cap is derived)."""

    tokenizer_manager: object
    max_total_num_tokens: int
    req_to_token_rows: int | None = None


def session_cap(rows: int | None) -> int | None:
    """MICROTURN_MAX_SESSIONS, or by default the pool's rows minus an eighth (at least one row) kept for plain
    requests; never more than rows - 1, so a plain request can always be admitted. None: no cap known."""
    explicit = config.value(config.MAX_SESSIONS)
    if rows is None:
        return explicit
    most = max(1, rows - 1)
    return min(explicit, most) if explicit is not None else max(1, rows - max(1, rows // 8))


def registry_for(backend: Backend) -> SessionRegistry:
    tm = backend.tokenizer_manager
    kv_tokens = config.value(config.SESSION_KV_TOKENS)
    if kv_tokens is None:
        kv_tokens = int(backend.max_total_num_tokens * config.value(config.SESSION_KV_FRACTION))
    tokenizer = getattr(tm, "tokenizer", None)
    return SessionRegistry(
        kv_budget_tokens=kv_tokens,
        vocab_size=tm.model_config.vocab_size,
        max_chunk_tokens=config.value(config.MAX_CHUNK_TOKENS),
        bos_id=getattr(tokenizer, "bos_token_id", None),
        max_sessions=session_cap(backend.req_to_token_rows),
        grace_s=config.value(config.CLOSED_GRACE_S),
    )


class Verdict(enum.Enum):
    FINISHED = "finished"  # the turn ran: commit its input and output
    DISCONNECTED = "disconnected"  # we aborted it because the client left; the session rolled back
    SESSION_GONE = "session gone"  # SGLang no longer has the session (closed or timed out there)
    REFUSED = "refused"  # SGLang refused the request (400, e.g. past the context length); nothing ran
    ABORTED = "aborted"  # SGLang aborted it for another reason (503 / 500 / none); the session rolled back


# SGLang's scheduler rejects a turn whose session it no longer has with one of these messages
# (Scheduler.handle_generate_request; tests/server/test_http_api.py checks they are still there).
SESSION_GONE_MESSAGES = ("does not exist", "close was requested")


def decode_turn(final: dict, disconnected: bool, session_id: str = "") -> tuple[Verdict, str, int | None]:
    """SGLang's verdict on one streaming-session turn of `session_id`, from its last output: (verdict, SGLang's
    message, its status). The only place that reads SGLang's abort reasons."""
    reason = final["meta_info"].get("finish_reason") or {}
    if reason.get("type") != "abort":
        return Verdict.FINISHED, "", None
    message = reason.get("message") or "aborted"
    status = reason.get("status_code")
    status = None if status is None else int(status)
    if disconnected:
        return Verdict.DISCONNECTED, message, status
    if session_id in message and any(m in message for m in SESSION_GONE_MESSAGES):
        return Verdict.SESSION_GONE, message, status
    if status == 400:
        return Verdict.REFUSED, message, status
    return Verdict.ABORTED, message, status


def finish_now(tokenizer_manager, rid: str) -> None:
    """Tell the scheduler to stop request `rid` and keep its output (AbortReq(finish_now=True), patch 0012),
    sent the way the tokenizer manager sends its aborts. Not `abort_request`: that marks the request aborted."""
    from sglang.srt.managers.io_struct import AbortReq, sock_send

    sock_send(tokenizer_manager.send_to_scheduler, AbortReq(rid=rid, finish_now=True))


def final_of_raised(error: Exception) -> dict:
    """The last output SGLang's tokenizer manager would have returned for a non-streamed turn it ended by
    raising instead (`TokenizerManager._handle_abort_finish_reason`: ValueError for a 400 abort, an
    HTTPException for 503 / 500), so `decode_turn` reads every verdict."""
    status = getattr(error, "status_code", 400)
    message = getattr(error, "detail", None) or str(error)
    return {"meta_info": {"finish_reason": {"type": "abort", "message": message, "status_code": status}}}


def _session_ids_of(obj) -> list[str]:
    params = getattr(obj, "session_params", None)
    if params is None:
        return []
    items = params if isinstance(params, list) else [params]
    return [p.get("id") if isinstance(p, dict) else getattr(p, "id", None) for p in items if p is not None]


def guard_tokenizer_manager(tm, registry: SessionRegistry, on_close: Callable[[str], None]):
    """Make `tm`'s own entry points respect /microturn sessions; returns the unguarded (generate_request,
    close_session) the API itself calls. O(1) per request: one dict lookup when session_params is set."""
    generate_request, close_session = tm.generate_request, tm.close_session

    def guarded_generate(obj, request=None):
        ours = [sid for sid in _session_ids_of(obj) if isinstance(sid, str) and registry.knows(sid)]
        if ours:
            async def refused():
                raise ValueError(f"session {shown(ours[0])} is a /microturn session: append to it with POST "
                                 "/microturn/append (a plain /generate turn would bypass its checks and budget)")
                yield  # an async generator, like generate_request

            return refused()
        return generate_request(obj, request)

    async def guarded_close(obj, request=None):
        sid = getattr(obj, "session_id", None)
        if isinstance(sid, str) and sid in registry.sessions:
            on_close(sid)
        return await close_session(obj, request)

    tm.generate_request, tm.close_session = guarded_generate, guarded_close
    return generate_request, close_session


class MicroTurnAPI:
    """Route handlers. `backend` is resolved on first use: SGLang creates the tokenizer manager after the
    routes are registered."""

    def __init__(self, backend: Callable[[], Backend]):
        self._backend_factory = backend
        self._backend: Backend | None = None
        self._registry: SessionRegistry | None = None
        self._metrics: DuplexMetrics | None = None
        self._layout_turns: LayoutTurns | None = None
        self._reaper: asyncio.Task | None = None
        self.reap_in_background = False  # the server sets it (routes.install); tests drive sweeps themselves
        self.admission = AdmissionGuard(settings_from_env())
        self.deadline_ms = config.value(config.DEADLINE_MS)
        self.idle_timeout_s = config.value(config.IDLE_TIMEOUT_S) or None  # 0: never expire
        config.value(config.CLOSED_GRACE_S), config.value(config.MAX_SESSIONS)  # a bad value stops startup

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
            registry = registry_for(self.backend)
            self._generate, self._close_in_sglang = guard_tokenizer_manager(
                self.backend.tokenizer_manager, registry, lambda sid: registry.close(sid))
            self._registry = registry
        return self._registry

    async def sweep(self) -> None:
        """Close, in SGLang too, the sessions idle past their timeout and drop retired records past their grace
        (runs at the start of every call and every REAP_INTERVAL_S in the reaper task; O(what expires))."""
        from sglang.srt.managers.io_struct import CloseSessionReqInput

        if self.reap_in_background and (self._reaper is None or self._reaper.done()):
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())
        for session in self.registry.sweep_idle():
            await self._close_in_sglang(CloseSessionReqInput(session_id=session.session_id))

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            try:
                await self.sweep()
            except Exception:  # keep reaping; the next call's sweep reports the same failure to its client
                logger.exception("microturn: idle sweep failed")

    async def open(self, body: dict) -> dict:
        from sglang.srt.managers.io_struct import OpenSessionReqInput

        options = parse_open(body, self.registry.vocab_size, self.deadline_ms, self.idle_timeout_s)
        try:
            self.admission.check_open(time.monotonic(), self.registry.open_sessions)
        except AdmissionRefused as e:
            raise OverCapacity(e.message, e.retry_after_s) from None
        session = self.registry.open(options)
        try:
            # No SGLang timeout: the registry is the session's only idle timer (SGLang's would start at turn
            # arrival, ours at turn end, and could reap a long turn's session underneath us).
            opened = await self.backend.tokenizer_manager.open_session(
                OpenSessionReqInput(capacity_of_str_len=0, session_id=session.session_id, streaming=True,
                                    timeout=None)
            )
        except BaseException:
            self.registry.close(session.session_id)
            raise
        if opened is None:
            self.registry.close(session.session_id)
            raise MicroTurnError(f"SGLang refused to open session {session.session_id}")
        return {"session_id": session.session_id, "kv_budget_free": self.registry.kv_budget_tokens
                - self.registry.used_tokens()}

    @property
    def layout_turns(self) -> LayoutTurns:
        if self._layout_turns is None:
            self._layout_turns = LayoutTurns(layout_of(self.backend.tokenizer_manager))
        return self._layout_turns

    async def append(self, body: dict, wait_disconnect: Callable[[], object] | None = None) -> dict:
        received = time.time()
        request = parse_append(body)
        session_id, input_ids, output_budget = request.session_id, request.input_ids, request.output_budget
        built = None
        if request.layout_input is not None:  # audio / text: the server builds the ids (server/layout_turns.py)
            output_budget = self.layout_turns.output_budget(output_budget)
            session = self.registry.get(session_id)
            built = self.layout_turns.build(session.front_end, session.last_output if session.appends else None,
                                            session.appends, request.layout_input)
            input_ids = built.input_ids
        session, budget = self.registry.begin_append(session_id, input_ids, output_budget, request.expected_length)
        try:
            final, disconnected = await self._run_turn(session, input_ids, budget, request.return_logprob,
                                                       wait_disconnect)
        except (ValueError, HTTPException) as e:  # SGLang's verdict, raised instead of returned
            final, disconnected = final_of_raised(e), False
        except BaseException:
            self.registry.abandon(session)
            raise
        meta = final["meta_info"]
        reason = meta.get("finish_reason") or {}
        verdict, message, status = decode_turn(final, disconnected, session_id)
        if verdict is not Verdict.FINISHED:
            self.registry.abandon(session)
            if verdict is Verdict.DISCONNECTED:
                return {"aborted": True, "message": "client disconnected; the session rolled back"}
            if verdict is Verdict.SESSION_GONE:
                self.registry.lose(session)  # its budget is released; every later call gets 410
                raise SessionGone(f"session {session_id} no longer exists on the server: {message}")
            if verdict is Verdict.REFUSED:
                raise BadRequest(f"SGLang refused the append: {message}")
            if status is not None and status >= 500 and status != 503:
                raise ServerError(f"the server failed the append ({status}): {message}; the session rolled back")
            raise TurnAborted(f"the server aborted the append: {message}; the session rolled back to "
                              f"{len(session.tokens)} tokens, retry it")
        output_ids = list(final.get("output_ids") or [])
        self.registry.commit(session, input_ids, output_ids)
        said = None
        if built is not None:
            said = self.layout_turns.output(built.front_end, output_ids)
            session.front_end = built.front_end
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
            # SGLang's own time for the turn, its tokenizer manager's receipt to the finish: the rest of the
            # client's latency is HTTP and this API.
            "sglang_latency_s": meta.get("e2e_latency"),
        }
        if said is not None:
            out["input_ids"] = input_ids  # what the server built: the client can rebuild the sequence
            out["output"] = said
        if request.return_logprob:
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
        session.running_rid = rid

        async def consume():
            nonlocal final
            async for out in self._generate(obj, None):
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
            session.running_rid = None
            if watcher is not None:
                watcher.cancel()
        if final is None:
            raise MicroTurnError("SGLang returned no output for the append")
        return final, disconnected

    async def cancel(self, body: dict) -> dict:
        """Barge-in: the session's running micro-turn stops generating (patch 0012); its append then returns
        normally with what it generated (finish_reason {"type": "cancelled"}), all of it committed. A turn
        still queued runs its prefill and stops after one token. Nothing running: cancelled false."""
        session_id = parse_session_call(body, "a cancel")
        session = self.registry.get_open(session_id)
        rid = session.running_rid
        if rid is not None:
            finish_now(self.backend.tokenizer_manager, rid)
        return {"session_id": session_id, "cancelled": rid is not None}

    async def close(self, body: dict) -> dict:
        from sglang.srt.managers.io_struct import CloseSessionReqInput

        session_id = parse_session_call(body, "a close")
        registry = self.registry
        session, closed_now = registry.close(session_id)
        if closed_now:
            await self._close_in_sglang(CloseSessionReqInput(session_id=session_id))
        state = session.state if session is not None else registry.tombstones[session_id]
        return {"session_id": session_id, "state": state.value, "already_closed": not closed_now}

    def status(self, session_id: str, with_tokens: bool) -> dict:
        return self.registry.get(session_id).describe(with_tokens)
