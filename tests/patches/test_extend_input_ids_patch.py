"""Patch 0004: a streaming-session append's extend input ids are sliced, not copied from the whole sequence.

SGLang's real `ScheduleBatch.prepare_for_extend` runs on a session turn over a long history; the test counts
calls of `Req.get_fill_ids` (the O(session) copy) and checks the ids the batch feeds the model. On SGLang as
shipped (tests/rigs/pristine_sglang.py) the copy happens once per request per extend.
"""

from pristine_sglang import run_on_pristine_sglang

HISTORY = list(range(1, 301))


def extend_scenario() -> dict:
    from sglang.srt.managers.schedule_batch import Req

    from session_rig import SessionRig

    rig = SessionRig()
    rig.open("s")
    rig.run_turn("s", HISTORY, [7, 8, 9])
    req = rig.submit("s", [11, 12, 13], max_new_tokens=2)
    calls = []
    original = Req.get_fill_ids
    Req.get_fill_ids = lambda self: calls.append(len(self.full_untruncated_fill_ids)) or original(self)
    try:
        batch = rig.admit_with_schedule_batch(req)
    finally:
        Req.get_fill_ids = original
    return {
        "full_copies": len(calls),
        "extend_ids": batch.prefill_input_ids_cpu.tolist(),
        "prefix_len": len(req.prefix_indices),
        "seq_len": int(batch.seq_lens_cpu[0]),
    }


EXPECTED_IDS = [9, 11, 12, 13]  # the last output token (no KV yet) is recomputed, then the chunk


def test_extend_ids_without_copying_the_sequence(sglang_ctx):
    assert extend_scenario() == {"full_copies": 0, "extend_ids": EXPECTED_IDS, "prefix_len": 302, "seq_len": 306}


def test_sglang_as_shipped_copies_the_whole_sequence():
    result = run_on_pristine_sglang("test_extend_input_ids_patch", "extend_scenario")
    assert result["extend_ids"] == EXPECTED_IDS  # same ids: the patch changes cost, not results
    assert result["full_copies"] == 1
