"""`sglang-microturn cluster`: N `serve` workers behind SGLang Model Gateway (smg), one URL for clients.

    sglang-microturn cluster --workers N [--gpus 0,1,...] [--host H] [--port P] [--log-dir DIR] [serve flags...]

Every flag that is not the cluster's goes to each worker's `sglang-microturn serve` line. Worker i listens on
127.0.0.1 at P+1+i (only the gateway reaches it); the gateway listens on H:P and pins each session's routing key
to the worker its open reached. Two parts: the command lines, built by pure functions (`parse_cluster_args`,
`worker_commands`, `gateway_argv`), and `Cluster`, which starts, watches and stops the processes of any such
lines (tests give it stand-in workers).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sglang_microturn.cli.serve import has_flag, table_argv
from sglang_microturn.cli.server_process import _die_with_parent, _group_alive, free_port

# SGLang sizes its KV pool from the GPU memory free when it profiles; two workers profiling at once on one GPU
# both count the other's memory as free and the second finds none left (seen on an H200). The next worker
# starts once the previous one's log has this line.
MEMORY_POOL_MARKER = "Memory pool end"
# The fraction of a shared GPU the workers' weights and KV pools split between them (SGLang's
# --mem-fraction-static, given to each worker as its share); the rest is their activations and CUDA graphs.
SHARED_GPU_MEMORY = 0.8
WORKER_HOST = "127.0.0.1"  # clients go through the gateway: a worker reached directly would break session affinity
# Worker flags the cluster refuses, and why.
REFUSED_WORKER_FLAGS = {
    "--tokenizer-worker-num": "the /microturn routes and their session registry live in one HTTP process per"
    " server (the plugin refuses more than one); scale out with --workers instead",
}

# (flag, value or None for a switch, why): the gateway's routing and health settings for micro-turn sessions.
GATEWAY_FLAGS: tuple[tuple[str, str | None, str], ...] = (
    ("--policy", "manual", "pins each routing key to the worker it first reached: a session lives on one worker"),
    # min_load split 40 opens 20/20 over two stand-ins where min_group gave 22/18 and 16/4 (smg 1.13.0, CPU).
    ("--assignment-mode", "min_load", "a new routing key goes to the worker with the fewest requests"),
    ("--disable-retries", None, "a retried append on another worker would not find its session there"),
    # The breaker takes a worker out of routing on a burst of failed requests; here that moves every session
    # on it to a worker that answers 410: only the health check may decide that a worker is gone.
    ("--disable-circuit-breaker", None, "a busy worker's sessions are not lost on a burst of errors"),
    # smg 1.13 leaves a worker with 8 waiting requests (or 80% KV use) out of routing, pinned keys too: on an
    # H200 at 384 sessions over two workers, one worker's queue reached 8 and its sessions' appends went to the
    # other worker, which answered 410 (3735 of them in 4 s). A queue is no reason to lose a session; opens
    # are kept off a full worker by its own 429 (the client re-sends them under a fresh key).
    ("--disable-worker-overload-protection", None, "a busy worker keeps its sessions"),
    # A probe every second, three failures: a dead worker (connection refused) is dropped in ~3 s, while a
    # worker whose HTTP process stalls for one probe timeout (5 s) keeps its sessions.
    ("--health-check-interval-secs", "1", "a dead worker is noticed within seconds"),
    ("--health-failure-threshold", "3", "one slow probe does not take a worker's sessions away"),
    ("--health-success-threshold", "1", "one good probe brings a worker back"),
    ("--request-timeout-secs", "3600", "one request may run an hour (the gateway's default cuts it at 30 min)"),
    ("--max-idle-secs", "2592000", "a session opened with idle_timeout 0 may stay idle 30 days and keeps its worker"),
)

EXIT_USAGE = 2


class ClusterUsageError(ValueError):
    """The cluster's command line cannot run; the message names the bad value and the fix."""


class ClusterStartError(RuntimeError):
    """A worker or the gateway did not come up; the message names it and its log."""


class Stopped(Exception):
    """SIGINT or SIGTERM reached the cluster: stop it and exit 0."""


@dataclass(frozen=True)
class ClusterArgs:
    workers: int
    gpus: tuple[str, ...] | None  # one CUDA_VISIBLE_DEVICES value per worker; None: all share the visible GPU
    host: str
    port: int
    log_dir: str | None
    startup_timeout_s: float
    serve_args: tuple[str, ...]  # every worker's `serve` flags


