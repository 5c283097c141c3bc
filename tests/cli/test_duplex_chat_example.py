"""sglang_microturn/examples/duplex_chat.py (what `sglang-microturn demo` runs) end to end over real HTTP and
over the WebSocket, against the stand-in tokenizer manager."""

import asyncio
import importlib
import re

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
