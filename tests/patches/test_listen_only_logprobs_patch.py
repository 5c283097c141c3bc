"""Patch 0007: a listen-only turn (`max_new_tokens: 0`) reports no output token logprob.

What SGLang 0.5.17 does with a prefill-only session turn (`TpModelWorker` returns a placeholder token 0, or
the token the sampler drew when the batch also held generating requests; `process_batch_result_prefill`
appends it to `output_ids`, then `update_finish_state` -> `FINISH_LENGTH(0)`, `finished_len = 0`, and
`StreamingSession._trim_overshoot` cuts it): the session's context is exactly history + chunk (nothing added,
nothing dropped), the response's `output_ids` is `[]` and `completion_tokens` 0, but
`meta_info.output_token_logprobs` still holds ONE entry, (logprob, placeholder id): the logprob result
processor appended it for the placeholder (`add_logprob_return_values`) and the output streamer slices
`[:max(len(output_ids), 1)]`. A client that rebuilds the sequence from the output logprobs (token ids and
logprobs together, as an RL trainer does) inserts a token the server never holds, and every later position
is shifted.

The scenario drives SGLang's real session classes (tests/rigs/session_rig.py) and the real output
accumulator (`_GenerationStreamAccumulator.accept`, what the scheduler streams to the tokenizer manager)
through generate / listen-only / generate turns, on the patched SGLang and on SGLang as shipped.
"""

from pristine_sglang import run_on_pristine_sglang

HISTORY = list(range(1, 41))
PLACEHOLDER = 0  # TpModelWorker's dummy next token for a prefill-only batch


def _stream(req) -> dict:
    """What the scheduler sends the tokenizer manager for `req` (finished): the real accumulator."""
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.managers.scheduler_components.output_streamer import _GenerationStreamAccumulator
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    acc = _GenerationStreamAccumulator(
        return_logprob=True, return_hidden_states=False, return_routed_experts=False,
        return_indexer_topk=False, return_sampling_mask=False, spec_algorithm=SpeculativeAlgorithm.NONE,
        disaggregation_mode=DisaggregationMode.NULL, default_stream_interval=1,
        default_force_stream_interval=50, get_cached_tokens_details=lambda req: None, rust_server_mode=False)
    acc.accept(req=req)
    return {"output_ids": list(acc.output_ids[0]), "completion_tokens": acc.completion_tokens[0],
            "prompt_tokens": acc.prompt_tokens[0],
            "output_token_logprobs_idx": list(acc.output_token_logprobs_idx[0]),
            "output_token_logprobs_val": list(acc.output_token_logprobs_val[0])}


def _turn(rig, chunk: list[int], outputs: list[int]):
    """One accepted turn with return_logprob, in the order `process_batch_result_prefill` runs: sampled (or
    placeholder) token appended, finish state, KV release, then the logprob entry of that token
    (`add_logprob_return_values`: next_token_logprobs[i], next_token_ids[i]), then decodes."""
    req = rig.submit("s", chunk, max_new_tokens=len(outputs), return_logprob=True)
    assert req.to_finish is None, req.to_finish
    rig.admit(req)
    first = outputs[0] if outputs else PLACEHOLDER
    rig.prefill_done(req, first)
    req.logprob.output_token_logprobs_val.append(-1.0)
    req.logprob.output_token_logprobs_idx.append(first)
    for k, token in enumerate(outputs[1:]):
        rig.decode_step(req, token)
        req.logprob.output_token_logprobs_val.append(-2.0 - k)
        req.logprob.output_token_logprobs_idx.append(token)
    assert req.finished()
    return req


def listen_only_scenario() -> dict:
    from session_rig import SessionRig

    rig = SessionRig()
    rig.open("s")
    client_seq: list[int] = []  # what a client rebuilds: its chunks + the output tokens the response reports
    turns = []
    for chunk, outputs in ((HISTORY, [7, 8, 9]), ([21, 22, 23], []), ([31, 32], [5, 6])):
        req = _turn(rig, chunk, outputs)
        out = _stream(req)
        client_seq += chunk + out["output_ids"]
        turns.append({**out, "client_from_logprobs_agrees": out["output_token_logprobs_idx"] == out["output_ids"],
                      "server_context": list(req.origin_input_ids) + list(req.output_ids)})
    listen = turns[1]
    return {
        "listen_only_output_ids": listen["output_ids"],
        "listen_only_completion_tokens": listen["completion_tokens"],
        "listen_only_output_token_logprobs_idx": listen["output_token_logprobs_idx"],
        "server_context_is_history_plus_chunk": listen["server_context"] == HISTORY + [7, 8, 9, 21, 22, 23],
        "every_turn_logprobs_match_output_ids": all(t["client_from_logprobs_agrees"] for t in turns),
        "server_context_equals_client_rebuild": turns[2]["server_context"] == client_seq,
        "next_turn_prompt_tokens": turns[2]["prompt_tokens"],
        "leaked_kv": rig.leaked_kv(),
    }


def test_listen_only_turn_reports_no_output_logprob(sglang_ctx):
    assert listen_only_scenario() == {
        "listen_only_output_ids": [],
        "listen_only_completion_tokens": 0,
        "listen_only_output_token_logprobs_idx": [],
        "server_context_is_history_plus_chunk": True,
        "every_turn_logprobs_match_output_ids": True,
        "server_context_equals_client_rebuild": True,
        "next_turn_prompt_tokens": 43 + 3 + 2,
        "leaked_kv": 0,
    }


def test_listen_only_turn_reports_a_phantom_logprob_without_patch():
    result = run_on_pristine_sglang("test_listen_only_logprobs_patch", "listen_only_scenario")
    assert result == {
        "listen_only_output_ids": [],
        "listen_only_completion_tokens": 0,
        # the placeholder token is reported as if it had been generated; it is in no context
        "listen_only_output_token_logprobs_idx": [PLACEHOLDER],
        "server_context_is_history_plus_chunk": True,
        "every_turn_logprobs_match_output_ids": False,
        "server_context_equals_client_rebuild": True,
        "next_turn_prompt_tokens": 43 + 3 + 2,
        "leaked_kv": 0,
    }
