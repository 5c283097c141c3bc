"""The real SGLang Model Gateway (`python -m smg launch`, as `sglang-microturn cluster` runs it) in front of
stand-in workers (standin_worker.py), each in its own process, for tests of session affinity and worker loss."""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.request
from pathlib import Path

from sglang_microturn.cli.cluster import gateway_argv
from sglang_microturn.cli.server_process import ServerProcess, free_port

STANDIN = str(Path(__file__).with_name("standin_worker.py"))


def healthy_workers(url: str) -> list[str]:
    """The worker URLs the gateway at `url` lists as healthy."""
    with urllib.request.urlopen(url + "/workers", timeout=5) as r:
        return [w["url"] for w in json.load(r)["workers"] if w.get("is_healthy")]


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s} s: {what}")


@contextlib.contextmanager
def gateway_with_standins(tmp_path: Path, rows: list[int | None], extra_gateway_flags: tuple[str, ...] = ()):
    """A gateway in front of one stand-in worker per entry of `rows` (its request-pool rows, None: no session
    cap), launched as `sglang-microturn cluster` launches it plus `extra_gateway_flags`. Yields (gateway URL,
    the workers' ServerProcess list); every process is stopped after."""
    with contextlib.ExitStack() as stack:
        workers = []
        for i, n in enumerate(rows):
            port = free_port()
            argv = [sys.executable, STANDIN, "--port", str(port)] + ([] if n is None else ["--rows", str(n)])
            workers.append(stack.enter_context(ServerProcess(argv, port, str(tmp_path / f"worker{i}.log"),
                                                             startup_timeout_s=60)))
        port = free_port()
        argv = gateway_argv("127.0.0.1", port, free_port(), [w.url for w in workers]) + list(extra_gateway_flags)
        gateway = stack.enter_context(ServerProcess(argv, port, str(tmp_path / "gateway.log"), startup_timeout_s=60))
        wait_until(lambda: len(healthy_workers(gateway.url)) == len(workers), 30, "the gateway lists every worker")
        yield gateway.url, workers
