"""Patch 0001: a rejected overlapping append must not clear the in-flight guard of the running turn.

The scenario runs SGLang's real session classes (tests/rigs/session_rig.py). It runs twice: against the installed,
patched SGLang, where the guard holds, and against SGLang as shipped (tests/rigs/pristine_sglang.py), where the bug
must reproduce. The second run is what proves the test can fail.
"""

import pytest
from pristine_sglang import run_on_pristine_sglang

from sglang_microturn.patchset import patching
def overlap_scenario(first_turn_running: bool) -> dict:
    """Turn k runs; a second append arrives and is rejected; then a third append arrives while turn k
    still runs. Returns whether the third was rejected, and the session length after turn k finishes."""
    from session_rig import SessionRig

    rig = SessionRig()
    assert rig.open("s")
    if not first_turn_running:
        rig.run_turn("s", list(range(1, 41)), [7, 8, 9])  # committed history of 43 tokens
    running = rig.submit("s", [21, 22, 23], max_new_tokens=2)
    rig.admit(running)
    rig.prefill_done(running, 1)  # now decoding: the turn holds the guard

    rejected = rig.submit("s", [31], max_new_tokens=1)
    second_rejected = rejected.to_finish is not None
    rig.finish_rejected(rejected)  # the rejected request is retired through admission + prefill

    third = rig.submit("s", [41], max_new_tokens=1)
    third_rejected = third.to_finish is not None
    rig.decode_step(running, 2)
    return {
        "second_rejected": second_rejected,
        "third_rejected": third_rejected,
        "running_finished": running.finished(),
        "session_len": rig.session_len("s"),
        "leaked_kv": rig.leaked_kv(),
    }


@pytest.mark.parametrize("first_turn_running", [False, True], ids=["later-turn", "first-turn"])
def test_patched_sglang_keeps_guard_of_running_turn(sglang_ctx, first_turn_running):
    assert patching.unapplied() == [], "run `sglang-microturn patch apply` (tests/run.sh does)"
    result = overlap_scenario(first_turn_running)
    assert result == {
        "second_rejected": True,
        "third_rejected": True,
        "running_finished": True,
        "session_len": (3 + 2) if first_turn_running else (43 + 3 + 2),
        "leaked_kv": 0,
    }


@pytest.mark.parametrize("first_turn_running", [False, True], ids=["later-turn", "first-turn"])
def test_pristine_sglang_reproduces_the_bug(first_turn_running):
    result = run_on_pristine_sglang("test_session_overlap_patch", "overlap_scenario",
                                    first_turn_running=first_turn_running)
    assert result["second_rejected"]
    assert not result["third_rejected"], "unpatched 0.5.17 should accept the third append (the bug)"
