"""A stand-in for SGLang's HTTP process, for tests of the /microturn API and of its clients without SGLang's
scheduler: `FakeTokenizerManager` keeps, per session, the length SGLang's scheduler would hold and answers
appends the way SGLang's streaming sessions do (prompt_tokens = the whole session length); `app_for` mounts an
API on a FastAPI app; `serve_on_loopback` runs that app under uvicorn on a free port for real HTTP clients.

Turns SGLang aborts end the way SGLang ends them: the scheduler's `FINISH_ABORT` (SGLang's class, with the
status the scheduler gives it) goes through SGLang's own `TokenizerManager._handle_abort_finish_reason`, which
raises ValueError for a 400 and an HTTPException for a 503 / 500, and returns the output otherwise.
"""

import ast
import asyncio
import contextlib
import functools
import importlib.util
import threading
import time
from dataclasses import asdict
from http import HTTPStatus
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import uvicorn
from fastapi import FastAPI

from sglang_microturn.cli.server_process import free_port
from sglang_microturn.format.layout import LayoutSpec
from sglang_microturn.server.routes import mount

VOCAB = 1000
BOS = 0


class FakeTokenizerManager:
    def __init__(self):
        # what SGLang's ModelConfig holds: the vocabulary, and config.json (the default checkpoint's layout)
        self.model_config = SimpleNamespace(vocab_size=VOCAB, hf_config=SimpleNamespace(
            microturn_layout=asdict(LayoutSpec())))
        self.tokenizer = SimpleNamespace(bos_token_id=BOS)
        self.lengths: dict[str, int] = {}  # the scheduler's committed length per session
        self.closed_lengths: list[int] = []  # lengths of sessions at close
        self.timeouts: dict[str, float] = {}
        self.hold = None  # a threading.Event: appends wait for it (or an abort) before finishing
        self.aborted: set[str] = set()
        self.finish_now: set[str] = set()  # rids told to stop and keep their output (patch 0012)
        self.running = threading.Event()
        self.abort_next = None  # (message, HTTPStatus or None): the next turn ends with this FINISH_ABORT
        self.closed_by_sglang: list[str] = []
        # what TokenizerManager._handle_abort_finish_reason reads of its tokenizer manager
        self.rid_to_state: dict = {}
        self.enable_lora = False

    async def open_session(self, obj):
        self.lengths[obj.session_id] = 0
        self.timeouts[obj.session_id] = obj.timeout
        return obj.session_id

    async def close_session(self, obj, request=None):
        if obj.session_id in self.lengths:
            self.closed_lengths.append(self.lengths.pop(obj.session_id))

    def abort_request(self, rid):
        self.aborted.add(rid)

    @property
    def send_to_scheduler(self):
        """The scheduler's end of SGLang's IPC, for what the API sends there itself (AbortReq(finish_now)):
        decoded as SGLang's scheduler decodes it."""
        fake = self

        class Socket:
            def send_pyobj(self, obj, flags=0, protocol=None):
                fake._to_scheduler(obj)

            def send(self, data, flags=0):
                from sglang.srt.managers.io_struct import msgpack_decode

                fake._to_scheduler(msgpack_decode(data))

        return Socket()

    def _to_scheduler(self, obj):
        from sglang.srt.managers.io_struct import AbortReq

        assert isinstance(obj, AbortReq) and obj.finish_now, obj
        self.finish_now.add(obj.rid)

    async def _sglang_abort(self, obj, message, status):
        """The last output of a turn SGLang's scheduler finished with FINISH_ABORT(message, status), as its
        tokenizer manager hands it on (raises for 400 / 503 / 500, like SGLang)."""
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        reason = FINISH_ABORT(message, status, "BadRequestError" if status == 400 else None).to_json()
        out = self._final(obj, 0, [], reason)
        state = SimpleNamespace(obj=obj)
        returned = await sglang_handle_abort_finish_reason()(self, out, state, obj.stream)
        return out if returned is None else returned

    async def generate_request(self, obj, request=None):
        sid = obj.session_params["id"]
        self.last_sampling_params = obj.sampling_params
        n_out = obj.sampling_params["max_new_tokens"]
        obj.scheduled_at = time.time()
        if sid not in self.lengths:  # Scheduler.handle_generate_request's message for a session it lacks
            yield await self._sglang_abort(obj, f"Invalid request: session id {sid} does not exist",
                                           HTTPStatus.BAD_REQUEST)
            return
        if self.abort_next is not None:  # e.g. a running timeout (503) or /abort_request (no status)
            (message, status), self.abort_next = self.abort_next, None
            yield await self._sglang_abort(obj, message, status)
            return
        self.running.set()
        if self.hold is not None:
            while not self.hold.is_set() and obj.rid not in self.aborted and obj.rid not in self.finish_now:
                await asyncio.sleep(0.005)
        if obj.rid in self.aborted:  # patch 0003: the session rolls back to its committed length
            yield self._final(obj, self.lengths[sid] + len(obj.input_ids), [], {"type": "abort", "message": "Abort"})
            return
        reason = {"type": "length", "length": n_out}
        if obj.rid in self.finish_now:  # stopped after its first token, as a queued turn is (patch 0012)
            n_out, reason = min(n_out, 1), {"type": "cancelled"}
        out = [(7 * (self.lengths[sid] + i)) % VOCAB for i in range(n_out)]
        obj.prefill_done_at = time.time()
        for k in range(1, n_out if obj.stream else 0):
            yield {"output_ids": out[:k], "meta_info": {"finish_reason": None}}
        prompt = self.lengths[sid] + len(obj.input_ids)
        self.lengths[sid] = prompt + n_out
        yield self._final(obj, prompt, out, reason)

    @staticmethod
    def _final(obj, prompt, out, reason):
        # cached: a session turn reuses the whole committed sequence before its input, as SGLang reports it
        cached = max(0, prompt - len(obj.input_ids))
        meta = {"prompt_tokens": prompt, "completion_tokens": len(out), "cached_tokens": cached, "finish_reason": reason,
                # what SGLang adds with --enable-metrics
                "forward_entry_time": obj.scheduled_at, "prefill_finished_time": getattr(obj, "prefill_done_at", None),
                "e2e_latency": 0.002}  # what SGLang always reports: its tokenizer manager's time for the request
        if obj.return_logprob:
            meta["output_token_logprobs"] = [(-1.0, t, None) for t in out]
        return {"output_ids": out, "meta_info": meta}


@functools.cache
def sglang_handle_abort_finish_reason():
    """SGLang's own `TokenizerManager._handle_abort_finish_reason`, its source run verbatim. Not imported:
    importing tokenizer_manager needs uvloop and installs uvloop's event loop policy for the whole process."""
    import fastapi

    path = importlib.util.find_spec("sglang.srt.managers.tokenizer_manager").origin
    tree = ast.parse(Path(path).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TokenizerManager")
    fn = next(n for n in cls.body if isinstance(n, ast.AsyncFunctionDef) and n.name == "_handle_abort_finish_reason")
    namespace = {"HTTPStatus": HTTPStatus, "fastapi": fastapi, "Optional": Optional, "ReqState": object,
                 "TokenizerManager": object}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), namespace)
    return namespace["_handle_abort_finish_reason"]


def app_for(api):
    app = FastAPI()
    mount(app, api)
    return app


@contextlib.contextmanager
def serve_on_loopback(app):
    """Run `app` under uvicorn on 127.0.0.1 (a thread of this process); yields its base URL."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(5)
