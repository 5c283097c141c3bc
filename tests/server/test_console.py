"""The browser console (GET /microturn/console, sglang_microturn/examples/web/console.html) in headless
Chromium with a fake microphone fed from a WAV file, against the real /microturn API and WebSocket in front of
the stand-in tokenizer manager (tests/rigs/fake_sglang_http.py). Needs Chromium (`chromium` on PATH, or
MICROTURN_CHROMIUM) and Playwright's Python driver; .ci/run installs Chromium. With
MICROTURN_CONSOLE_SCREENSHOT=PATH the page is also saved there (docs/console.png)."""

import json
import os
import shutil
import urllib.request
import wave

import numpy as np
import pytest

from sglang_microturn.format.layout import Control, MicroTurnLayout

LAYOUT = MicroTurnLayout()
SPEC = LAYOUT.spec


def chromium() -> str | None:
    return os.environ.get("MICROTURN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def config_of(html: str) -> dict:
    return json.loads(html.split("const CONFIG = ", 1)[1].split(";\n", 1)[0])


def test_the_page_carries_the_served_layout(server):
    url, _ = server
    config = config_of(urllib.request.urlopen(url + "/microturn/console").read().decode())
    assert config == {"layout": True, "ws_path": "/microturn/ws", "period_ms": 200, "sample_rate": 16000,
                      "samples_per_turn": 3200, "out_budget": 16, "stop_ids": [int(Control.YIELD)]}


def test_without_a_layout_the_page_says_so():
    from sglang_microturn.server import console_page

    html = console_page.page(None)
    assert config_of(html) == {"layout": False, "ws_path": "/microturn/ws"} and "no micro-turn layout" in html


@pytest.mark.skipif(chromium() is None, reason="no Chromium (apt-get install chromium)")
def test_a_fake_microphone_streams_micro_turns_and_the_page_draws_them(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, tm = server
    t = np.arange(SPEC.sample_rate * 4) / SPEC.sample_rate
    voice = tmp_path / "voice.wav"
    with wave.open(str(voice), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SPEC.sample_rate)
        f.writeframes((9000 * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes())
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=[
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={voice}", "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page()
            console_errors = []
            page.on("console", lambda m: m.type == "error" and console_errors.append(m.text))
            page.goto(url + "/microturn/console?autostart=1")
            page.wait_for_function("window.consoleStats.turns >= 6", timeout=60_000)
            stats = page.evaluate("window.consoleStats")
            rows = page.locator("#timeline tr").count()
            page.screenshot(path=str(tmp_path / "console.png"))
            if os.environ.get("MICROTURN_CONSOLE_SCREENSHOT"):  # docs/console.png is taken this way
                page.screenshot(path=os.environ["MICROTURN_CONSOLE_SCREENSHOT"], full_page=True)
        finally:
            browser.close()
    assert stats["errors"] == [] and console_errors == []
    assert rows >= 6 and stats["turns"] >= 6 and len(stats["latencies"]) == stats["turns"]
    # every micro-turn was one whole period of the microphone, encoded by the server into a full block
    assert stats["length"] % SPEC.stride == 0 and stats["length"] // SPEC.stride >= 6
    assert stats["length"] in tm.lengths.values() or stats["length"] < max(tm.lengths.values())
    audio = [t for t in stats["lastInputIds"] if t in LAYOUT.vocab.dmel]
    assert len(audio) == SPEC.audio_tokens  # the fake microphone's tone, not silence
    assert (tmp_path / "console.png").stat().st_size > 0