@dataclass(frozen=True)
class WorkerCommand:
    argv: list[str]
    port: int
    env: dict[str, str]  # set over this process's environment

    @property
    def url(self) -> str:
        return f"http://{WORKER_HOST}:{self.port}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print its usage too: one line, as sglang-microturn's refusals
        raise ClusterUsageError(f"cluster: {message}")


def parse_cluster_args(argv: Sequence[str]) -> ClusterArgs:
    """The cluster's own flags out of `argv`; the rest, in order, are the workers' `serve` flags."""
    p = _Parser(prog="sglang-microturn cluster", allow_abbrev=False,  # an SGLang flag must never match ours
                description="N `sglang-microturn serve` workers behind SGLang Model Gateway; other flags go to"
                " every worker")
    p.add_argument("--workers", type=int, required=True, help="how many workers")
    p.add_argument("--gpus", help="comma list of N device ids, worker i runs with CUDA_VISIBLE_DEVICES=<i-th>;"
                   " without it the workers share the visible GPU and split its memory")
    p.add_argument("--host", default="127.0.0.1", help="the gateway's address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=30000, help="the gateway's port; worker i gets PORT+1+i")
    p.add_argument("--log-dir", help="where the workers' and the gateway's logs go (default: a new temp dir)")
    p.add_argument("--startup-timeout", type=float, default=900.0,
                   help="seconds for every worker to become healthy (default 900)")
    known, rest = p.parse_known_args(list(argv))
    if known.workers < 1:
        raise ClusterUsageError(f"cluster: --workers {known.workers}: give at least 1")
    gpus = None
    if known.gpus is not None:
        gpus = tuple(g.strip() for g in known.gpus.split(","))
        if len(gpus) != known.workers or not all(gpus):
            raise ClusterUsageError(f"cluster: --gpus {known.gpus}: give {known.workers} device ids, one per"
                                    " worker (e.g. --gpus 0,1), or leave it out to share the visible GPU")
    for flag, why in REFUSED_WORKER_FLAGS.items():
        if has_flag(rest, flag):
            raise ClusterUsageError(f"cluster: {flag} cannot be given to the workers: {why}")
    return ClusterArgs(known.workers, gpus, known.host, known.port, known.log_dir, known.startup_timeout,
                       tuple(rest))


def worker_commands(args: ClusterArgs) -> list[WorkerCommand]:
    """Each worker's `sglang-microturn serve` line and environment."""
    # This interpreter's own install, whatever `sglang-microturn` on PATH is.
    serve = [sys.executable, "-m", "sglang_microturn.cli.main", "serve", *args.serve_args]
    if args.gpus is None and not has_flag(args.serve_args, "--mem-fraction-static"):
        serve += ["--mem-fraction-static", str(round(SHARED_GPU_MEMORY / args.workers, 3))]
    commands = []
    for i in range(args.workers):
        port = args.port + 1 + i
        env = {} if args.gpus is None else {"CUDA_VISIBLE_DEVICES": args.gpus[i]}
        commands.append(WorkerCommand(serve + ["--port", str(port), "--host", WORKER_HOST], port, env))
    return commands


def gateway_argv(host: str, port: int, prometheus_port: int, worker_urls: Sequence[str]) -> list[str]:
    """The gateway's command line in front of `worker_urls`. The metrics listener gets a port of its own (the
    default 29000 would collide between two clusters on one machine) on the gateway's address."""
    argv = [sys.executable, "-m", "smg", "launch", "--host", host, "--port", str(port),
            "--prometheus-host", host, "--prometheus-port", str(prometheus_port), "--worker-urls", *worker_urls]
    return argv + table_argv(GATEWAY_FLAGS)


def healthy_worker_urls(listing: dict) -> set[str]:
    """The URLs of the workers the gateway's `GET /workers` answer marks healthy. Its shape (smg 1.13):
    {"workers": [{"url": ..., "is_healthy": bool, "status": "ready" | "not_ready" | ..., ...}], "total": N}."""
    return {w["url"] for w in listing.get("workers", []) if w.get("is_healthy") is True}


def _client_host(host: str) -> str:
    """Where this machine reaches a server bound to `host` (a wildcard address is reached on loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _get(url: str, timeout: float = 5) -> tuple[int, bytes] | None:
    """(status, body) of GET `url`; None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


class GroupProcess:
    """One process of the cluster (a worker or the gateway) in its own process group, its output in its log.

    The cluster owns it from spawn() until stop(), which takes the whole group along (SGLang's scheduler and
    detokenizer processes). Not a ServerProcess: that one's start blocks until /health, and the cluster starts
    the next worker while the previous one is still warming up, then stops them all at once."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path):
        self.name, self.argv, self.env, self.log_path = name, argv, env, log_path
        self.proc: subprocess.Popen | None = None
        self._terminated = self._stopped = False

    def spawn(self) -> None:
        self._log = open(self.log_path, "w")
        # _die_with_parent ties the process to the thread that spawns it: the cluster spawns from its main thread.
        try:
            self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env={**os.environ, **self.env},
                                         preexec_fn=_die_with_parent)
        except BaseException:
            self._log.close()
            raise

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_contains(self, text: str) -> bool:
        return text in self.log_path.read_text(errors="replace")  # startup logs are small

    def terminate(self) -> None:
        """SIGTERM the group, once, without waiting."""
        if self.proc is None or self._terminated:
            return
        self._terminated = True
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def stop(self, deadline: float) -> None:
        """SIGTERM the group; SIGKILL what is left of it at `deadline` (time.monotonic()). Once: after it the
        process group id is free for the system to give again."""
        if self.proc is None or self._stopped:
            return
        self._stopped = True
        self.terminate()
        try:
            self.proc.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            pass
        if _group_alive(self.proc.pid, wait_s=max(deadline - time.monotonic(), 0)):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._log.close()


class Cluster:
    """The workers and the gateway in front of them, as a context manager.

    __enter__ starts the workers one after another (the next once the previous one's log has
    MEMORY_POOL_MARKER or it answers /health), waits until every one is healthy, then starts the gateway and
    waits until it lists every worker healthy; any failure stops what started and raises ClusterStartError.
    From then on the cluster owns every process until __exit__, which stops the gateway first (it drains its
    requests while the workers still answer), then all workers together."""

    def __init__(self, workers: Sequence[WorkerCommand], gateway: list[str], host: str, port: int,
                 log_dir: Path, startup_timeout_s: float = 900.0, gateway_timeout_s: float = 120.0,
                 stop_grace_s: float = 30.0):
        self.log_dir = Path(log_dir)
        self.workers = [GroupProcess(f"worker {i} (port {w.port})", w.argv, w.env, self.log_dir / f"worker-{i}.log")
                        for i, w in enumerate(workers)]
        self.worker_urls = [w.url for w in workers]
        self.gateway = GroupProcess("the gateway", gateway, {}, self.log_dir / "gateway.log")
        self.url = f"http://{host}:{port}"
        self._probe_url = f"http://{_client_host(host)}:{port}"
        self.startup_timeout_s, self.gateway_timeout_s = startup_timeout_s, gateway_timeout_s
        self.stop_grace_s = stop_grace_s
        self._serving: list[int] = []  # indices of the workers still running

    def __enter__(self) -> "Cluster":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        print(f"[cluster] logs: {self.log_dir}", flush=True)
        try:
            self._start_workers()
            self._start_gateway()
        except BaseException:
            self._stop_all()
            raise
        self._serving = list(range(len(self.workers)))
        return self

    def __exit__(self, *exc) -> None:
        self._stop_all()

    def _start_workers(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        for i, worker in enumerate(self.workers):
            if i:
                previous = self.workers[i - 1]
                self._wait(deadline, self.workers[:i],
                           lambda: previous.log_contains(MEMORY_POOL_MARKER) or self._healthy(i - 1),
                           lambda: f"{previous.name} not past its memory pool {self._within}; log: {previous.log_path}")
            worker.spawn()
            print(f"[cluster] {worker.name}: pid {worker.proc.pid}, log {worker.log_path}", flush=True)
        starting = set(range(len(self.workers)))

        def all_healthy() -> bool:
            starting.difference_update([i for i in starting if self._healthy(i)])
            return not starting

        self._wait(deadline, self.workers, all_healthy,
                   lambda: "; ".join(f"{self.workers[i].name} not healthy {self._within}; log: "
                                     f"{self.workers[i].log_path}" for i in sorted(starting)))

    @property
    def _within(self) -> str:
        return f"within --startup-timeout {self.startup_timeout_s:g} s"

    def _healthy(self, i: int) -> bool:
        answer = _get(self.worker_urls[i] + "/health")
        return answer is not None and answer[0] == 200

    def _start_gateway(self) -> None:
        self.gateway.spawn()
        print(f"[cluster] the gateway: pid {self.gateway.proc.pid}, log {self.gateway.log_path}", flush=True)
        self._wait(time.monotonic() + self.gateway_timeout_s, [self.gateway],
                   lambda: healthy_worker_urls(self._listing()) >= set(self.worker_urls),
                   lambda: f"the gateway did not list the {len(self.workers)} workers healthy within "
                   f"{self.gateway_timeout_s:g} s; log: {self.gateway.log_path}")

    def _listing(self) -> dict:
        answer = _get(self._probe_url + "/workers")
        return json.loads(answer[1]) if answer is not None and answer[0] == 200 else {}

    @staticmethod
    def _wait(deadline: float, watched: Sequence[GroupProcess], done: Callable[[], bool],
              late: Callable[[], str]) -> None:
        """Poll `done` until it holds; ClusterStartError once one of `watched` exits, or with `late()` at
        `deadline`."""
        while not done():
            for process in watched:
                code = process.exit_code()
                if code is not None:
                    raise ClusterStartError(f"{process.name} exited with {code} during startup;"
                                            f" log: {process.log_path}")
            if time.monotonic() > deadline:
                raise ClusterStartError(late())
            time.sleep(0.25)

    def check(self) -> int | None:
        """One look at the processes while serving: None while the cluster serves, 1 once the gateway or every
        worker has exited. A worker that exits is reported once and what is left of its group stopped."""
        code = self.gateway.exit_code()
        if code is not None:
            print(f"[cluster] the gateway exited with {code}; stopping the workers (log: {self.gateway.log_path})",
                  file=sys.stderr, flush=True)
            return 1
        for i in list(self._serving):
            worker = self.workers[i]
            code = worker.exit_code()
            if code is None:
                continue
            self._serving.remove(i)
            print(f"[cluster] {worker.name} exited with {code}; its sessions answer 410, new sessions go to the"
                  " others", file=sys.stderr, flush=True)
            worker.stop(time.monotonic() + self.stop_grace_s)
        if not self._serving:
            print("[cluster] every worker has exited; stopping the gateway", file=sys.stderr, flush=True)
            return 1
        return None

    def serve(self, poll_s: float = 0.5) -> int:
        """Watch the processes until the cluster cannot serve (returns 1); a signal ends it sooner (Stopped)."""
        while (code := self.check()) is None:
            time.sleep(poll_s)
        return code

    def _stop_all(self) -> None:
        self.gateway.stop(time.monotonic() + self.stop_grace_s)
        for worker in self.workers:  # all at once: each one's shutdown overlaps the others'
            worker.terminate()
        deadline = time.monotonic() + self.stop_grace_s
        for worker in self.workers:
            worker.stop(deadline)


def _stop_on_signals() -> None:
    def stop(signum, _frame):
        # Ignore a second signal: raised in the middle of the shutdown it would cut it short, leaving the
        # processes to _die_with_parent's SIGTERM without the SIGKILL after the grace period.
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signal.Signals(signum).name)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stop)


def run(cluster: Cluster) -> int:
    """Start `cluster` and serve until SIGINT/SIGTERM (0) or until it cannot serve (1); stop it either way."""
    _stop_on_signals()
    try:
        with cluster:
            print(f"[cluster] {len(cluster.workers)} workers behind the gateway at {cluster.url} "
                  f"(logs: {cluster.log_dir})", flush=True)
            return cluster.serve()
    except Stopped:
        print("[cluster] stopped", flush=True)
        return 0
    except ClusterStartError as e:
        print(f"[cluster] {e}; stopped everything", file=sys.stderr, flush=True)
        return 1


def cluster_main(argv: Sequence[str]) -> int:
    """`sglang-microturn cluster ARGS`: check the line and the machine, build the commands, run the cluster."""
    from sglang_microturn.cli.serve import NoCudaError, require_cuda

    try:
        args = parse_cluster_args(argv)
        if importlib.util.find_spec("smg") is None:
            raise ClusterUsageError("cluster: SGLang Model Gateway is not installed: pip install smg (the"
                                    " `cluster` extra)")
        require_cuda()  # here rather than N times in the workers' logs
    except (ClusterUsageError, NoCudaError) as e:
        print(f"sglang-microturn: {e}", file=sys.stderr)
        return EXIT_USAGE
    workers = worker_commands(args)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="sglang-microturn-cluster-"))
    gateway = gateway_argv(args.host, args.port, free_port(), [w.url for w in workers])
    return run(Cluster(workers, gateway, args.host, args.port, log_dir, args.startup_timeout_s))
