"""sglang_microturn/examples/duplex_chat.py (what `sglang-microturn demo` runs) end to end over real HTTP and
over the WebSocket, against the stand-in tokenizer manager."""

import asyncio
import importlib
import re
import wave

import numpy as np
import pytest


def load_example():
    return importlib.import_module("sglang_microturn.examples.duplex_chat")


@pytest.mark.parametrize("transport", ["http", "ws"])
def test_duplex_chat_prints_a_paced_timeline(server, capsys, transport):  # noqa: F811
    url, tm = server
    assert asyncio.run(load_example().chat(url, turns=12, transport=transport)) == 0
    out = capsys.readouterr().out
    assert f"over {transport}:" in out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
    assert len(rows) == 12
    assert [int(r.split()[1]) for r in rows] == [200 * k for k in range(12)]  # micro-turn k starts at 200k ms
    assert "~audio~" in rows[0] and "'hell'" in rows[2] and "(silence)" in out
    assert re.search(r"12 micro-turns: p50 [\d.]+ ms", out)
    # every append carried one whole micro-turn input block (+ the pad fill closing the previous output) and
    # the stand-in generated a full 16-token output block: 12 micro-turns of exactly 114 positions
    assert tm.closed_lengths == [12 * 114]


def write_wav(path, samples, rate=16_000, channels=1):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.asarray(samples, "<i2").tobytes())


def test_a_wav_file_streams_one_period_per_micro_turn(server, capsys, tmp_path):
    url, tm = server
    t = np.arange(int(16_000 * 0.9)) / 16_000  # 0.9 s: 4 whole periods and a last one padded with silence
    path = tmp_path / "speech.wav"
    write_wav(path, 8000 * np.sin(2 * np.pi * 440 * t))
    assert asyncio.run(load_example().chat_wav(url, str(path))) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
    assert [int(r.split()[1]) for r in rows] == [0, 200, 400, 600, 800]
    assert "5 micro-turns" in out and tm.closed_lengths == [5 * 114]


def test_a_wav_in_another_format_is_refused_with_the_conversion(tmp_path):
    path = tmp_path / "stereo.wav"
    write_wav(path, np.zeros(200), rate=44_100, channels=2)
    with pytest.raises(SystemExit, match="ffmpeg -i .* -ac 1 -ar 16000"):
        load_example().read_wav(str(path), 16_000)
