"""benchmarks/alignment_e2e.py's pure-Python parts on CPU: session records collected through the real client
and /microturn API over the stand-in tokenizer manager, and the report arithmetic."""

import argparse
import asyncio

import pytest


from sglang_microturn.alignment.align import PathReport
from sglang_microturn.format.layout import DEFAULT_LAYOUT

from benchmarks import alignment_e2e as e2e


def test_collect_records_rebuilds_every_session(server):  # noqa: F811
    url, tm = server
    records = asyncio.run(e2e.collect_records(url, sessions=2, turns=3, model_path="/m"))
    budget = DEFAULT_LAYOUT.spec.out_budget
    assert len(records) == 2 and all(r.model_path == "/m" for r in records)
    for r in records:
        assert len(r.generated) == 3 * budget and all(g.logprob == -1.0 for g in r.generated)
        assert r.sequence[r.generated[0].position] == r.generated[0].token_id
    assert sorted(tm.closed_lengths) == sorted(len(r.sequence) for r in records)


def test_aggregate_and_overhead():
    reports = [PathReport("server", 10, 0, 0.0), PathReport("server", 5, 2, 0.25, [{"position": 3}])]
    agg = e2e.aggregate(reports)
    assert (agg["compared"], agg["mismatched"], agg["max_abs_diff"], agg["sessions_with_mismatches"]) == (15, 2, 0.25, 1)
    default = {"32x50": {"turns": 1600, "wall_s": 10.0}, "1x200": {"p50_ms": 20.0}}
    aligned = {"32x50": {"turns": 1600, "wall_s": 10.4}, "1x200": {"p50_ms": 21.5}}
    o = e2e.overhead(default, aligned, "32x50", "1x200")
    assert o["throughput_aligned_over_default"] == round(10 / 10.4, 3) and o["throughput_within_target"]
    assert o["p50_aligned_over_default"] == 1.075 and not o["p50_within_target"]


def test_seeded_sessions_one_at_a_time_and_replay_comparison(server):  # noqa: F811
    url, tm = server
    together = asyncio.run(e2e.collect_records(url, sessions=2, turns=2, model_path="/m", temperature=0.8,
                                               seed_base=7000))
    alone = asyncio.run(e2e.collect_records(url, sessions=2, turns=2, model_path="/m", temperature=0.8,
                                            seed_base=7000, concurrent=False))
    assert tm.last_sampling_params["temperature"] == 0.8 and tm.last_sampling_params["sampling_seed"] == 7001
    assert e2e.replay_differences(together, alone) == {
        "sessions": 2, "sampled_tokens": len(together[0].generated) * 2, "sessions_that_differ": []}
    changed = [together[0], e2e.AlignmentRecord(together[1].sequence[:-1] + [together[1].sequence[-1] + 1],
                                                together[1].generated, "/m")]
    assert e2e.replay_differences(together, changed)["sessions_that_differ"] == [1]


def test_sampled_sessions_must_not_be_negative():
    assert e2e.non_negative_int("0") == 0 and e2e.non_negative_int("4") == 4
    with pytest.raises(argparse.ArgumentTypeError, match="-1 is negative; pass 0 to skip"):
        e2e.non_negative_int("-1")


# -- random shapes (issue 16) --

import random  # noqa: E402
import uuid  # noqa: E402
from types import SimpleNamespace  # noqa: E402


