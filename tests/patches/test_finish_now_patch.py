"""Patch 0012 (`AbortReq(finish_now=True)`: stop a request's generation and keep its output; barge-in).

Each scenario runs SGLang's real session/cache classes and the real `Scheduler.abort_request`
(tests/rigs/session_rig.py), once on the installed patched SGLang and once on SGLang as shipped
(tests/rigs/pristine_sglang.py), which has no way to stop a turn without losing it.
"""

from pristine_sglang import run_on_pristine_sglang

HISTORY = list(range(1, 41))  # turn 1: 40 input ids + 3 outputs = 43 tokens


def finish_now_scenario(queued: bool) -> dict:
    """Turn 2 (budget 8) is told to finish now while running (after 2 tokens) or while queued; then turn 3."""
    from session_rig import SessionRig

    rig = SessionRig()
    rig.open("s")
    rig.run_turn("s", HISTORY, [7, 8, 9])
    row = rig.tree_cache.slots["s"].req_pool_idx
    committed_locs = rig.req_to_token_pool.req_to_token[row, :42].tolist()
    turn = rig.submit("s", [21, 22, 23], max_new_tokens=8)
    try:
        if queued:
            rig.finish_now(turn, queued=True)
            rig.admit(turn)
            rig.prefill_done(turn, 1)
        else:
            rig.admit(turn)
            rig.prefill_done(turn, 1)
            rig.decode_step(turn, 2)
            rig.finish_now(turn, queued=False)
            rig.decode_step(turn, 3)  # the step in flight when the request came: its token is kept
    except TypeError:  # AbortReq without finish_now
        return {"supported": False}
    finished = {"finished": turn.finished(), "reason": turn.finished_reason.to_json()["type"],
                "output": list(turn.output_ids), "session_len": rig.session_len("s"), "leaked_kv": rig.leaked_kv()}
    nxt = rig.submit("s", [31, 32], max_new_tokens=2)
    rig.admit(nxt)
    prefix = nxt.prefix_indices.tolist()
    rig.prefill_done(nxt, 5)
    rig.decode_step(nxt, 6)
    return {**finished, "next_input": list(nxt.origin_input_ids), "next_reuses_committed_kv":
            prefix[:42] == committed_locs, "final_session_len": rig.session_len("s"), "final_leaked_kv": rig.leaked_kv()}


def test_a_running_turn_told_to_finish_keeps_what_it_generated(sglang_ctx):
    assert finish_now_scenario(queued=False) == {
        "finished": True, "reason": "cancelled", "output": [1, 2, 3],
        "session_len": 43 + 3 + 3, "leaked_kv": 0,
        "next_input": HISTORY + [7, 8, 9] + [21, 22, 23] + [1, 2, 3] + [31, 32],  # the stopped turn is in it
        "next_reuses_committed_kv": True, "final_session_len": 43 + 6 + 2 + 2, "final_leaked_kv": 0,
    }


def test_a_queued_turn_told_to_finish_keeps_its_input_and_one_token(sglang_ctx):
    result = finish_now_scenario(queued=True)
    assert result == {
        "finished": True, "reason": "length", "output": [1],  # its budget was cut to one token
        "session_len": 43 + 3 + 1, "leaked_kv": 0,
        "next_input": HISTORY + [7, 8, 9] + [21, 22, 23] + [1] + [31, 32],
        "next_reuses_committed_kv": True, "final_session_len": 43 + 4 + 2 + 2, "final_leaked_kv": 0,
    }


def test_sglang_as_shipped_cannot_stop_a_turn_without_losing_it():
    assert run_on_pristine_sglang("test_finish_now_patch", "finish_now_scenario", queued=False) == {"supported": False}

