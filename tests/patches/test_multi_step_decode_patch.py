"""Patch 0011: multi-step decode (`--num-continuous-decode-steps K`): one scheduler round trip per K tokens.

Everything runs SGLang's real code on CPU: `ScheduleBatch.prepare_for_decode` with `alloc_for_decode` over the
session rig's real pools and radix cache (tests/rigs/session_rig.py), the real `Req.update_finish_state` and
`release_kv_cache`, `TpModelWorker`'s multi-step method over a stand-in model runner whose logits depend on
(input id, position), and the real `Scheduler.decode_num_steps` / `_relay_forward_payload` /
`_normalize_decode_outputs` on stand-in owners. On SGLang as shipped, allocating K slots per request in
decode raises (tests/rigs/pristine_sglang.py).
"""

from types import SimpleNamespace

import pytest
import torch
from pristine_sglang import run_on_pristine_sglang

VOCAB = 1000
STOP = 999


def _decode_batch(rig, prompts, budgets, first_tokens, stop_ids=None):
    """Admit one session turn per prompt into ONE real ScheduleBatch (prepare_for_extend), then the
    prefill's result: each request's first sampled token. Returns (batch, reqs)."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    reqs = []
    for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
        assert rig.open(f"s{i}")
        req = rig.submit(f"s{i}", prompt, max_new_tokens=budget)
        if stop_ids:
            req.sampling_params.stop_token_ids = set(stop_ids)
            req.sampling_params.ignore_eos = False
        req.init_next_round_input(rig.tree_cache)
        req.set_extend_range(len(req.prefix_indices), len(req.full_untruncated_fill_ids))
        rig.tree_cache.inc_lock_ref(req.last_node)
        reqs.append(req)
    model_config = SimpleNamespace(vocab_size=VOCAB, is_encoder_decoder=False, hf_eos_token_id=None,
                                   is_hybrid_swa=False)
    batch = ScheduleBatch.init_new(reqs, rig.req_to_token_pool, rig.allocator, rig.tree_cache, model_config,
                                   False, SpeculativeAlgorithm.NONE)
    batch.prepare_for_extend()
    for req, token in zip(reqs, first_tokens):
        rig.prefill_done(req, token)
    return batch, reqs


def _run_turns(num_steps: int, tokens: list[list[int]], budgets: list[int], stop_ids=None) -> dict:
    """Two sessions decode their turns in one batch, `num_steps` tokens per run (the last run shortened
    to what the longest row still needs, as Scheduler.decode_num_steps does), then each opens a next turn.
    `tokens[i]` is what row i samples, in order. Returns what a reader of the sessions can observe."""
    from sglang.srt.mem_cache.common import release_kv_cache
    from session_rig import SessionRig

    rig = SessionRig()
    batch, reqs = _decode_batch(rig, [list(range(1, 41)), list(range(100, 131))], budgets,
                                [t[0] for t in tokens], stop_ids)
    seq_invariant = [r.kv_committed_len == r.seqlen - 1 for r in reqs]
    cursor = [1] * len(reqs)
    runs = []
    while True:
        batch.filter_batch()
        if batch.is_empty():
            break
        need = max(r.sampling_params.max_new_tokens - len(r.output_ids) for r in batch.reqs)
        steps = min(num_steps, need)
        before = batch.seq_lens.tolist()
        free_before = rig.allocator.available_size()
        batch.prepare_for_decode(num_steps=steps)
        slots = batch.out_cache_loc.view(len(batch.reqs), steps)
        table = rig.req_to_token_pool.req_to_token
        rows_ok = all(
            torch.equal(table[req.req_pool_idx, length:length + steps], slots[i].to(table.dtype))
            for i, (req, length) in enumerate(zip(batch.reqs, before))
        )
        runs.append({"steps": steps, "rows_written": rows_ok,
                     "slots_taken": free_before - rig.allocator.available_size(),
                     "seq_lens": batch.seq_lens.tolist(), "before": before})
        for req in batch.reqs:
            i = reqs.index(req)
            req.output_ids.extend(tokens[i][cursor[i]:cursor[i] + steps])
            cursor[i] += steps
            req.update_finish_state(steps)
            if req.finished():
                release_kv_cache(req, rig.tree_cache)
    # Each session's next turn starts from what the last one committed.
    next_prefix = []
    for i in range(len(reqs)):
        nxt = rig.submit(f"s{i}", [5, 6], max_new_tokens=1)
        rig.admit(nxt)
        next_prefix.append(len(nxt.prefix_indices))
        rig.prefill_done(nxt, 7)
    return {
        "runs": runs,
        "seq_invariant_after_prefill": seq_invariant,
        "outputs": [list(r.output_ids[: r.finished_len or len(r.output_ids)]) for r in reqs],
        "finished": [type(r.finished_reason).__name__ for r in reqs],
        "session_len": [rig.session_len(f"s{i}") for i in range(len(reqs))],
        "next_turn_prefix": next_prefix,
        "leaked_kv": rig.leaked_kv(),
    }


TOKENS = [[11 + j for j in range(16)], [300 + j for j in range(16)]]


# When a row's turn ends before its run's last step, the run also computed the KV of the turn's last token
# (the input of the step after it), and the session keeps it: the next turn's prefix is one longer than
# after single steps. Overlap scheduling's one extra step does the same today.
@pytest.mark.parametrize("num_steps,kept_last_kv", [(2, [0, 0]), (4, [0, 1]), (8, [0, 1])])
def test_a_run_of_k_steps_leaves_what_k_single_steps_leave(sglang_ctx, num_steps, kept_last_kv):
    budgets = [16, 7]  # a speaking turn and a shorter one: row 1 ends inside a run at k >= 4
    single, multi = _run_turns(1, TOKENS, budgets), _run_turns(num_steps, TOKENS, budgets)
    assert multi["seq_invariant_after_prefill"] == [True, True]
    for run in multi["runs"]:
        assert run["rows_written"], "req_to_token[row, L:L+k] must be the run's k slots"
        assert run["slots_taken"] == run["steps"] * len(run["before"])
        assert run["seq_lens"] == [length + run["steps"] for length in run["before"]]
    assert [r["steps"] for r in multi["runs"]][0] == num_steps
    assert len(multi["runs"]) < len(single["runs"]) == 15
    for key in ("outputs", "finished", "session_len", "leaked_kv"):
        assert multi[key] == single[key], key
    assert multi["outputs"] == [TOKENS[0], TOKENS[1][:7]]
    assert multi["leaked_kv"] == 0
    assert multi["next_turn_prefix"] == [n + kept for n, kept in zip(single["next_turn_prefix"], kept_last_kv)]


def test_a_stop_id_inside_a_run_ends_the_turn_there(sglang_ctx):
    tokens = [[11, 12, 13, STOP, 15, 16, 17, 18], [300 + j for j in range(8)]]
    single, multi = _run_turns(1, tokens, [8, 8], [STOP]), _run_turns(4, tokens, [8, 8], [STOP])
    assert multi["outputs"][0] == [11, 12, 13, STOP]
    assert multi["finished"][0] == "FINISH_MATCHED_TOKEN"
    for key in ("outputs", "finished", "session_len", "leaked_kv"):
        assert multi[key] == single[key], key
    assert multi["next_turn_prefix"] == [single["next_turn_prefix"][0] + 1, single["next_turn_prefix"][1]]


# -- the worker: k forward + sample steps without a host round trip --


class _Runner:
    """Stand-in ModelRunner: 'logits' are a function of (input id, position); sample takes their argmax."""

    def __init__(self):
        self.steps = []

    def forward(self, fb):
        self.steps.append({k: getattr(fb, k).clone() for k in
                           ("input_ids", "positions", "seq_lens", "seq_lens_cpu", "out_cache_loc")}
                          | {"seq_lens_sum": fb.seq_lens_sum})
        return SimpleNamespace(logits_output=SimpleNamespace(next=(fb.input_ids * 31 + fb.positions) % VOCAB),
                               can_run_graph=True)

    @staticmethod
    def sample(logits_output, fb):
        return logits_output.next


def _forward_batch(seq_lens_after, k, input_ids):
    bs = len(seq_lens_after)
    seq_lens = torch.tensor(seq_lens_after)
    return SimpleNamespace(batch_size=bs, seq_lens=seq_lens, seq_lens_cpu=seq_lens.clone(),
                           orig_seq_lens=seq_lens.to(torch.int32), seq_lens_sum=int(seq_lens.sum()),
                           out_cache_loc=torch.arange(100, 100 + bs * k), input_ids=torch.tensor(input_ids),
                           positions=None)


def test_worker_runs_k_steps_that_equal_k_single_steps(sglang_ctx):
    from sglang.srt.managers.tp_worker import TpModelWorker

    k, lengths_before, first = 4, [40, 7, 123], [5, 6, 7]
    fb = _forward_batch([n + k for n in lengths_before], k, first)
    aliases = (fb.seq_lens, fb.seq_lens.clone(), fb.out_cache_loc.clone())
    runner = _Runner()
    result = TpModelWorker._forward_batch_generation_multi_step(SimpleNamespace(model_runner=runner), fb, k)

    tokens, expected = torch.tensor(first), []
    for j, step in enumerate(runner.steps):
        lengths = torch.tensor(lengths_before) + j + 1
        assert torch.equal(step["input_ids"], tokens)
        assert torch.equal(step["seq_lens"], lengths) and torch.equal(step["seq_lens_cpu"], lengths)
        assert step["seq_lens_sum"] == int(lengths.sum())
        assert torch.equal(step["positions"], lengths - 1)
        assert torch.equal(step["out_cache_loc"], torch.arange(100, 100 + 3 * k).view(3, k)[:, j])
        tokens = (tokens * 31 + (lengths - 1)) % VOCAB
        expected.append(tokens)
    assert len(runner.steps) == k
    assert torch.equal(result.next_token_ids, torch.stack(expected, 1))
    # The ScheduleBatch's tensors (aliased by the forward batch) are rebound per step, never written.
    assert fb.seq_lens is aliases[0] and torch.equal(fb.seq_lens, aliases[1])
    assert torch.equal(fb.out_cache_loc, aliases[2])


# -- the scheduler: how many steps, and what the next forward continues from --


def _server_args(max_steps=4, **overrides):
    return SimpleNamespace(**{"num_continuous_decode_steps": max_steps, "pp_size": 1,
                              "enable_mamba_extra_buffer": lambda: False, "expert_distribution_recorder_mode": None,
                              "enable_expert_distribution_metrics": False, **overrides})


def _scheduler(batch, max_steps=4, free=10_000, row_width=2048, **overrides):
    from sglang.srt.disaggregation.utils import DisaggregationMode

    server_args = _server_args(max_steps)
    owner = SimpleNamespace(server_args=server_args, is_hybrid_swa=False, require_mlp_sync=False,
                            disaggregation_mode=DisaggregationMode.NULL,
                            token_to_kv_pool_allocator=SimpleNamespace(page_size=1, available_size=lambda: free),
                            req_to_token_pool=SimpleNamespace(req_to_token=torch.zeros(1, row_width)))
    for name, value in overrides.items():
        setattr(owner, name, value)
    return owner


def _steps(batch, **kw):
    from sglang.srt.managers.scheduler import Scheduler

    return Scheduler.decode_num_steps(_scheduler(batch, **kw), batch)


def test_decode_num_steps_sizes_the_run_to_what_rows_still_need(sglang_ctx):
    from session_rig import SessionRig

    rig = SessionRig()
    batch, reqs = _decode_batch(rig, [list(range(1, 41)), list(range(100, 131))], [16, 3], [11, 300])
    assert _steps(batch) == 4
    assert _steps(batch, max_steps=1) == 1
    assert _steps(batch, max_steps=32) == 15  # the longest row needs 15 more
    assert _steps(batch, free=4 * 2 - 1) == 1  # no room for every row's 4 slots
    assert _steps(batch, row_width=int(batch.seq_lens_cpu.max()) + 2) == 2
    # Overlap scheduling prepares the next run before this one's tokens are processed: 12 in flight.
    batch.prepare_for_decode(num_steps=12)
    assert _steps(batch) == 3
    batch.prepare_for_decode(num_steps=3)
    assert _steps(batch) == 1  # nothing left once both runs land


@pytest.mark.parametrize("disqualifier", [
    "logprob", "hidden_states", "stream", "routed_experts", "sampling_mask", "grammar", "penalizer", "custom_logit_processor",
    "spec", "paged", "swa", "mlp_sync", "pp", "disagg", "mamba", "encoder_decoder", "hisparse", "expert_recorder",
    "expert_metrics",
])
def test_decode_num_steps_is_one_where_a_step_has_per_step_state(sglang_ctx, disqualifier):
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from session_rig import SessionRig

    rig = SessionRig()
    batch, reqs = _decode_batch(rig, [list(range(1, 41))], [16], [11])
    assert _steps(batch) == 4
    kw = {}
    if disqualifier == "logprob":
        batch.return_logprob = True
    elif disqualifier == "hidden_states":
        batch.return_hidden_states = True
    elif disqualifier == "stream":
        reqs[0].stream = True
    elif disqualifier == "routed_experts":
        reqs[0].return_routed_experts = True
    elif disqualifier == "sampling_mask":
        reqs[0].return_sampling_mask = True
    elif disqualifier == "grammar":
        batch.sampling_info.grammars = [object()]
    elif disqualifier == "penalizer":
        batch.sampling_info.penalizer_orchestrator = SimpleNamespace(is_required=True)
    elif disqualifier == "custom_logit_processor":
        batch.sampling_info.has_custom_logit_processor = True
    elif disqualifier == "spec":
        batch.spec_algorithm = SpeculativeAlgorithm.EAGLE
    elif disqualifier == "paged":
        kw["token_to_kv_pool_allocator"] = SimpleNamespace(page_size=16, available_size=lambda: 10_000)
    elif disqualifier == "swa":
        kw["is_hybrid_swa"] = True
    elif disqualifier == "mlp_sync":
        kw["require_mlp_sync"] = True
    elif disqualifier == "pp":
        kw["server_args"] = _server_args(pp_size=2)
    elif disqualifier == "disagg":
        kw["disaggregation_mode"] = DisaggregationMode.DECODE
    elif disqualifier == "mamba":
        kw["server_args"] = _server_args(enable_mamba_extra_buffer=lambda: True)
    elif disqualifier == "expert_recorder":
        kw["server_args"] = _server_args(expert_distribution_recorder_mode="stat")
    elif disqualifier == "expert_metrics":
        kw["server_args"] = _server_args(enable_expert_distribution_metrics=True)
    elif disqualifier == "encoder_decoder":
        batch.model_config = SimpleNamespace(is_encoder_decoder=True)
    elif disqualifier == "hisparse":
        batch.hisparse_coordinator = object()
    assert _steps(batch, **kw) == 1


def test_the_next_forward_continues_from_each_rows_last_token(sglang_ctx):
    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.managers.utils import GenerationBatchResult

    stashed = []
    owner = SimpleNamespace(spec_algorithm=SimpleNamespace(is_ngram=lambda: False),
                            future_map=SimpleNamespace(stash=lambda idx, payload: stashed.append(payload)))
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    Scheduler._relay_forward_payload(owner, torch.tensor([0, 1]), GenerationBatchResult(next_token_ids=ids))
    Scheduler._relay_forward_payload(owner, torch.tensor([0, 1]),
                                     GenerationBatchResult(next_token_ids=torch.tensor([7, 8])))
    assert stashed[0].bonus_tokens.tolist() == [3, 6]
    assert stashed[1].bonus_tokens.tolist() == [7, 8]  # one step: unchanged


def test_the_result_processor_takes_each_rows_run(sglang_ctx):
    from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    batch = SimpleNamespace(spec_algorithm=SpeculativeAlgorithm.NONE, return_logprob=False)
    multi, _ = SchedulerBatchResultProcessor._normalize_decode_outputs(
        None, batch=batch, result=None, logits_output=None, next_token_ids=torch.tensor([[1, 2], [3, 4]]))
    single, _ = SchedulerBatchResultProcessor._normalize_decode_outputs(
        None, batch=batch, result=None, logits_output=None, next_token_ids=torch.tensor([1, 3]))
    assert multi == [[1, 2], [3, 4]] and single == [[1], [3]]


# -- SGLang as shipped --


def pristine_alloc_scenario() -> dict:
    from sglang.srt.mem_cache.allocation import alloc_for_decode
    from session_rig import SessionRig

    rig = SessionRig()
    batch, _ = _decode_batch(rig, [list(range(1, 41)), list(range(100, 131))], [16, 16], [11, 300])
    try:
        alloc_for_decode(batch, token_per_req=4)
    except Exception as exc:  # noqa: BLE001 - the failure is what the scenario reports
        return {"raised": type(exc).__name__, "message": str(exc)[:200]}
    return {"raised": None}


def test_pristine_sglang_cannot_allocate_k_slots_per_request():
    result = run_on_pristine_sglang("test_multi_step_decode_patch", "pristine_alloc_scenario")
    assert result["raised"] is not None, "0.5.17 writes one position per request for bs*k slots"
