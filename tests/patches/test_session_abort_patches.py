"""Patches 0002 (queued abort releases the guard) and 0003 (mid-turn abort rolls back to the committed prefix).

Each scenario runs SGLang's real session/cache classes and the real `Scheduler.abort_request`
(tests/rigs/session_rig.py), once on the installed patched SGLang and once on SGLang as shipped
(tests/rigs/pristine_sglang.py), where the upstream behaviour must show.
"""

from pristine_sglang import run_on_pristine_sglang

HISTORY = list(range(1, 41))  # turn 1: 40 input ids + 3 outputs = 43 tokens, 42 with KV


def queued_abort_scenario() -> dict:
    """Turn 2 is accepted but aborted while still queued; then turn 3 arrives."""
    from session_rig import SessionRig

    rig = SessionRig()
    rig.open("s")
    rig.run_turn("s", HISTORY, [7, 8, 9])
    queued = rig.submit("s", [21, 22, 23], max_new_tokens=2)
    sent = rig.abort_queued(queued)
    nxt = rig.submit("s", [31, 32], max_new_tokens=2)
    result = {"abort_reported": len(sent) == 1, "next_accepted": nxt.to_finish is None}
    if result["next_accepted"]:
        rig.admit(nxt)
        result["next_prefix_len"] = len(nxt.prefix_indices)
        rig.prefill_done(nxt, 5)
        rig.decode_step(nxt, 6)
        result["session_len"] = rig.session_len("s")
        result["leaked_kv"] = rig.leaked_kv()
    return result


def test_queued_abort_leaves_session_usable(sglang_ctx):
    assert queued_abort_scenario() == {
        "abort_reported": True,
        "next_accepted": True,
        "next_prefix_len": 42,  # the whole committed history is reused: nothing of the aborted turn remains
        "session_len": 43 + 2 + 2,
        "leaked_kv": 0,
    }


def test_queued_abort_wedges_session_without_patch():
    result = run_on_pristine_sglang("test_session_abort_patches", "queued_abort_scenario")
    assert result == {"abort_reported": True, "next_accepted": False}


def mid_turn_abort_scenario() -> dict:
    """Turn 2 is aborted while decoding; then turn 3 arrives."""
    from session_rig import SessionRig

    rig = SessionRig()
    rig.open("s")
    rig.run_turn("s", HISTORY, [7, 8, 9])
    row = rig.tree_cache.slots["s"].req_pool_idx
    committed_locs = rig.req_to_token_pool.req_to_token[row, :42].tolist()

    running = rig.submit("s", [21, 22, 23], max_new_tokens=4)
    rig.admit(running)
    rig.prefill_done(running, 1)
    rig.decode_step(running, 2)
    rig.abort_running(running)
    rig.decode_step(running, 3)  # the aborted request runs one more step, then is released
    after_abort = {"aborted_finished": running.finished(), "leaked_kv_after_abort": rig.leaked_kv(),
                   "session_len_after_abort": rig.session_len("s")}

    nxt = rig.submit("s", [31, 32], max_new_tokens=2)
    rig.admit(nxt)
    prefix = nxt.prefix_indices.tolist()
    rig.prefill_done(nxt, 5)
    rig.decode_step(nxt, 6)
    return {
        **after_abort,
        "next_prefix_len": len(prefix),
        "next_reuses_committed_kv": prefix == committed_locs,
        "next_input": list(nxt.origin_input_ids),
        "session_len": rig.session_len("s"),
        "leaked_kv": rig.leaked_kv(),
    }


def test_mid_turn_abort_rolls_back_to_committed_prefix(sglang_ctx):
    assert mid_turn_abort_scenario() == {
        "aborted_finished": True,
        "leaked_kv_after_abort": 0,
        "session_len_after_abort": 43,
        "next_prefix_len": 42,
        "next_reuses_committed_kv": True,
        "next_input": HISTORY + [7, 8, 9, 31, 32],  # the aborted turn left nothing in the sequence
        "session_len": 43 + 2 + 2,
        "leaked_kv": 0,
    }


def test_mid_turn_abort_frees_everything_without_patch():
    result = run_on_pristine_sglang("test_session_abort_patches", "mid_turn_abort_scenario")
    assert result["next_input"] == HISTORY + [7, 8, 9, 31, 32]
    assert result["next_prefix_len"] < 42  # upstream re-prefills (all but what the radix tree kept)
    assert not result["next_reuses_committed_kv"]
