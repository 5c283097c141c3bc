"""The /microturn API's handlers: each takes a parsed request (server/api_requests.py), runs it against
SGLang's tokenizer manager and the session registry, and returns the JSON reply or raises a domain error
(server/session_registry.py; sglang_microturn/protocol.py gives each its HTTP status). server/routes.py
serves them over HTTP:

    POST /microturn/open                {output_budget?, stop_ids?, idle_timeout?, temperature?, ignore_eos?,
                                         seed?, deadline_ms?}
                                        -> {session_id}
    POST /microturn/append              {session_id, input_ids, output_budget?, return_logprob?, expected_length?}
                                        -> {output_ids, committed_length, finish_reason, timestamps, ...}
    POST /microturn/close               {session_id}  (idempotent)
    GET  /microturn/sessions/{id}       -> {state, length, appends, in_flight, last_activity}; ?tokens=1 adds
                                           the committed sequence

Each append is one SGLang streaming-session turn (`/generate` with `session_params`), so plain SGLang clients
(`/open_session` + `/generate`) use the same machinery. SGLang's verdict on a turn is read in one place,
`decode_turn`.

If the client disconnects mid-append, the turn is aborted and the session rolls back to its last committed
length (patch 0003); the registry commits an append only when SGLang reports it finished.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sglang_microturn import config
from sglang_microturn.server.api_requests import parse_append, parse_open, parse_session_id
from sglang_microturn.server.realtime_admission import AdmissionGuard, AdmissionRefused, settings_from_env
from sglang_microturn.server.realtime_deadlines import DuplexMetrics
from sglang_microturn.server.session_registry import (
    MicroTurnError,
    OverCapacity,
    SessionGone,
    SessionRegistry,
)

logger = logging.getLogger(__name__)

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
    )


class Verdict(enum.Enum):
    FINISHED = "finished"  # the turn ran: commit its input and output
    DISCONNECTED = "disconnected"  # we aborted it because the client left; the session rolled back
    SESSION_GONE = "session gone"  # SGLang no longer has the session (closed or timed out there)
    ABORTED = "aborted"  # SGLang aborted it for another reason; the session rolled back


# SGLang's scheduler rejects a turn whose session it no longer has with one of these messages.
_SESSION_GONE_MESSAGES = ("does not exist", "close was requested")


def decode_turn(final: dict, disconnected: bool) -> tuple[Verdict, str]:
    """SGLang's verdict on one streaming-session turn, from its last output: (verdict, SGLang's message).
    The only place that reads SGLang's abort reasons."""
    reason = final["meta_info"].get("finish_reason") or {}
    if reason.get("type") != "abort":
        return Verdict.FINISHED, ""
    message = reason.get("message") or "aborted"
    if disconnected:
        return Verdict.DISCONNECTED, message
    if any(m in message for m in _SESSION_GONE_MESSAGES):
        return Verdict.SESSION_GONE, message
    return Verdict.ABORTED, message


class MicroTurnAPI:
    """Route handlers. `backend` is resolved on first use: SGLang creates the tokenizer manager after the
    routes are registered."""

    def __init__(self, backend: Callable[[], Backend]):
        self._backend_factory = backend
        self._backend: Backend | None = None
        self._registry: SessionRegistry | None = None
        self._metrics: DuplexMetrics | None = None
        self.admission = AdmissionGuard(settings_from_env())
        self.deadline_ms = config.value(config.DEADLINE_MS)

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
        request = parse_append(body)
        session_id, input_ids = request.session_id, request.input_ids
        session, budget = self.registry.begin_append(session_id, input_ids, request.output_budget,
                                                     request.expected_length)
        try:
            final, disconnected = await self._run_turn(session, input_ids, budget, request.return_logprob,
                                                       wait_disconnect)
        except BaseException:
            self.registry.abandon(session)
            raise
        meta = final["meta_info"]
        reason = meta.get("finish_reason") or {}
        verdict, message = decode_turn(final, disconnected)
        if verdict is not Verdict.FINISHED:
            self.registry.abandon(session)
            if verdict is Verdict.DISCONNECTED:
                return {"aborted": True, "message": "client disconnected; the session rolled back"}
            if verdict is Verdict.SESSION_GONE:
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

        session_id = parse_session_id(body)
        session, closed_now = self.registry.close(session_id)
        if closed_now:
            await self.backend.tokenizer_manager.close_session(CloseSessionReqInput(session_id=session_id))
        return {"session_id": session_id, "state": session.state.value, "already_closed": not closed_now}

    def status(self, session_id: str, with_tokens: bool) -> dict:
        return self.registry.get(session_id).describe(with_tokens)
