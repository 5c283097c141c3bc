"""Patch 0010: a multi-token acceptance that reaches max_new_tokens finishes at a stop it holds before the budget.

SGLang 0.5.17's `Req.update_finish_state(new_accepted_len)` checks the length budget before anything else: once
`len(output_ids) >= max_new_tokens` it finishes with `FINISH_LENGTH`, `finished_len = max_new_tokens`. A step
that accepts several tokens at once (speculative decoding; multi-step decode) can reach the budget past a stop
token id, EOS, stop string or out-of-vocabulary id it holds, and the request reports `length` with output past
the stop. With the patch such an acceptance finishes as the same tokens accepted one at a time would: the
budget's last token still finishes with length whatever it is (what a one-token step does).

The scenarios run SGLang's real `Req` and `SamplingParams` (a letter tokenizer for stop strings), on the patched
SGLang and on SGLang as shipped.
"""

import random

import pytest
from pristine_sglang import run_on_pristine_sglang

VOCAB = 32
STOP = 27  # a request's stop_token_ids
EOS = 28  # the model's EOS (Req.eos_token_ids and the tokenizer's eos_token_id)
BAD = 40  # outside the vocabulary


class LetterTokenizer:
    """ids 0-25 are the letters a-z; the rest decode as <id>."""

    eos_token_id = EOS
    additional_stop_token_ids = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i) if 0 <= i < 26 else f"<{i}>" for i in ids)


