"""benchmarks/multistep_check.py's pure-Python parts on CPU: the scripted sessions, played through the real client
and /microturn API over the stand-in tokenizer manager, and the comparison that decides the check."""

import asyncio

from benchmarks import multistep_check as check


def test_scripts_are_seeded_and_in_range():
    plan = check.scripts(sessions=3, turns=5, vocab=832, seed=7)
    assert plan == check.scripts(sessions=3, turns=5, vocab=832, seed=7)
    assert plan != check.scripts(sessions=3, turns=5, vocab=832, seed=8)
    for turns in plan:
        for ids, budget in turns:
            assert 1 <= len(ids) <= 120 and 1 <= budget <= 16
            assert all(check.FIRST_INPUT_ID <= i < 832 for i in ids)


def test_play_records_every_turn_of_every_session(server):
    url, tm = server
    plan = check.scripts(sessions=2, turns=3, vocab=832, seed=0)
    played = asyncio.run(check.play(url, plan, logprob=True, stop_ids=[[], [5]]))
    assert [len(s) for s in played] == [3, 3]
    for session, turns in zip(played, plan):
        lengths = [t["committed_length"] for t in session]
        assert lengths == sorted(lengths) and len(set(lengths)) == 3  # every turn appended
        assert all(len(t["output_ids"]) <= budget for t, (_, budget) in zip(session, turns))


def test_compare_flags_any_turn_that_differs():
    a = [[{"output_ids": [1, 2], "committed_length": 5}], [{"output_ids": [3], "committed_length": 4}]]
    same = check.compare(a, [list(s) for s in a])
    assert same == {"turns": 2, "tokens": 3, "turns_that_differ": 0, "first_differences": []}
    b = [a[0], [{"output_ids": [3], "committed_length": 5}]]  # same tokens, another committed length
    assert check.compare(a, b)["first_differences"] == [(1, 0)]


def test_mid_turn_stop_picks_a_token_inside_a_long_turn():
    assert check.mid_turn_stop([{"output_ids": [1]}, {"output_ids": list(range(10, 20))}]) == [15]
    assert check.mid_turn_stop([{"output_ids": [1, 2]}]) == []
