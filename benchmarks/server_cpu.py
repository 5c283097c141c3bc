"""CPU time of a server's processes, read from Linux's /proc: the process started (SGLang's HTTP process, where
the tokenizer manager and our API run) and every process below it (scheduler, detokenizer), each named by
the title SGLang gives it (`sglang::scheduler_TP0` -> "scheduler_TP0"). Over a level, the difference of two
readings divided by the turns served is the CPU time a micro-turn costs each process: what sets capacity
when the GPU is not the limit (docs/realtime.md)."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
TOP = "http"


def _children(pid: int) -> list[int]:
    out = []
    for task in (PROC / str(pid) / "task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return out


def _cpu_s(pid: int) -> float:
    """utime + stime of all the process's threads, seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = (PROC / str(pid) / "stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": the comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S


def _name(pid: int) -> str:
    argv0 = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
    name = argv0.split("::", 1)[1] if argv0.startswith("sglang::") else Path(argv0.split()[0] if argv0 else "?").name
    return name or "?"


def cpu_seconds(pid: int) -> dict[str, float]:
    """{process name: CPU seconds so far} of `pid` (as TOP) and its descendants; processes of one name add up.
    Empty when `pid` is gone or /proc is not there (not Linux)."""
    out: dict[str, float] = {}
    todo, top = [pid], True
    while todo:
        p = todo.pop()
        try:
            name, cpu = (TOP if top else _name(p)), _cpu_s(p)
        except (OSError, ValueError, IndexError):  # ended between listing and reading
            top = False
            continue
        top = False
        out[name] = out.get(name, 0.0) + cpu
        todo += _children(p)
    return out


def per_turn_ms(before: dict[str, float], after: dict[str, float], turns: int) -> dict[str, float] | None:
    """CPU milliseconds per turn of each process between two readings (None: no reading or no turns)."""
    if not before or not after or turns <= 0:
        return None
    return {name: round((after[name] - before.get(name, 0.0)) * 1e3 / turns, 3) for name in sorted(after)}
