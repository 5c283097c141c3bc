"""Micro-turns sent as audio and text (`input`), encoded by the server (server/layout_turns.py), over the HTTP
API and the WebSocket, against the stand-in tokenizer manager (tests/rigs/fake_sglang_http.py), whose model
records the default layout."""

import asyncio
import base64
from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fake_sglang_http import FakeTokenizerManager, app_for, serve_on_loopback

from sglang_microturn.client import errors
from sglang_microturn.client.ws_session import MicroTurnWebSocket, pcm_base64
from sglang_microturn.format.dmel import DEFAULT_DMEL, DMelStream, dmel_codes
from sglang_microturn.format.layout import Control, InputEvents, MicroTurnLayout
from sglang_microturn.server.api_handlers import Backend, MicroTurnAPI
from sglang_microturn.server.layout_turns import FrontEnd, LayoutTurns

LAYOUT = MicroTurnLayout()
SPEC = LAYOUT.spec
N = SPEC.samples_per_turn


@pytest.fixture
def tm():
    return FakeTokenizerManager()


@pytest.fixture
def client(tm, monkeypatch):
    monkeypatch.setenv("MICROTURN_SESSION_KV_TOKENS", "100000")
    return TestClient(app_for(MicroTurnAPI(lambda: Backend(tm, max_total_num_tokens=100_000))))


def speech(turns: int, seed: int = 0) -> np.ndarray:
    """int16 PCM: a tone whose pitch wanders, with noise (every dMel level gets used)."""
    rng = np.random.default_rng(seed)
    t = np.arange(turns * N) / SPEC.sample_rate
    wave = 0.4 * np.sin(2 * np.pi * (300 + 200 * np.sin(3 * t)) * t) + 0.05 * rng.standard_normal(len(t))
    return np.clip(wave * 32768, -32768, 32767).astype(np.int16)


def open_session(client) -> str:
    r = client.post("/microturn/open", json={"output_budget": SPEC.out_budget})
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def append(client, sid, **given):
    return client.post("/microturn/append", json={"session_id": sid, "input": given})


def tokens(client, sid) -> list[int]:
    return client.get(f"/microturn/sessions/{sid}", params={"tokens": True}).json()["tokens"]


# Turn k: audio or none, text or none (None = no audio in that micro-turn).
SCRIPT = [(True, ""), (True, "hi"), (False, ""), (False, "ok?"), (True, "é"), (True, "")]


def client_side_ids(pcm: np.ndarray, outputs: list[list[int]]) -> list[list[int]]:
    """What a client with its own DMelStream and layout sends for SCRIPT (zeros where a turn has no audio)."""
    stream, appends, previous = DMelStream(), [], None
    for k, (has_audio, text) in enumerate(SCRIPT):
        chunk = pcm[k * N:(k + 1) * N] if has_audio else np.zeros(N, np.int16)
        codes = stream.push(chunk)
        appends.append(LAYOUT.append_ids(InputEvents(audio=codes if has_audio else None, text=text), previous, k))
        previous = outputs[k]
    return appends


def test_audio_and_text_build_the_ids_a_client_would(client):
    pcm, sid = speech(len(SCRIPT)), open_session(client)
    replies = []
    for k, (has_audio, text) in enumerate(SCRIPT):
        given = {"text": text}
        if has_audio:
            given["audio"] = pcm_base64(pcm[k * N:(k + 1) * N])
        r = append(client, sid, **given)
        assert r.status_code == 200, r.text
        replies.append(r.json())
    want = client_side_ids(pcm, [r["output_ids"] for r in replies])
    assert [r["input_ids"] for r in replies] == want
    assert tokens(client, sid) == [t for r, ids in zip(replies, want) for t in ids + r["output_ids"]]
    assert all(len(r["output_ids"]) == SPEC.out_budget for r in replies)  # the layout's budget


def test_streamed_audio_encodes_as_the_whole_signal(client):
    """Every micro-turn's audio codes, read back from the blocks the server built, are the whole signal's."""
    turns = 5
    pcm, sid = speech(turns, seed=3), open_session(client)
    blocks = []
    for k in range(turns):
        reply = append(client, sid, audio=pcm_base64(pcm[k * N:(k + 1) * N])).json()
        ids = reply["input_ids"]
        blocks.append(ids[len(ids) - 1 - SPEC.input_block_len:-1])  # after the pad fill, before <|out|>
    served = np.concatenate([LAYOUT.decode_input(b, k).audio for k, b in enumerate(blocks)])
    assert np.array_equal(served, dmel_codes(pcm, DEFAULT_DMEL))


