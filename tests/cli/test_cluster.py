"""`sglang-microturn cluster`: the command lines it builds and refuses, and a real cluster (stand-in workers,
tests/rigs/standin_worker.py, behind the real gateway, `python -m smg launch`) starting, losing a worker and
stopping on SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from gateway_rig import STANDIN, wait_until

from sglang_microturn.cli.cluster import (
    GATEWAY_FLAGS, MEMORY_POOL_MARKER, Cluster, ClusterStartError, WorkerCommand, gateway_argv,
    healthy_worker_urls, parse_cluster_args, worker_commands,
)
from sglang_microturn.cli.main import main
from sglang_microturn.cli.server_process import free_port
from sglang_microturn.protocol import ROUTING_KEY_HEADER

HOST = "127.0.0.1"


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("n,fraction", [(1, "0.8"), (2, "0.4"), (3, "0.267")])
def test_workers_sharing_the_gpu_split_its_memory(n, fraction):
    workers = worker_commands(parse_cluster_args(["--workers", str(n), "--port", "31000", "--model-path", "/m"]))
    assert [w.port for w in workers] == [31001 + i for i in range(n)]
    for w in workers:
        assert w.argv[:4] == [sys.executable, "-m", "sglang_microturn.cli.main", "serve"]
        assert _value(w.argv, "--model-path") == "/m"
        assert _value(w.argv, "--mem-fraction-static") == fraction
        assert w.argv[-4:] == ["--port", str(w.port), "--host", "127.0.0.1"]
        assert w.argv.count("--port") == 1 and w.env == {}


@pytest.mark.parametrize("given", [["--mem-fraction-static", "0.3"], ["--mem-fraction-static=0.3"]])
def test_the_users_mem_fraction_is_kept(given):
    for w in worker_commands(parse_cluster_args(["--workers", "2", *given])):
        assert sum(a.startswith("--mem-fraction-static") for a in w.argv) == 1 and given[-1] in w.argv


def test_gpus_give_each_worker_its_own_device_and_the_whole_of_it():
    workers = worker_commands(parse_cluster_args(["--workers", "2", "--gpus", "3, 5"]))
    assert [w.env for w in workers] == [{"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "5"}]
    assert not any("--mem-fraction-static" in w.argv for w in workers)


def test_the_cluster_takes_its_flags_and_every_worker_gets_the_rest_in_order():
    args = parse_cluster_args(["--dtype", "bfloat16", "--host=0.0.0.0", "--workers", "2", "--port", "8000",
                               "--log-dir", "/logs", "--gc-threshold", "1", "2", "3", "--startup-timeout", "60"])
    assert (args.workers, args.host, args.port, args.log_dir, args.startup_timeout_s) == (2, "0.0.0.0", 8000,
                                                                                          "/logs", 60.0)
    assert args.serve_args == ("--dtype", "bfloat16", "--gc-threshold", "1", "2", "3")
    assert all(w.argv[-4:] == ["--port", str(w.port), "--host", "127.0.0.1"] for w in worker_commands(args))


def test_gateway_argv_routes_sessions_to_one_worker_each():
    urls = ["http://127.0.0.1:31001", "http://127.0.0.1:31002"]
    argv = gateway_argv("0.0.0.0", 31000, 31999, urls)
    assert argv[:4] == [sys.executable, "-m", "smg", "launch"]
    assert (_value(argv, "--host"), _value(argv, "--port"), _value(argv, "--prometheus-port")) == ("0.0.0.0", "31000",
                                                                                                   "31999")
    i = argv.index("--worker-urls")
    assert argv[i + 1:i + 3] == urls
    for flag, value, _ in GATEWAY_FLAGS:
        assert flag in argv and (value is None or _value(argv, flag) == value)
    assert _value(argv, "--policy") == "manual" and _value(argv, "--assignment-mode") == "min_load"
    assert "--disable-retries" in argv and "--disable-circuit-breaker" in argv
    assert "--disable-worker-overload-protection" in argv  # a busy worker keeps its sessions


def test_the_multi_host_command_in_the_docs_has_every_gateway_flag():
    doc = (Path(__file__).parents[2] / "docs" / "scale-out.md").read_text()
    launch = doc[doc.index("python -m smg launch"):]
    launch = launch[:launch.index("\n\n")].replace("\\\n", " ").split()
    for flag, value, _ in GATEWAY_FLAGS:
        assert flag in launch and (value is None or _value(launch, flag) == value), flag


def test_healthy_worker_urls_reads_the_gateways_listing():
    listing = {"workers": [{"url": "http://a", "is_healthy": True, "status": "ready"},
                           {"url": "http://b", "is_healthy": False, "status": "not_ready"}], "total": 2}
    assert healthy_worker_urls(listing) == {"http://a"}
    assert healthy_worker_urls({}) == set()


@pytest.mark.parametrize("args,match", [
    ([], "the following arguments are required: --workers"),
    (["--workers", "0"], "--workers 0: give at least 1"),
    (["--workers", "two"], "invalid int value: 'two'"),
    (["--workers", "2", "--gpus", "0"], "--gpus 0: give 2 device ids"),
    (["--workers", "2", "--gpus", "0,1,2"], "--gpus 0,1,2: give 2 device ids"),
    (["--workers", "2", "--gpus", "0,"], "--gpus 0,: give 2 device ids"),
    (["--workers", "2", "--tokenizer-worker-num", "2"], "--tokenizer-worker-num cannot be given to the workers"),
])
def test_refusals_exit_2_with_one_line(args, match, capsys):
    assert main(["cluster", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith("sglang-microturn: cluster: ") and match in err


def test_without_the_gateway_installed_it_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "smg", None)  # find_spec then answers None, as for a missing package
    assert main(["cluster", "--workers", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "pip install smg" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_cuda_it_exits_2_before_starting_anything(capsys):
    assert main(["cluster", "--workers", "2"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "sglang-microturn: no CUDA GPU found: serving needs a CUDA GPU (SGLang cannot serve on CPU)"]


def test_cluster_main_runs_the_commands_it_built(tmp_path, monkeypatch):
    import sglang_microturn.cli.cluster as cluster_cli
    import sglang_microturn.cli.serve as serve_cli

    ran = []
    monkeypatch.setattr(serve_cli, "require_cuda", lambda: None)
    monkeypatch.setattr(cluster_cli, "run", lambda cluster: ran.append(cluster) or 0)
    assert main(["cluster", "--workers", "2", "--port", "31000", "--log-dir", str(tmp_path), "--startup-timeout",
                 "60", "--model-path", "/m"]) == 0
    (cluster,) = ran
    assert cluster.startup_timeout_s == 60 and cluster.log_dir == tmp_path
    assert cluster.url == "http://127.0.0.1:31000" and cluster.gateway.argv[:4] == [sys.executable, "-m", "smg",
                                                                                     "launch"]
    assert [w.argv for w in cluster.workers] == [c.argv for c in worker_commands(parse_cluster_args(
        ["--workers", "2", "--port", "31000", "--model-path", "/m"]))]


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _standins(n: int) -> list[WorkerCommand]:
    ports = [free_port() for _ in range(n)]
    return [WorkerCommand([sys.executable, STANDIN, "--port", str(p), "--log-memory-pool"], p, {}) for p in ports]


def _cluster(workers: list[WorkerCommand], log_dir, **kwargs) -> Cluster:
    port = free_port()
    return Cluster(workers, gateway_argv(HOST, port, free_port(), [w.url for w in workers]), HOST, port, log_dir,
                   **kwargs)


def _worker_port(url: str, key: str) -> int:
    """The port of the worker that answers a plain POST /generate through the gateway at `url` for `key`."""
    req = urllib.request.Request(url + "/generate", data=b"{}",
                                 headers={"Content-Type": "application/json", ROUTING_KEY_HEADER: key})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)["meta_info"]["worker_port"]


def _listing(url: str) -> dict:
    with urllib.request.urlopen(url + "/workers", timeout=5) as r:
        return json.load(r)


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)  # every process of the cluster leads its own group
    except ProcessLookupError:
        return True
    return False


def test_next_worker_starts_after_the_memory_pool_line_and_a_slow_start_times_out(tmp_path):
    first = _python(f"import time; time.sleep(0.5); print('{MEMORY_POOL_MARKER}', time.time(), flush=True);"
                    " time.sleep(60)")  # past its memory pool, never healthy
    second = _python("import time; print(time.time(), flush=True); time.sleep(60)")
    cluster = Cluster([WorkerCommand(first, free_port(), {}), WorkerCommand(second, free_port(), {})],
                      _python("pass"), HOST, free_port(), tmp_path, startup_timeout_s=3, stop_grace_s=5)
    late = r"^worker 0 \(port \d+\) not healthy within --startup-timeout 3 s; log: \S+worker-0.log; worker 1 .*-1.log$"
    with pytest.raises(ClusterStartError, match=late):
        with cluster:
            pass
    pool_at = float((tmp_path / "worker-0.log").read_text().split()[-1])
    assert float((tmp_path / "worker-1.log").read_text()) >= pool_at
    assert all(_gone(w.proc.pid) for w in cluster.workers) and cluster.gateway.proc is None


def test_a_worker_dying_during_startup_fails_the_start_and_stops_the_others(tmp_path):
    alive = _python(f"import time; print('{MEMORY_POOL_MARKER}', flush=True); time.sleep(60)")
    workers = [WorkerCommand(alive, free_port(), {}),
               WorkerCommand(_python("import sys; print('bad flag'); sys.exit(3)"), free_port(), {})]
    cluster = _cluster(workers, tmp_path, stop_grace_s=5)
    with pytest.raises(ClusterStartError, match=r"worker 1 \(port \d+\) exited with 3 during startup; log: .*worker-1"):
        with cluster:
            pass
    assert _gone(cluster.workers[0].proc.pid) and cluster.gateway.proc is None


def test_two_workers_behind_the_real_gateway_and_one_dies(tmp_path, capsys):
    workers = _standins(2)
    urls = {w.url for w in workers}
    with _cluster(workers, tmp_path, stop_grace_s=15) as cluster:
        assert healthy_worker_urls(_listing(cluster.url)) == urls
        # The stand-in's plain /generate names the worker that answered; a routing key keeps reaching it.
        # (Not a micro-turn open: the stand-in's first one imports SGLang's io_struct, >5 s on a loaded CPU.)
        port = _worker_port(cluster.url, key="session-a")
        assert port in {w.port for w in workers}
        assert {_worker_port(cluster.url, key="session-a") for _ in range(3)} == {port}
        dead = next(i for i, w in enumerate(workers) if w.port == port)
        os.killpg(cluster.workers[dead].proc.pid, signal.SIGKILL)
        wait_until(lambda: workers[dead].url not in healthy_worker_urls(_listing(cluster.url)), 10,
                   "the gateway marks the killed worker unhealthy")
        assert cluster.check() is None  # still serving, with the other worker
        assert (f"[cluster] worker {dead} (port {port}) exited with -9; its sessions answer 410, new sessions go"
                " to the others") in capsys.readouterr().err
        other = workers[1 - dead].port
        assert _worker_port(cluster.url, key="session-a") == _worker_port(cluster.url, key="session-b") == other
    assert all(_gone(p.proc.pid) for p in [*cluster.workers, cluster.gateway])


# `sglang-microturn cluster` without the building of real `serve` lines: the same run(), signals included.
CLUSTER_RUN = """
import sys
from pathlib import Path
from sglang_microturn.cli.cluster import Cluster, WorkerCommand, gateway_argv, run
standin, log_dir, port, prometheus_port, *worker_ports = sys.argv[1:]
workers = [WorkerCommand([sys.executable, standin, "--port", p, "--log-memory-pool"], int(p), {})
           for p in worker_ports]
gateway = gateway_argv("127.0.0.1", int(port), int(prometheus_port), [w.url for w in workers])
sys.exit(run(Cluster(workers, gateway, "127.0.0.1", int(port), Path(log_dir), stop_grace_s=15)))
"""


def test_sigterm_stops_the_gateway_and_every_worker(tmp_path):
    out = tmp_path / "cluster.out"
    ports = [str(free_port()) for _ in range(4)]
    with open(out, "w") as f:
        proc = subprocess.Popen(_python(CLUSTER_RUN) + [STANDIN, str(tmp_path / "logs"), *ports], stdout=f,
                                stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "2 workers behind the gateway at http://127.0.0.1:" + ports[0] in out.read_text(), 90,
                   "the cluster's ready line")
        pids = [int(line.split("pid ")[1].split(",")[0]) for line in out.read_text().splitlines() if "pid " in line]
        assert len(pids) == 3 and not any(_gone(p) for p in pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, out.read_text()
    finally:
        proc.kill()
    assert all(_gone(p) for p in pids), out.read_text()
    assert out.read_text().splitlines()[-1] == "[cluster] stopped"
