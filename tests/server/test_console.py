"""The browser console (GET /microturn/console, sglang_microturn/examples/web/console.html) in headless
Chromium with a fake microphone fed from a WAV file, against the real /microturn API and WebSocket in front of
the stand-in tokenizer manager (tests/rigs/fake_sglang_http.py), through benchmarks/console_check.py (which
runs the same against a real server on the GPU). Needs Chromium (`chromium` on PATH, or
MICROTURN_CHROMIUM) and Playwright's Python driver; .ci/run installs Chromium. With
MICROTURN_CONSOLE_SCREENSHOT=PATH the page is also saved there (docs/console.png)."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from benchmarks import console_check
from sglang_microturn.format.layout import Control, MicroTurnLayout

LAYOUT = MicroTurnLayout()
SPEC = LAYOUT.spec


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


@pytest.mark.skipif(console_check.find_chromium() is None, reason="no Chromium (apt-get install chromium)")
def test_a_fake_microphone_streams_micro_turns_and_the_page_draws_them(server, tmp_path):
    pytest.importorskip("playwright.sync_api")
    url, tm = server
    voice = console_check.write_tone(tmp_path / "voice.wav", seconds=4)
    run = console_check.drive(url, console_check.find_chromium(), voice, min_turns=6,
                              screenshot=os.environ.get("MICROTURN_CONSOLE_SCREENSHOT") or tmp_path / "console.png")
    found = console_check.checks(run, 6, LAYOUT.vocab.dmel)
    assert all(found.values()), (found, run)
    length = run.stats["length"]
    assert length in tm.lengths.values() or length < max(tm.lengths.values())  # what the server committed
    shot = Path(os.environ.get("MICROTURN_CONSOLE_SCREENSHOT") or tmp_path / "console.png")
    assert shot.stat().st_size > 0


def test_the_checks_fail_on_a_console_that_heard_nothing():
    run = console_check.ConsoleRun(stats={"turns": 6, "latencies": [10.0] * 6, "errors": [], "missed": 0,
                                          "length": 6 * SPEC.stride, "lastInputIds": []},
                                   timeline_rows=6, console_errors=[])
    found = console_check.checks(run, 6, LAYOUT.vocab.dmel)
    assert found == {"no_errors": True, "turns_answered_and_drawn": True, "whole_blocks_committed": True,
                     "microphone_heard": False}
    run.console_errors.append("WebSocket closed")
    assert not console_check.checks(run, 6, LAYOUT.vocab.dmel)["no_errors"]


@pytest.mark.skipif(console_check.find_chromium() is None, reason="no Chromium (apt-get install chromium)")
def test_the_gpu_check_script_writes_its_record(server, tmp_path):
    pytest.importorskip("playwright.sync_api")
    url, _ = server
    out, shot = tmp_path / "console.json", tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.console_check", "--url", url, "--turns", "6",
                           "--out", str(out), "--screenshot", str(shot), "--work-dir", str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["passed"] and record["turns"] >= 6 and record["latency_p50_ms"] > 0
    assert {"card", "git_commit", "command"} <= record.keys() and shot.stat().st_size > 0