@pytest.mark.parametrize("given, message", [
    ({"audio": pcm_base64(np.zeros(N - 1, np.int16))}, f"exactly {N}"),
    ({"audio": "not base64!"}, "not valid base64"),
    ({"audio": base64.b64encode(b"\0\0\0").decode()}, "even number"),
    ({"audio": 7}, "base64 string"),
    ({"text": "x" * (SPEC.text_in_budget + 1)}, "budget"),
    ({"text": 5}, "must be a string"),
    ({"speech": ""}, "unknown field"),
])
def test_a_bad_input_is_a_400_that_changes_nothing(client, given, message):
    pcm, sid = speech(2), open_session(client)
    first = append(client, sid, audio=pcm_base64(pcm[:N])).json()
    before = tokens(client, sid)
    r = append(client, sid, **given)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert tokens(client, sid) == before
    # The front-end did not advance either: the next micro-turn is built as if the bad one never came.
    second = append(client, sid, audio=pcm_base64(pcm[N:])).json()
    stream = DMelStream()
    stream.push(pcm[:N])
    want = LAYOUT.append_ids(InputEvents(audio=stream.push(pcm[N:])), first["output_ids"], 1)
    assert second["input_ids"] == want


def test_an_aborted_turn_leaves_the_front_end_where_it_was(client, tm):
    pcm, sid = speech(2), open_session(client)
    first = append(client, sid, audio=pcm_base64(pcm[:N])).json()
    tm.abort_next = ("injected", 503)
    assert append(client, sid, audio=pcm_base64(pcm[N:])).status_code == 503
    again = append(client, sid, audio=pcm_base64(pcm[N:])).json()
    stream = DMelStream()
    stream.push(pcm[:N])
    assert again["input_ids"] == LAYOUT.append_ids(InputEvents(audio=stream.push(pcm[N:])), first["output_ids"], 1)


@pytest.mark.parametrize("extra, message", [
    ({"input_ids": [10]}, "not both"),
    ({"output_budget": 1}, "whole output block"),
])
def test_input_with_ids_or_another_budget_is_refused(client, extra, message):
    sid = open_session(client)
    r = client.post("/microturn/append", json={"session_id": sid, "input": {}, **extra})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert tokens(client, sid) == []


def test_a_model_without_a_layout_refuses_input(client, tm):
    tm.model_config.hf_config = None
    sid = open_session(client)
    r = append(client, sid, text="hi")
    assert r.status_code == 400 and "no micro-turn layout" in r.json()["error"]["message"]


def test_the_reply_says_what_the_model_said_across_micro_turns():
    turns = LayoutTurns(LAYOUT)
    front = FrontEnd(DMelStream())
    said = "é!".encode()  # 0xC3 0xA9 0x21: the character is cut after its first byte
    first = turns.output(front, [LAYOUT.text_out_id(said[0])] * 1)
    second = turns.output(front, [LAYOUT.text_out_id(b) for b in said[1:]] + [int(Control.YIELD)])
    assert first == {"text": "", "yielded": False} and second == {"text": "é!", "yielded": True}


def test_over_the_websocket(tm, monkeypatch):
    monkeypatch.setenv("MICROTURN_SESSION_KV_TOKENS", "100000")
    api = MicroTurnAPI(lambda: Backend(tm, max_total_num_tokens=100_000))
    pcm = speech(2)

    async def go(url):
        async with await MicroTurnWebSocket.open(url, output_budget=SPEC.out_budget) as ws:
            first = await ws.append_input(pcm[:N].astype(np.float32) / 32768.0, "hi")  # floats go as int16
            with pytest.raises(errors.BadRequestError, match=f"exactly {N}"):
                await ws.append_input(pcm[:10])
            second = await ws.append_input(pcm[N:])
            return first, second

    with serve_on_loopback(app_for(api)) as url:
        first, second = asyncio.run(go(url))
    stream = DMelStream()
    assert first["input_ids"] == LAYOUT.append_ids(InputEvents(audio=stream.push(pcm[:N]), text="hi"), None, 0)
    assert second["input_ids"] == LAYOUT.append_ids(InputEvents(audio=stream.push(pcm[N:])), first["output_ids"], 1)
    assert second["committed_length"] == sum(len(r["input_ids"]) + len(r["output_ids"]) for r in (first, second))


def test_the_layout_is_read_from_the_checkpoint_config_as_sglang_loads_it(tmp_path):
    """SGLang's ModelConfig.hf_config is `get_config` of the checkpoint: our config.json's layout survives it."""
    import json
    from types import SimpleNamespace

    from sglang.srt.utils.hf_transformers_utils import get_config

    from sglang_microturn.model import checkpoints
    from sglang_microturn.server.layout_turns import layout_of

    spec = checkpoints.preset("small", layout=replace(SPEC, out_budget=12))
    (tmp_path / "config.json").write_text(json.dumps(checkpoints.hf_config(spec, "small")))
    hf_config = get_config(str(tmp_path), trust_remote_code=False)
    assert layout_of(SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config))).spec.out_budget == 12
