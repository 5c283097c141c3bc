"""The micro-turn layout: round trips (hypothesis) and every error path."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_microturn.format.layout import (
    BlockOrderError,
    BudgetError,
    Control,
    InputEvents,
    LayoutError,
    LayoutSpec,
    MicroTurnLayout,
    OutputEvents,
    TokenRangeError,
)

L = MicroTurnLayout()
S = L.spec


@st.composite
def input_events(draw, spec=S):
    audio = None
    if draw(st.booleans()):
        audio = np.array(draw(st.lists(st.integers(0, spec.mel_levels - 1), min_size=spec.audio_tokens,
                                       max_size=spec.audio_tokens))).reshape(spec.frames_per_turn, spec.n_mels)
    return InputEvents(audio=audio, text=draw(st.binary(max_size=spec.text_in_budget)))


output_events = st.builds(OutputEvents, st.binary(max_size=S.out_budget))
turns = st.lists(st.tuples(input_events(), output_events), max_size=6)


def test_vocab_ranges_are_disjoint_and_cover_the_padded_vocab():
    v = L.vocab
    ranges = [v.control, v.text_out, v.text_in, v.dmel]
    assert [r.start for r in ranges[1:]] == [r.stop for r in ranges[:-1]] and v.control.start == 0
    assert v.size % 64 == 0 and v.size >= v.dmel.stop
    assert S.stride == 1 + S.in_budget + 1 + S.out_budget == 114
    assert S.frames_per_turn == 5 and S.samples_per_turn == 3200


@settings(max_examples=60, deadline=None)
@given(input_events())
def test_input_block_round_trip(ev):
    block = L.encode_input(ev)
    assert len(block) == S.input_block_len and block[0] == Control.IN
    assert all(t == Control.SILENCE or t in L.vocab.text_in or t in L.vocab.dmel or t == Control.PAD for t in block[1:])
    assert L.decode_input(block) == ev


@settings(max_examples=60, deadline=None)
@given(output_events)
def test_output_block_round_trip(ev):
    body = L.output_body(ev)
    assert len(body) <= S.out_budget and (body[-1] == Control.YIELD) == (len(ev.text) < S.out_budget)
    assert L.decode_output(body) == ev  # what a server returns
    block = L.encode_output(ev)
    assert len(block) == S.output_block_len and L.decode_output(block[1:], complete=True) == ev


@settings(max_examples=40, deadline=None)
@given(turns)
def test_interleave_split_round_trip(conv):
    ids = L.interleave(conv)
    assert len(ids) == len(conv) * S.stride
    got = L.split(ids)
    assert [(t.input, t.output) for t in got] == conv
    assert all(t.complete for t in got) and [t.index for t in got] == list(range(len(conv)))


@settings(max_examples=40, deadline=None)
@given(turns.filter(bool))
def test_served_appends_rebuild_the_interleaved_sequence(conv):
    """Appends (pad fill + input block + <|out|>) plus what the model generated == the interleaved sequence,
    and every micro-turn starts at k * stride: position is time."""
    seq, prev = [], None
    for k, (inp, out) in enumerate(conv):
        seq += L.append_ids(inp, prev, turn=k)
        assert len(seq) == L.output_start_position(k) + 1
        prev = L.output_body(out, k)
        seq += prev
    seq += [Control.PAD] * (S.out_budget - len(prev))
    assert seq == L.interleave(conv)


@settings(max_examples=30, deadline=None)
@given(turns.filter(bool), st.data())
def test_split_accepts_a_served_sequence_cut_in_its_last_turn(conv, data):
    ids = L.interleave(conv)
    last = len(conv) - 1
    body = L.output_body(conv[-1][1])
    cut = data.draw(st.integers(0, 1 + len(body)))  # 0: only the input block, 1: + <|out|>, ...
    served = ids[:L.output_start_position(last)] + ids[L.output_start_position(last):][:cut]
    got = L.split(served)
    assert [(t.input, t.output) for t in got[:-1]] == conv[:-1] and got[-1].input == conv[-1][0]
    if cut == 0:
        assert got[-1].output is None and not got[-1].complete
    else:
        assert got[-1].output.text == conv[-1][1].text[:max(cut - 1, 0)]


@given(st.integers(0, 10**6))
def test_position_time_mapping(pos):
    k = L.turn_of_position(pos)
    assert L.turn_start_position(k) <= pos < L.turn_start_position(k + 1)
    start, end = L.position_time_ms(pos)
    assert (start, end) == (k * 200, k * 200 + 200) and L.turn_at_ms(start) == k and L.turn_at_ms(end - 0.5) == k
    assert L.block_of_position(pos) == ("input" if pos - k * S.stride < S.input_block_len else "output")


def test_every_id_has_a_distinct_name():
    names = [L.token_name(i) for i in range(L.vocab.size)]
    assert len(set(names)) == len(names)
    assert names[:5] == ["<|pad|>", "<|in|>", "<|out|>", "<|silence|>", "<|yield|>"]


# ---- error paths ------------------------------------------------------------------------------------------
AUDIO = np.zeros((S.frames_per_turn, S.n_mels), dtype=np.int64)


@pytest.mark.parametrize("kwargs, err, words", [
    (dict(period_ms=210), LayoutError, "multiple of frame_hop_ms"),
    (dict(frame_hop_ms=0), LayoutError, "positive multiple"),
    (dict(sample_rate=16001, frame_hop_ms=40, period_ms=200), LayoutError, "whole number of samples"),
    (dict(n_mels=0), LayoutError, "n_mels=0"),
    (dict(out_budget=0), LayoutError, "out_budget=0"),
    (dict(text_in_budget=-1), LayoutError, "text_in_budget=-1"),
])
def test_bad_spec(kwargs, err, words):
    with pytest.raises(err, match=words):
        LayoutSpec(**kwargs)


@pytest.mark.parametrize("events, err, words", [
    (InputEvents(text=b"x" * 17), BudgetError, "17 text bytes; the budget is 16"),
    (InputEvents(audio=np.zeros((4, 16), dtype=int)), BudgetError, r"shape \(4, 16\).*exactly \(5, 16\)"),
    (InputEvents(audio=np.full((5, 16), 16)), TokenRangeError, "levels are 0..15"),
    (InputEvents(audio=np.full((5, 16), -1)), TokenRangeError, "levels are 0..15"),
])
def test_encode_input_errors(events, err, words):
    with pytest.raises(err, match=words):
        L.encode_input(events, turn=3)
    with pytest.raises(err, match="input block of micro-turn 3"):
        L.encode_input(events, turn=3)


def test_encode_output_over_budget():
    with pytest.raises(BudgetError, match="17 text bytes; the output budget is 16"):
        L.encode_output(OutputEvents(b"y" * 17), turn=2)


def _block(events=InputEvents(audio=AUDIO, text=b"hi")):
    return L.encode_input(events)


def _with(block, i, t):
    block = list(block)
    block[i] = t
    return block


@pytest.mark.parametrize("block, err, words", [
    (_block()[:-1], BlockOrderError, "the block is exactly"),
    (_with(_block(), 0, Control.OUT), BlockOrderError, r"starts with <\|out\|>; it must start with <\|in\|>"),
    (_with(_block(), 1, L.text_out_id(65)), TokenRangeError, "offset 1 holds <|out_byte_41|>".replace("|", r"\|")),
    (_with(_block(), 1, Control.PAD), TokenRangeError, "an input block starts with dMel"),
    (_with(_block(), 2, L.dmel_id(5, 0)), BlockOrderError, "needs mel bin 1"),
    (_with(_block(), 40, L.text_in_id(1)), BlockOrderError, "audio ends after 39 dMel tokens"),
    (_with(_block(), S.audio_tokens + 4, L.text_in_id(1)), BlockOrderError, "after the input payload"),
    (_with(_block(InputEvents()), 2, L.text_in_id(1)), BlockOrderError, r"after <\|silence\|>"),
    (_with(_block(), S.audio_tokens + 3, 7), BlockOrderError, r"<\|reserved_7\|>"),
    (_with(_block(), S.audio_tokens + 3, L.vocab.size - 1), BlockOrderError, "unused"),
])
def test_decode_input_errors(block, err, words):
    with pytest.raises(err, match=words):
        L.decode_input(block)


def test_decode_input_text_over_budget():
    spec = LayoutSpec(text_in_budget=2)
    lay = MicroTurnLayout(spec)
    block = [Control.IN] + [lay.text_in_id(1)] * spec.in_budget  # in_budget = 80 audio + 2 text slots
    with pytest.raises(BudgetError, match="the budget is 2"):
        lay.decode_input(block)


@pytest.mark.parametrize("generated, complete, err, words", [
    ([L.text_out_id(1)] * 17, False, BudgetError, "17 tokens; the output budget is 16"),
    ([L.text_in_id(1)], False, TokenRangeError, "the model's stream is text_out"),
    ([Control.OUT], False, TokenRangeError, r"<\|out\|>"),
    ([L.text_out_id(1), Control.YIELD, L.text_out_id(1)], False, BlockOrderError, r"after <\|yield\|>"),
    ([L.text_out_id(1), Control.YIELD], True, BlockOrderError, "complete output block body has 16"),
    ([L.text_out_id(1)] + [Control.PAD] * 15, True, TokenRangeError, r"<\|pad\|>"),
])
def test_decode_output_errors(generated, complete, err, words):
    with pytest.raises(err, match=words):
        L.decode_output(generated, turn=1, complete=complete)


def test_append_ids_errors():
    ev = InputEvents(text=b"a")
    with pytest.raises(BudgetError, match="max_new_tokens=16"):
        L.append_ids(ev, [L.text_out_id(0)] * 17, turn=1)
    with pytest.raises(BlockOrderError, match=r"output block of micro-turn 0: generation stopped after 3 of 16"):
        L.append_ids(ev, [L.text_out_id(0)] * 3, turn=1)
    with pytest.raises(BlockOrderError, match="after 0 of 16"):
        L.append_ids(ev, [], turn=1)


@pytest.mark.parametrize("mutate, err, words", [
    (lambda ids: ids[:S.stride + 10], BlockOrderError, "micro-turn 1: the sequence ends 10 ids into it"),
    (lambda ids: _with(ids, S.input_block_len, Control.IN), BlockOrderError, r"output block of micro-turn 0: starts with <\|in\|>"),
    (lambda ids: _with(ids, S.stride, Control.OUT), BlockOrderError, r"input block of micro-turn 1: starts with <\|out\|>"),
    (lambda ids: ids[:S.input_block_len] + ids[S.stride:], BlockOrderError, "micro-turn 0"),  # a missing output block
])
def test_split_errors(mutate, err, words):
    ids = L.interleave([(InputEvents(text=b"a"), OutputEvents(b"b"))] * 3)
    with pytest.raises(err, match=words):
        L.split(mutate(ids))


def test_negative_position_and_time():
    with pytest.raises(LayoutError, match="negative"):
        L.turn_of_position(-1)
    with pytest.raises(LayoutError, match="before the session start"):
        L.turn_at_ms(-5)
