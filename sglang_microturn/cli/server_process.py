"""A launched SGLang server as a context manager: start, wait for /health, stop the whole process group."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request


class ServerDied(RuntimeError):
    pass


class ServerProcess:
    def __init__(self, argv: list[str], port: int, log_path: str, startup_timeout_s: float = 600, env=None):
        self.argv, self.port, self.log_path = argv, port, log_path
        self.startup_timeout_s, self.env = startup_timeout_s, env
        self.url = f"http://127.0.0.1:{port}"
        self.startup_s: float | None = None
        self.shutdown: dict = {}

    def __enter__(self) -> "ServerProcess":
        self._log = open(self.log_path, "w")
        t0 = time.monotonic()
        # Own process group: stopping it takes SGLang's scheduler and detokenizer processes along.
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=self.env, preexec_fn=_die_with_parent)
        while time.monotonic() - t0 < self.startup_timeout_s:
            if self.proc.poll() is not None:
                raise ServerDied(f"server exited with {self.proc.returncode} during startup; log: {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.startup_s = time.monotonic() - t0
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self._stop()
        raise ServerDied(f"server not healthy after {self.startup_timeout_s} s; log: {self.log_path}")

    def post(self, path: str, body: dict, timeout: float = 120) -> tuple[int, object]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def _stop(self) -> None:
        t0 = time.monotonic()
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        leftovers = _group_alive(pgid, wait_s=30)
        if leftovers:
            os.killpg(pgid, signal.SIGKILL)
        self.shutdown = {"exit_code": code, "seconds": round(time.monotonic() - t0, 2),
                         "clean": code is not None and not leftovers}
        self._log.close()

    def __exit__(self, *exc) -> None:
        self._stop()


def _die_with_parent() -> None:
    """SIGTERM the server when this process dies, however it dies (e.g. killed by `timeout`): SGLang's
    launcher then stops its whole tree. Without it a killed benchmark leaves a server holding the GPU."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _group_alive(pgid: int, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server or a torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