def finish_scenario(steps, max_new_tokens, stop_token_ids=None, stop=None, stop_regex=None, ignore_eos=False) -> dict:
    """Accept each of `steps` (a list of token ids: one step) as the decode loop does, until the request
    finishes; its finish reason, finished_len and output_ids."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    tokenizer = LetterTokenizer()
    params = SamplingParams(max_new_tokens=max_new_tokens, stop=stop, stop_regex=stop_regex,
                            stop_token_ids=set(stop_token_ids) if stop_token_ids else None, ignore_eos=ignore_eos)
    params.normalize(tokenizer)
    req = Req(rid="r", origin_input_text=None, origin_input_ids=[0, 1, 2], sampling_params=params,
              eos_token_ids={EOS}, vocab_size=VOCAB)
    req.tokenizer = tokenizer
    for step in steps:
        req.output_ids.extend(step)
        req.update_finish_state(len(step))
        if req.finished():
            break
    reason = req.finished_reason
    return {"finish": None if reason is None else [type(reason).__name__, reason.to_json()],
            "finished_len": req.finished_len, "output_ids": list(req.output_ids)}


def finish_scenarios(cases) -> dict:
    """finish_scenario for each case (kwargs): one pristine subprocess for many cases."""
    return {"results": [finish_scenario(**case) for case in cases]}


def length(n):
    return ["FINISH_LENGTH", {"type": "length", "length": n}]


def matched_token(token):
    return ["FINISH_MATCHED_TOKEN", {"type": "stop", "matched": token}]


def flat(steps):
    return [t for step in steps for t in step]


# name: (scenario kwargs, patched (finish, finished_len)); SGLang as shipped: length at max_new_tokens
FIXED = {
    "stop_id_inside_an_acceptance_past_the_budget": (
        dict(steps=[[1], [5, STOP, 6, 8]], max_new_tokens=4, stop_token_ids=[STOP]), (matched_token(STOP), 3)),
    "stop_id_inside_an_acceptance_ending_at_the_budget": (
        dict(steps=[[1], [5, STOP, 6]], max_new_tokens=4, stop_token_ids=[STOP]), (matched_token(STOP), 3)),
    "eos_within_the_budget": (
        dict(steps=[[1], [EOS, 6, 8, 9]], max_new_tokens=3), (matched_token(EOS), 2)),
    "stop_string_inside_an_acceptance_past_the_budget": (  # "a" + "bxycd": "xy" ends at index 3
        dict(steps=[[0], [1, 23, 24, 2, 3]], max_new_tokens=5, stop="xy"),
        (["FINISH_MATCHED_STR", {"type": "stop", "matched": "xy"}], 4)),
    "stop_regex_inside_an_acceptance_past_the_budget": (
        dict(steps=[[0], [1, 23, 25, 2, 3]], max_new_tokens=5, stop_regex="x[yz]"),
        (["FINISHED_MATCHED_REGEX", {"type": "stop", "matched": "x[yz]"}], 4)),
}


@pytest.mark.parametrize("name", list(FIXED))
def test_a_stop_inside_an_acceptance_reaching_the_budget_finishes_there(sglang_ctx, name):
    case, (finish, finished_len) = FIXED[name]
    result = finish_scenario(**case)
    assert (result["finish"], result["finished_len"]) == (finish, finished_len)
    assert result["output_ids"] == flat(case["steps"])  # the checks' cut of output_ids is undone


def test_without_patch_the_budget_wins_over_the_stop():
    cases = [case for case, _ in FIXED.values()]
    results = run_on_pristine_sglang("test_finish_stop_before_length_patch", "finish_scenarios", cases=cases)
    got = [(r["finish"], r["finished_len"]) for r in results["results"]]
    assert got == [(length(c["max_new_tokens"]), c["max_new_tokens"]) for c in cases]


def test_an_out_of_vocab_id_inside_an_acceptance_past_the_budget_finishes_there(sglang_ctx):
    result = finish_scenario(steps=[[1], [5, BAD, 6, 8]], max_new_tokens=4)
    assert result["finish"] == ["FINISH_MATCHED_STR", {"type": "stop", "matched": "NaN happened"}]
    assert result["finished_len"] == 3
    assert result["output_ids"] == [1, 5, EOS, 6, 8]  # sanitized in place, the overshoot kept


# Acceptances that reach the budget but hold nothing before its last token: length, as in SGLang as shipped.
LENGTH_CASES = {
    "stop_id_past_the_budget": dict(steps=[[1], [5, 6, 7, STOP]], max_new_tokens=4, stop_token_ids=[STOP]),
    "stop_id_at_the_budgets_last_token": dict(steps=[[1], [5, 6, STOP, 8]], max_new_tokens=4,
                                              stop_token_ids=[STOP]),
    "stop_string_ending_past_the_budget": dict(steps=[[0], [1, 2, 23, 24, 3]], max_new_tokens=4, stop="xy"),
    "ignore_eos": dict(steps=[[1], [5, EOS, 6, 8]], max_new_tokens=4, ignore_eos=True),
    "ignore_eos_with_a_stop_id": dict(steps=[[1], [STOP, EOS, 6, 8]], max_new_tokens=4, stop_token_ids=[STOP],
                                      ignore_eos=True),
    "nothing_to_stop_at": dict(steps=[[1], [5, 6, 7, 8]], max_new_tokens=4, stop_token_ids=[STOP], stop="xy"),
}


@pytest.mark.parametrize("name", list(LENGTH_CASES))
def test_nothing_before_the_budget_finishes_with_length(sglang_ctx, name):
    case = LENGTH_CASES[name]
    result = finish_scenario(**case)
    assert (result["finish"], result["finished_len"]) == (length(4), 4)
    assert result["output_ids"] == flat(case["steps"])


# One-token steps, and acceptances that stay below the budget: exactly what SGLang as shipped does.
def _one_by_one(*tokens):
    return [[t] for t in tokens]


UNCHANGED = {
    "one_token_stop_id": dict(steps=_one_by_one(1, 5, STOP, 6, 8), max_new_tokens=4, stop_token_ids=[STOP]),
    "one_token_stop_id_at_the_budgets_last_token": dict(steps=_one_by_one(1, 5, 6, STOP, 8), max_new_tokens=4,
                                                        stop_token_ids=[STOP]),
    "one_token_eos": dict(steps=_one_by_one(1, EOS, 6), max_new_tokens=4),
    "one_token_eos_at_the_budgets_last_token": dict(steps=_one_by_one(1, 5, EOS), max_new_tokens=3),
    "one_token_stop_string": dict(steps=_one_by_one(0, 1, 23, 24, 2, 3), max_new_tokens=6, stop="xy"),
    "one_token_stop_string_at_the_budgets_last_token": dict(steps=_one_by_one(0, 1, 23, 24), max_new_tokens=4,
                                                            stop="xy"),
    "one_token_out_of_vocab": dict(steps=_one_by_one(1, 5, BAD, 6), max_new_tokens=4),
    "one_token_out_of_vocab_at_the_budgets_last_token": dict(steps=_one_by_one(1, 5, 6, BAD), max_new_tokens=4),
    "one_token_ignore_eos": dict(steps=_one_by_one(1, EOS, 6, 8), max_new_tokens=4, ignore_eos=True),
    "one_token_length": dict(steps=_one_by_one(1, 5, 6, 7, 8), max_new_tokens=4, stop_token_ids=[STOP]),
    "one_token_zero_budget": dict(steps=_one_by_one(STOP), max_new_tokens=0, stop_token_ids=[STOP]),
    "below_the_budget_stop_id": dict(steps=[[1], [5, STOP, 6]], max_new_tokens=10, stop_token_ids=[STOP]),
    "below_the_budget_stop_string": dict(steps=[[0], [1, 23, 24, 2]], max_new_tokens=10, stop="xy"),
    "below_the_budget_nothing": dict(steps=[[1], [5, 6, 7]], max_new_tokens=10, stop_token_ids=[STOP]),
}


@pytest.fixture(scope="module")
def pristine_unchanged():
    results = run_on_pristine_sglang("test_finish_stop_before_length_patch", "finish_scenarios",
                                     cases=list(UNCHANGED.values()))
    return dict(zip(UNCHANGED, results["results"]))


@pytest.mark.parametrize("name", list(UNCHANGED))
def test_one_token_steps_and_acceptances_below_the_budget_are_unchanged(sglang_ctx, pristine_unchanged, name):
    assert finish_scenario(**UNCHANGED[name]) == pristine_unchanged[name]


def _random_split(rng, tokens):
    steps, i = [], 0
    while i < len(tokens):
        n = rng.randint(1, 5)
        steps.append(tokens[i : i + n])
        i += n
    return steps


@pytest.mark.parametrize("kind", ["stop_id", "eos", "stop_string"])
def test_a_multi_token_acceptance_finishes_as_one_token_steps_would(sglang_ctx, kind):
    """Speculative or multi-step decode finishes a request exactly as plain decode does with the same tokens."""
    rng = random.Random(10)
    alphabet, extra = {"stop_id": ([1, 2, 3, STOP], {"stop_token_ids": [STOP]}),
                       "eos": ([1, 2, 3, EOS], {}),
                       "stop_string": ([22, 23, 24], {"stop": "xy"})}[kind]
    for _ in range(300):
        tokens = [rng.choice(alphabet) for _ in range(12)]
        kwargs = dict(max_new_tokens=rng.randint(1, 10), **extra)
        one_by_one = finish_scenario(steps=[[t] for t in tokens], **kwargs)
        split = finish_scenario(steps=_random_split(rng, tokens), **kwargs)
        assert (split["finish"], split["finished_len"]) == (one_by_one["finish"], one_by_one["finished_len"]), tokens
