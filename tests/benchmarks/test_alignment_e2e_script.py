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
