"""dMel front-end: streaming equals the whole signal, shapes, ranges, silence, and the layout hand-off."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_microturn.format.dmel import (
    DEFAULT_DMEL,
    AudioFormatError,
    DMelStream,
    dequantize,
    dmel_codes,
    is_silent,
    log_mel,
    mel_filterbank,
    quantize,
)
from sglang_microturn.format.layout import DEFAULT_LAYOUT, InputEvents

SPEC = DEFAULT_DMEL
TURN = DEFAULT_LAYOUT.spec.samples_per_turn  # 3200 samples = 200 ms


def _speechy(n, seed=0):
    """Noise bursts and tones at several levels: codes span many levels."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SPEC.sample_rate
    env = 0.5 * (1 + np.sin(2 * np.pi * 1.3 * t)) ** 2
    return (env * (0.3 * np.sin(2 * np.pi * 220 * t) + rng.normal(0, 0.05, n))).astype(np.float32)


def test_micro_turn_chunks_equal_whole_signal():
    x = _speechy(10 * TURN)
    stream = DMelStream()
    chunks = [stream.push(x[i:i + TURN]) for i in range(0, len(x), TURN)]
    assert all(c.shape == (5, 16) for c in chunks)  # exactly the chunk's frames: no look-ahead, no lag
    assert np.array_equal(np.concatenate(chunks), dmel_codes(x))
    assert len(np.unique(dmel_codes(x))) > 6


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 2000), min_size=1, max_size=12), st.integers(0, 3))
def test_any_chunking_equals_whole_signal(sizes, seed):
    x = _speechy(sum(sizes), seed)
    stream, parts, i = DMelStream(), [], 0
    for n in sizes:
        parts.append(stream.push_log_mel(x[i:i + n]))
        i += n
    whole = log_mel(x)
    got = np.concatenate(parts)
    assert got.shape == whole.shape == (len(x) // SPEC.hop, SPEC.n_mels)
    assert np.array_equal(got, whole)  # bitwise: same frames, same per-frame arithmetic


def test_causal_a_frame_ignores_later_samples():
    x = _speechy(3 * TURN)
    y = x.copy()
    y[TURN:] = 0.9  # change everything after the first micro-turn
    assert np.array_equal(dmel_codes(x)[:5], dmel_codes(y)[:5])


def test_ranges_and_shapes():
    codes = dmel_codes(_speechy(TURN + 100))
    assert codes.shape == (5, 16) and codes.dtype == np.int64  # the trailing 100 samples make no frame
    assert codes.min() >= 0 and codes.max() <= SPEC.levels - 1
    loud = dmel_codes(np.sin(np.arange(TURN) * 0.3))  # full-scale tone saturates its bin
    assert loud.max() == SPEC.levels - 1
    fb = mel_filterbank()
    assert fb.shape == (16, SPEC.n_fft // 2 + 1) and (fb >= 0).all() and (fb.max(1) > 0.5).all()
    # dequantize lands inside each code's bin
    assert np.array_equal(quantize(dequantize(codes)), codes)


def test_int16_and_float_agree():
    x = _speechy(TURN)
    pcm16 = np.round(x * 32767).astype(np.int16)
    assert np.abs(log_mel(pcm16) - log_mel(pcm16.astype(np.float64) / 32768)).max() == 0


def test_silence():
    assert not dmel_codes(np.zeros(TURN)).any()
    assert is_silent(dmel_codes(np.zeros(TURN))) and is_silent(DMelStream().push(np.zeros(TURN, np.int16)))
    assert is_silent(dmel_codes(np.random.default_rng(0).normal(0, 1e-6, TURN)))  # far below the floor
    assert not is_silent(dmel_codes(_speechy(TURN)))


def test_codes_feed_the_layout():
    codes = DMelStream().push(_speechy(TURN))
    ev = InputEvents(audio=codes, text="hi")
    assert DEFAULT_LAYOUT.decode_input(DEFAULT_LAYOUT.encode_input(ev)) == ev


@pytest.mark.parametrize("pcm, words", [(np.zeros((2, 100)), "mono 1-D"), (np.zeros(100, np.int32), "int32")])
def test_bad_pcm(pcm, words):
    with pytest.raises(AudioFormatError, match=words):
        dmel_codes(pcm)
