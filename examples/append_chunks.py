"""Stream text to a running `sglang-microturn serve` as micro-turns of one streaming session.

Each line of input is one micro-turn: it is appended to the session's sequence, the server generates up to
--out-tokens for it, and both stay in the context for the next turn.

    sglang-microturn serve &            # wait for "The server is fired up"
    python examples/append_chunks.py "hello there" "how are you" "bye"
"""

import argparse
import json
import time
import urllib.request


def post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("chunks", nargs="+")
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--out-tokens", type=int, default=8)
    args = p.parse_args()
    sid = post(args.url + "/open_session", {"capacity_of_str_len": 0, "streaming": True})
    try:
        for i, text in enumerate(args.chunks):
            t0 = time.perf_counter()
            out = post(args.url + "/generate", {
                "text": text,
                "session_params": {"id": sid},
                "sampling_params": {"max_new_tokens": args.out_tokens, "temperature": 0},
            })
            meta = out["meta_info"]
            print(f"turn {i}: {(time.perf_counter() - t0) * 1e3:6.1f} ms, session length "
                  f"{meta['prompt_tokens'] + meta['completion_tokens']}, reused {meta['cached_tokens']}: "
                  f"{text!r} -> {out['text']!r}")
    finally:
        post(args.url + "/close_session", {"session_id": sid})


if __name__ == "__main__":
    main()
