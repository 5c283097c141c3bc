"""The browser console (GET /microturn/console) driven in headless Chromium with a fake microphone fed from a
WAV file: the page streams the microphone's 200 ms periods over WS /microturn/ws and draws every micro-turn.
`drive` is shared by the CPU test (tests/server/test_console.py, against the stand-in tokenizer manager) and
this script, which runs it against a real server on the GPU machine and writes a JSON record and a screenshot:

    python3 -m benchmarks.console_check --out benchmarks/results/console_check_h200.json \
        --screenshot benchmarks/results/console_h200.png              # starts `sglang-microturn serve`
    python3 -m benchmarks.console_check --url http://127.0.0.1:30000 --out /tmp/console.json

Needs Chromium (--chromium, MICROTURN_CHROMIUM, or `chromium` on PATH) and Playwright's Python driver.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import wave
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.run_record import write_result
from benchmarks.servers import benchmark_parser, serve_argv
from sglang_microturn.format.layout import MicroTurnLayout

SPEC = MicroTurnLayout().spec
# What makes Chromium's microphone a WAV file and lets the page take it without a prompt.
FAKE_MICROPHONE_ARGS = ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                        "--autoplay-policy=no-user-gesture-required",
                        # containers often mount a 64 MB /dev/shm, which Chromium's renderer outgrows
                        "--disable-dev-shm-usage")


def find_chromium() -> str | None:
    return os.environ.get("MICROTURN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def write_tone(path: str | os.PathLike, seconds: float) -> Path:
    """A 16-bit mono WAV at the layout's sample rate: a 300 Hz tone (so the dMel front-end sees sound)."""
    t = np.arange(int(SPEC.sample_rate * seconds)) / SPEC.sample_rate
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SPEC.sample_rate)
        f.writeframes((9000 * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes())
    return Path(path)


@dataclass
class ConsoleRun:
    stats: dict  # the page's window.consoleStats: turns, latencies, misses, errors, length, lastInputIds, ...
    timeline_rows: int
    console_errors: list[str]  # the page's console.error messages


def drive(url: str, chromium: str, wav: str | os.PathLike, min_turns: int, timeout_s: float = 60.0,
          screenshot: str | os.PathLike | None = None) -> ConsoleRun:
    """Open the console at `url` with `wav` as the microphone, wait for `min_turns` answered micro-turns,
    read the page's own statistics and (optionally) save a full-page screenshot."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            *FAKE_MICROPHONE_ARGS, f"--use-file-for-fake-audio-capture={wav}"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.goto(url.rstrip("/") + "/microturn/console?autostart=1")
            page.wait_for_function(f"window.consoleStats.turns >= {int(min_turns)}", timeout=timeout_s * 1e3)
            stats = page.evaluate("window.consoleStats")
            rows = page.locator("#timeline tr").count()
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return ConsoleRun(stats, rows, errors)


def checks(run: ConsoleRun, min_turns: int, audio_ids: Container[int]) -> dict[str, bool]:
    """What a working console shows: every micro-turn answered and drawn, each one whole period of the
    microphone encoded by the server into a full input block that carries the tone, no error anywhere."""
    s = run.stats
    return {
        "no_errors": s["errors"] == [] and run.console_errors == [],
        "turns_answered_and_drawn": s["turns"] >= min_turns and run.timeline_rows >= min_turns
        and len(s["latencies"]) == s["turns"],
        "whole_blocks_committed": s["length"] % SPEC.stride == 0 and s["length"] // SPEC.stride >= min_turns,
        "microphone_heard": sum(t in audio_ids for t in s["lastInputIds"]) == SPEC.audio_tokens,
    }


def main() -> int:
    p = benchmark_parser(__doc__, log="/tmp/console_check_server.log")
    p.add_argument("--url", help="a running server (default: start `sglang-microturn serve`)")
    p.add_argument("--chromium", default=find_chromium())
    p.add_argument("--turns", type=int, default=25, help="answered micro-turns to wait for")
    p.add_argument("--screenshot", help="save the page here (PNG)")
    p.add_argument("--work-dir", default="/tmp/console_check")
    args = p.parse_args()
    if not args.chromium:
        p.error("no Chromium: pass --chromium, set MICROTURN_CHROMIUM or put `chromium` on PATH")
    from sglang_microturn.cli.server_process import ServerProcess

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    wav = write_tone(work / "voice.wav", seconds=args.turns * SPEC.period_ms / 1e3 + 10)
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(
            ServerProcess(serve_argv(args.port, *args.sglang_args), args.port, args.log)).url
        run = drive(url, args.chromium, wav, args.turns, timeout_s=60 + args.turns, screenshot=args.screenshot)
    found = checks(run, args.turns, MicroTurnLayout().vocab.dmel)
    s = run.stats
    latencies = sorted(s["latencies"])
    write_result(args.out, {
        "turns": s["turns"], "timeline_rows": run.timeline_rows, "missed": s["missed"],
        "latency_p50_ms": latencies[len(latencies) // 2] if latencies else None,
        "latency_max_ms": latencies[-1] if latencies else None, "committed_length": s["length"],
        "errors": s["errors"], "console_errors": run.console_errors, "screenshot": args.screenshot,
        "checks": found, "passed": all(found.values())})
    print("checks", found)
    return 0 if all(found.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