@pytest.fixture
def plain_server(monkeypatch):
    """The /microturn API and SGLang's plain routes (/open_session, /generate with session_params or a one-shot
    re-score, /close_session) over one stand-in tokenizer manager; `tm.phantom` makes a listen-only turn report
    one output logprob, as SGLang 0.5.17 does without patch 0007."""
    from fake_sglang_http import FakeTokenizerManager, app_for, serve_on_loopback
    from starlette.responses import Response

    from sglang_microturn.server.api_handlers import Backend, MicroTurnAPI

    monkeypatch.setenv("MICROTURN_SESSION_KV_TOKENS", "1000000")
    tm = FakeTokenizerManager()
    tm.phantom = False
    tm.rescore_batches = []
    app = app_for(MicroTurnAPI(lambda: Backend(tm, max_total_num_tokens=1_000_000)))

    async def open_session(body: dict):
        sid = uuid.uuid4().hex
        tm.lengths[sid] = 0
        return sid

    async def close_session(body: dict):
        await tm.close_session(SimpleNamespace(session_id=body["session_id"]))
        return Response(status_code=200)  # SGLang 0.5.17's /close_session: 200 with an empty body

    async def generate(body: dict):
        if "session_params" not in body:  # one-shot re-score: every position's (logprob, token id)
            tm.rescore_batches.append(len(body["input_ids"]))
            seq = body["input_ids"]
            return {"output_ids": [0], "meta_info": {"input_token_logprobs": [
                (None if p == 0 else -1.0, t, None) for p, t in enumerate(seq)]}}
        obj = SimpleNamespace(rid=uuid.uuid4().hex, input_ids=body["input_ids"], session_params=body["session_params"],
                              sampling_params=body["sampling_params"], return_logprob=body["return_logprob"],
                              stream=False)
        final = [o async for o in tm.generate_request(obj, None)][-1]
        if tm.phantom and not final["output_ids"]:
            final["meta_info"]["output_token_logprobs"] = [(-1.0, 0, None)]
        return final

    for path, fn in (("/open_session", open_session), ("/close_session", close_session), ("/generate", generate)):
        app.add_api_route(path, fn, methods=["POST"])
    with serve_on_loopback(app) as url:
        yield url, tm


def test_random_shapes_cover_the_ranges():
    shapes = e2e.random_shapes(random.Random(0), 2000)
    lengths, budgets = {len(s.input_ids) for s in shapes}, {s.budget for s in shapes}
    assert min(lengths) == 1 and max(lengths) == 300 and budgets == set(range(17))
    vocab = DEFAULT_LAYOUT.vocab
    assert all(vocab.text_in.start <= t < vocab.dmel.stop for s in shapes for t in s.input_ids)
    assert e2e.random_shapes(random.Random(0), 5) == e2e.random_shapes(random.Random(0), 5)


def test_random_check_reports_each_path(plain_server):
    url, tm = plain_server
    collected = asyncio.run(e2e.collect_random(url, sessions=5, concurrency=3, turns=6, seed=1, model_path="/m"))
    summary = e2e.random_summary(collected)
    assert set(summary) == {"microturn", "session"}
    for path, s in summary.items():
        assert s["sessions"] == 5 and s["compared"] > 0, path
        assert (s["mismatched"], s["token_flagged"], s["context_disagreements"]) == (0, 0, 0), (path, s)
        # every position the server sampled is compared, once, against the one-shot re-score
        assert s["compared"] == sum(len(r.generated) for r in collected[path]["records"])
    # re-scores ran per wave of 3 + 2 sessions, two paths: 10 re-scores
    assert len(tm.rescore_batches) == 10
    assert not tm.lengths  # every session closed


def test_plain_session_path_flags_a_phantom_listen_only_logprob(plain_server):
    url, tm = plain_server
    tm.phantom = True
    shapes = [e2e.TurnShape([300, 301], 2), e2e.TurnShape([302], 0), e2e.TurnShape([303, 304], 1)]
    record, disagreements = asyncio.run(e2e.session_record(url, shapes, "/m"))
    assert disagreements == 1
    assert len(record.sequence) == 2 + 2 + 1 + 2 + 1  # rebuilt from output_ids: no phantom token in it


def test_flag_positions_separates_values_and_token_identity():
    rec = e2e.AlignmentRecord([5, 9, 831, 7], [e2e.GeneratedToken(1, 9, -1.0), e2e.GeneratedToken(2, 831, -2.0)])
    same = [(None, 5, None), (-1.0, 9, None), (-2.0, 831, None), (-0.5, 7, None)]
    assert e2e.flag_positions(rec, same)["mismatched"] == 0
    clipped = [(None, 5, None), (-1.0, 9, None), (-2.0, 0, None), (-0.5, 7, None)]  # SGLang without patch 0008
    f = e2e.flag_positions(rec, clipped)
    assert (f["mismatched"], f["token_flagged"]) == (0, 1) and f["first_flags"][0]["rescored_token"] == 0
    shifted = e2e.flag_positions(rec, same[:3])
    assert shifted["mismatched"] == 2 and shifted["max_abs_diff"] == float("inf")
    total = e2e.sum_flags([f, e2e.flag_positions(rec, same)])
    assert (total["compared"], total["token_flagged"], total["sessions_flagged"]) == (4, 1, 1)
    assert total["sampled_last_vocab_id"] == 2  # id 831 = DEFAULT_LAYOUT.vocab.size - 1, sampled in both records
