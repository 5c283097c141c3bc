"""SGLang's real streaming-session objects on CPU, driven through the scheduler's per-request steps.

`SessionRig` owns what a scheduler owns for sessions: a `ReqToTokenPool`, a `TokenToKVPoolAllocator`, a
`RadixCache` wrapped in `StreamingSession`, and a `SessionController`. Its methods replay, for one request
at a time, the calls SGLang 0.5.17 makes (see shared notes, section 1.3): `create_req` on arrival,
`init_next_round_input` + lock + row/KV allocation on admission, `update_finish_state` + `release_kv_cache`
after a forward. No model runs: sampled tokens are supplied by the test.

Callers must hold an installed SGLang runtime context (the `sglang_ctx` fixture in conftest).
"""

from __future__ import annotations

import itertools
from array import array
from types import SimpleNamespace

import torch

VOCAB = 1000
_rids = itertools.count()


class SessionRig:
    def __init__(self, kv_tokens: int = 4096, rows: int = 16, context_len: int = 2048):
        from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
        from sglang.srt.mem_cache.radix_cache import RadixCache
        from sglang.srt.session.session_controller import SessionController
        from sglang.srt.session.streaming_session import StreamingSession

        self.req_to_token_pool = ReqToTokenPool(rows, context_len, device="cpu", enable_memory_saver=False)
        self.allocator = TokenToKVPoolAllocator(kv_tokens, torch.bfloat16, "cpu", kvcache=None, need_sort=False)
        inner = RadixCache(
            CacheInitParams(
                disable=False,
                req_to_token_pool=self.req_to_token_pool,
                token_to_kv_pool_allocator=self.allocator,
                page_size=1,
            )
        )
        self.tree_cache = StreamingSession(inner)
        self.controller = SessionController(self.tree_cache)
        self.free_kv_at_start = self.allocator.available_size()

    # -- session control (Scheduler.open_session / close_session) --

    def open(self, session_id: str, timeout: float | None = None) -> bool:
        from sglang.srt.managers.io_struct import OpenSessionReqInput

        out = self.controller.open(
            OpenSessionReqInput(capacity_of_str_len=0, session_id=session_id, streaming=True, timeout=timeout)
        )
        return out.success

    def close(self, session_id: str) -> None:
        from sglang.srt.managers.io_struct import CloseSessionReqInput

        self.controller.close(CloseSessionReqInput(session_id=session_id))

    # -- one request's life (Scheduler.handle_generate_request -> PrefillAdder -> result processor) --

    def submit(self, session_id: str, input_ids: list[int], max_new_tokens: int, return_logprob: bool = False):
        """Arrival: the session branch of `handle_generate_request` (Session.create_req)."""
        from sglang.srt.managers.io_struct import SessionParams
        from sglang.srt.sampling.sampling_params import SamplingParams

        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
        params.normalize(None)
        recv = SimpleNamespace(
            rid=f"r{next(_rids)}",
            input_ids=array("q", input_ids),  # the tokenizer manager sends array("q")
            session_params=SessionParams(id=session_id),
            sampling_params=params,
            mm_inputs=None,
            lora_id=None,
            custom_logit_processor=None,
            stream=False,
            return_logprob=return_logprob,
            top_logprobs_num=0,
            token_ids_logprob=None,
            return_sampling_mask=False,
            require_reasoning=False,
            return_hidden_states=False,
            return_routed_experts=False,
            routed_experts_start_len=0,
            priority=None,
            routing_key=None,
            extra_key=None,
            http_worker_ipc=None,
            time_stats=None,
        )
        session = self.controller.get(session_id)
        return session.create_req(recv, None, VOCAB)

    def admit(self, req) -> None:
        """Admission into a prefill batch: prefix match (session slot restore), lock, row + KV allocation."""
        from sglang.srt.managers.schedule_batch import ReqKvInfo

        req.init_next_round_input(self.tree_cache)
        prefix_len = len(req.prefix_indices)
        seq_len = len(req.full_untruncated_fill_ids)
        req.set_extend_range(prefix_len, seq_len)
        self.tree_cache.inc_lock_ref(req.last_node)

        [row] = self.req_to_token_pool.alloc([req])
        req.req_pool_idx = row
        locs = self.allocator.alloc(seq_len - prefix_len)
        table = self.req_to_token_pool.req_to_token
        table[row, :prefix_len] = req.prefix_indices.to(table.dtype)
        table[row, prefix_len:seq_len] = locs.to(table.dtype)
        req.kv_committed_len = seq_len
        if req.kv is None:
            req.kv = ReqKvInfo(kv_allocated_len=seq_len, swa_evicted_seqlen=0)
        else:
            req.kv.kv_allocated_len = seq_len

    def admit_with_schedule_batch(self, req):
        """Admission through SGLang's own `ScheduleBatch.prepare_for_extend` (row/KV allocation included);
        returns the batch. Needs TRITON_INTERPRET=1 on CPU (the req_to_token write is a Triton kernel)."""
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        req.init_next_round_input(self.tree_cache)
        req.set_extend_range(len(req.prefix_indices), len(req.full_untruncated_fill_ids))
        self.tree_cache.inc_lock_ref(req.last_node)
        model_config = SimpleNamespace(vocab_size=VOCAB, is_encoder_decoder=False, hf_eos_token_id=None,
                                       is_hybrid_swa=False)
        batch = ScheduleBatch.init_new([req], self.req_to_token_pool, self.allocator, self.tree_cache,
                                       model_config, False, SpeculativeAlgorithm.NONE)
        batch.prepare_for_extend()
        return batch

    def prefill_done(self, req, token: int) -> None:
        """`process_batch_result_prefill` for one request: append the sampled token, finish or keep running."""
        from sglang.srt.mem_cache.common import maybe_cache_unfinished_req, release_kv_cache

        req.output_ids.append(token)
        req.update_finish_state()
        if req.finished():
            release_kv_cache(req, self.tree_cache)
        else:
            maybe_cache_unfinished_req(req, self.tree_cache)

    def decode_step(self, req, token: int) -> None:
        """One decode step: KV for the last sampled token, then the next sampled token."""
        from sglang.srt.mem_cache.common import release_kv_cache

        pos = req.kv.kv_allocated_len
        self.req_to_token_pool.req_to_token[req.req_pool_idx, pos] = int(self.allocator.alloc(1)[0])
        req.kv.kv_allocated_len = pos + 1
        req.kv_committed_len = pos + 1
        req.output_ids.append(token)
        req.update_finish_state()
        if req.finished():
            release_kv_cache(req, self.tree_cache)

    def run_turn(self, session_id: str, input_ids: list[int], outputs: list[int]):
        """A whole accepted turn: arrival, prefill, then decodes until `len(outputs)` tokens are sampled."""
        req = self.submit(session_id, input_ids, max_new_tokens=len(outputs))
        assert req.to_finish is None, f"turn rejected: {req.to_finish}"
        self.admit(req)
        self.prefill_done(req, outputs[0] if outputs else 0)
        for token in outputs[1:]:
            self.decode_step(req, token)
        assert req.finished()
        return req

    def finish_rejected(self, req) -> None:
        """A request rejected at arrival still passes through admission and a 1-token prefill."""
        assert req.to_finish is not None
        self.admit(req)
        self.prefill_done(req, 0)
        assert req.finished()

    # -- observations --

    def session_len(self, session_id: str) -> int:
        """Committed sequence length of the session's last successful turn."""
        session = self.controller.get(session_id)
        [node] = session.req_nodes.values()
        # Not len(origin_input_ids): a later turn extends the shared token arrays in place before it commits.
        return session.committed_origin_len + len(node.req.output_ids)

    def leaked_kv(self) -> int:
        """KV slots neither free nor held by a session slot or the radix tree's evictable/protected nodes."""
        held = sum(slot.kv.kv_allocated_len for slot in self.tree_cache.slots.values() if slot.kv is not None)
        inner = self.tree_cache.inner
        return self.free_kv_at_start - self.allocator.available_size() - held - inner.evictable_size() - inner.protected_size() + self._shared_prefix()

    def _shared_prefix(self) -> int:
        # A session's first prompt lives in the radix tree AND in its slot's row: count it once.
        return sum(slot.cache_protected_len for slot in self.tree_cache.slots.values() if slot.kv is not None)

    # -- aborts (Scheduler.abort_request) --

    def abort_queued(self, req) -> list:
        """`Scheduler.abort_request` for a request still in the waiting queue ("abort method 1").
        Runs the real method on a stand-in scheduler; returns what it sent to the tokenizer manager."""
        from sglang.srt.disaggregation.utils import DisaggregationMode
        from sglang.srt.managers.io_struct import AbortReq
        from sglang.srt.managers.scheduler import Scheduler

        sent = []
        scheduler = SimpleNamespace(
            chunked_req=None,
            waiting_queue=[req],
            enable_hicache_storage=False,
            ipc_channels=SimpleNamespace(send_to_tokenizer=SimpleNamespace(send_output=lambda *a: sent.append(a))),
            disaggregation_mode=DisaggregationMode.NULL,
            dllm_config=None,
            grammar_manager=SimpleNamespace(abort_requests=lambda recv: None),
            ps=SimpleNamespace(pp_size=1),
            running_batch=None,
            last_batch=None,
            tree_cache=self.tree_cache,
        )
        Scheduler.abort_request(scheduler, AbortReq(rid=req.rid))
        assert scheduler.waiting_queue == []
        return sent

    @staticmethod
    def finish_now(req, queued: bool) -> None:
        """The real `Scheduler.abort_request` with AbortReq(finish_now=True) (patch 0012) for `req`, queued or
        running, on a stand-in scheduler. Raises TypeError where AbortReq has no finish_now (SGLang as shipped)."""
        from sglang.srt.managers.io_struct import AbortReq
        from sglang.srt.managers.scheduler import Scheduler

        recv = AbortReq(rid=req.rid, finish_now=True)
        waiting = [req] if queued else []
        scheduler = SimpleNamespace(
            chunked_req=None, waiting_queue=waiting, ps=SimpleNamespace(pp_size=1),
            running_batch=None if queued else SimpleNamespace(reqs=[req]), last_batch=None,
        )
        scheduler._finish_requests_now = lambda r: Scheduler._finish_requests_now(scheduler, r)
        Scheduler.abort_request(scheduler, recv)
        assert scheduler.waiting_queue == waiting  # a queued request keeps its place

    @staticmethod
    def abort_running(req) -> None:
        """`Scheduler.abort_request` for a running request ("abort method 3"): it finishes at its next step."""
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        req.to_finish = FINISH_ABORT()
