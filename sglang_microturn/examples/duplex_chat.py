"""A simulated user talks to `sglang-microturn serve` in real time, one 200 ms micro-turn per append.

The user's side is a script over wall time: a hum of audio while they start, text typed a few characters
per micro-turn, a silence, then an interruption ("wait!") typed while the model is still producing output.
Each micro-turn's input (dMel audio codes + typed bytes, or silence) goes through the micro-turn layout
(sglang_microturn.format.layout) and the streaming dMel front-end (sglang_microturn.format.dmel); the model's output block
comes back in the same append. The interleaved timeline is printed with each micro-turn's latency.

    sglang-microturn serve &                  # or: sglang-microturn demo (starts, runs this, stops)
    python -m sglang_microturn.examples.duplex_chat [--url http://127.0.0.1:30000] [--turns 25] [--transport ws]
    python -m sglang_microturn.examples.duplex_chat --wav speech.wav   # a real recording, encoded by the server

The default model has random weights: what it "says" is noise; the timing and the layout are the point.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import wave

import numpy as np

from sglang_microturn.client import MicroTurnClient, MicroTurnWebSocket
from sglang_microturn.format.dmel import DMelStream
from sglang_microturn.format.layout import Control, InputEvents, LayoutError, MicroTurnLayout

SAMPLE_RATE = 16_000


def user_script(turns: int, samples_per_turn: int) -> list[tuple[np.ndarray | None, str]]:
    """(audio PCM or None, typed text) for each micro-turn."""
    t = np.arange(samples_per_turn) / SAMPLE_RATE
    hum = (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    typed = "hello, can you hear me?"
    script: list[tuple[np.ndarray | None, str]] = []
    for k in range(turns):
        if k < 2:
            script.append((hum, ""))  # the user hums while starting to talk
        elif k < 2 + (len(typed) + 3) // 4:
            i = (k - 2) * 4
            script.append((None, typed[i: i + 4]))  # typing, ~4 characters per 200 ms
        elif k == turns // 2 + 3:
            script.append((None, "wait!"))  # interruption while the model is talking
        else:
            script.append((None, ""))  # silence stays in the context too
    return script


def describe_output(layout: MicroTurnLayout, output_ids: list[int], turn: int) -> str:
    if not output_ids:
        return "-"
    try:
        return repr(layout.decode_output(output_ids, turn=turn).text)
    except LayoutError:  # an untrained model may emit ids outside its output stream
        return f"ids {output_ids}"


async def open_session(stack: contextlib.AsyncExitStack, url: str, transport: str, **options):
    """A session over `transport` ("http": one request per micro-turn; "ws": one WebSocket), closed with `stack`."""
    if transport == "ws":
        session = await MicroTurnWebSocket.open(url, **options)
    else:
        client = MicroTurnClient(url)
        stack.push_async_callback(client.close)
        session = await client.open(**options)
    stack.push_async_callback(session.close)
    return session


async def chat(url: str, turns: int, transport: str = "http") -> int:
    layout = MicroTurnLayout()
    spec = layout.spec
    period_s = spec.period_ms / 1000
    audio = DMelStream()
    previous_output = None
    latencies, lateness = [], []
    async with contextlib.AsyncExitStack() as stack:
        session = await open_session(stack, url, transport, output_budget=spec.out_budget,
                                     stop_ids=[Control.YIELD])
        print(f"session {session.session_id} over {transport}: {turns} micro-turns of {spec.period_ms} ms, "
              f"{spec.stride} positions each")
        print(f"{'turn':>4} {'t(ms)':>6}  {'user':<28} {'model (output ids)':<40} {'latency':>8} {'late':>6}")
        start = time.monotonic()
        for k, (pcm, text) in enumerate(user_script(turns, spec.samples_per_turn)):
            codes = audio.push(pcm if pcm is not None else np.zeros(spec.samples_per_turn, np.float32))
            events = InputEvents(audio=codes if pcm is not None else None, text=text)
            ids = layout.append_ids(events, previous_output, turn=k)
            due = start + k * period_s  # micro-turn k's slot on the real-time clock
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            sent = time.monotonic()
            reply = await session.append(ids)
            latencies.append((time.monotonic() - sent) * 1e3)
            lateness.append(max(0.0, sent - due) * 1e3)
            previous_output = reply["output_ids"]
            user = ("~audio~ " if pcm is not None else "") + (repr(text) if text else "")
            model = describe_output(layout, previous_output, k)
            print(f"{k:>4} {layout.turn_start_ms(k):>6}  {user or '(silence)':<28} {model[:40]:<40} "
                  f"{latencies[-1]:>6.1f}ms {lateness[-1]:>4.0f}ms")
    lat = sorted(latencies)
    print(f"{len(lat)} micro-turns: p50 {lat[len(lat) // 2]:.1f} ms, max {lat[-1]:.1f} ms; sent at most "
          f"{max(lateness):.1f} ms after its slot")
    return 0


def read_wav(path: str, sample_rate: int) -> np.ndarray:
    """A WAV file's samples as int16: 16-bit mono PCM at `sample_rate` only (convert others first, e.g.
    `ffmpeg -i in.wav -ac 1 -ar 16000 -sample_fmt s16 out.wav`)."""
    with wave.open(path, "rb") as f:
        form = (f.getnchannels(), f.getsampwidth(), f.getframerate())
        if form != (1, 2, sample_rate):
            raise SystemExit(f"{path}: {form[0]} channel(s), {8 * form[1]}-bit, {form[2]} Hz; the model takes mono "
                             f"16-bit PCM at {sample_rate} Hz (ffmpeg -i {path} -ac 1 -ar {sample_rate} "
                             "-sample_fmt s16 out.wav)")
        return np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").astype(np.int16)


async def chat_wav(url: str, path: str) -> int:
    """Stream a WAV file in real time over the WebSocket, one period of PCM per micro-turn, for the server to
    encode (no layout or front-end on this side); prints what the model said in each micro-turn."""
    spec = MicroTurnLayout().spec
    pcm = read_wav(path, spec.sample_rate)
    n = spec.samples_per_turn
    chunks = [pcm[i:i + n] for i in range(0, len(pcm), n)]
    if chunks and len(chunks[-1]) < n:
        chunks[-1] = np.concatenate([chunks[-1], np.zeros(n - len(chunks[-1]), np.int16)])  # the period ends
    period_s = spec.period_ms / 1000
    latencies = []
    async with await MicroTurnWebSocket.open(url, output_budget=spec.out_budget, stop_ids=[Control.YIELD]) as ws:
        print(f"session {ws.session_id} over ws: {path}, {len(chunks)} micro-turns of {spec.period_ms} ms")
        print(f"{'turn':>4} {'t(ms)':>6}  {'model said':<40} {'latency':>8}")
        start = time.monotonic()
        for k, chunk in enumerate(chunks):
            await asyncio.sleep(max(0.0, start + k * period_s - time.monotonic()))
            sent = time.monotonic()
            reply = await ws.append_input(chunk)
            latencies.append((time.monotonic() - sent) * 1e3)
            said = reply["output"]["text"] + (" <yield>" if reply["output"]["yielded"] else "")
            print(f"{k:>4} {k * spec.period_ms:>6}  {said[:40]!r:<40} {latencies[-1]:>6.1f}ms")
        await ws.close()
    lat = sorted(latencies)
    if lat:
        print(f"{len(lat)} micro-turns: p50 {lat[len(lat) // 2]:.1f} ms, max {lat[-1]:.1f} ms")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--turns", type=int, default=25)
    p.add_argument("--transport", choices=("http", "ws"), default="http",
                   help="http: one request per micro-turn; ws: one WebSocket (WS /microturn/ws) for the session")
    p.add_argument("--wav", metavar="FILE", help="stream this WAV file (16-bit mono 16 kHz) in real time instead of "
                   "the scripted user, over the WebSocket; the server encodes its audio")
    args = p.parse_args()
    if args.wav:
        return asyncio.run(chat_wav(args.url, args.wav))
    return asyncio.run(chat(args.url, args.turns, args.transport))


if __name__ == "__main__":
    sys.exit(main())
