"""Rank where each server process spent its CPU in a py-spy profile of collapsed stacks
(`benchmarks/profile_level.sh` writes one: `py-spy record --subprocesses --format raw`).

    python -m benchmarks.profile_summary PROFILE.txt [--seconds S --rate HZ] [--top N] [--json OUT.json]

Each line of the profile is `frame;frame;...;frame COUNT`; with --subprocesses the frames begin with one
`process PID:"cmdline"` per ancestor, the sampled process last. Per process: its share of the sampling window
on CPU (samples / (seconds x rate), when both are given), the frames it spent the most samples under
(inclusive) and the innermost frames (self).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field


@dataclass
class ProcessProfile:
    samples: int = 0
    inclusive: Counter = field(default_factory=Counter)
    self_time: Counter = field(default_factory=Counter)


def process_name(frame: str) -> str:
    """`process 673:"python3 -m sglang.launch_server ..."` -> a short name for the process."""
    cmdline = frame.split(":", 1)[1].strip('"')
    if "launch_server" in cmdline or "sglang-microturn" in cmdline:
        return "http+tokenizer_manager"
    return cmdline.removeprefix("sglang::")


def parse(lines) -> dict[str, ProcessProfile]:
    profiles: dict[str, ProcessProfile] = defaultdict(ProcessProfile)
    for line in lines:
        line = line.rstrip()
        if not line:
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        processes = [f for f in frames if f.startswith("process ")]
        profile = profiles[process_name(processes[-1]) if processes else "?"]
        calls = [f for f in frames if not f.startswith(("process ", "thread "))]
        n = int(count)
        profile.samples += n
        if calls:
            profile.self_time[calls[-1]] += n
        for frame in set(calls):  # a recursive frame counts once per sample
            profile.inclusive[frame] += n
    return dict(profiles)


def summary(profiles: dict[str, ProcessProfile], top: int, window_samples: float | None) -> dict:
    def ranked(counter: Counter, total: int) -> list[list]:
        return [[frame, round(n / total, 3)] for frame, n in counter.most_common(top)]

    return {name: {"samples": p.samples,
                   "cpu_share": None if window_samples is None else round(p.samples / window_samples, 3),
                   "top_inclusive": ranked(p.inclusive, p.samples), "top_self": ranked(p.self_time, p.samples)}
            for name, p in sorted(profiles.items(), key=lambda kv: -kv[1].samples)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile")
    p.add_argument("--seconds", type=float, help="the sampling window (py-spy --duration)")
    p.add_argument("--rate", type=float, default=250.0, help="samples per second (py-spy --rate)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", help="also write the summary here")
    args = p.parse_args(argv)
    with open(args.profile) as f:
        result = summary(parse(f), args.top, args.seconds * args.rate if args.seconds else None)
    for name, s in result.items():
        share = "" if s["cpu_share"] is None else f", on CPU {s['cpu_share']:.0%} of the window"
        print(f"== {name}: {s['samples']} samples{share}")
        for kind in ("top_inclusive", "top_self"):
            print(f"  -- {kind}")
            for frame, fraction in s[kind]:
                print(f"  {fraction:6.1%}  {frame}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
