"""benchmarks/detached.sh: start returns at once while the commands run on in a copy of the tree (the device
tool's next call replaces the tree), wait reports done and the exit status, collect packs only the results
written after the start (the device tool returns at most 8 files)."""

import os
import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "detached.sh"


def _run(cwd, env, *args):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def test_start_wait_collect(tmp_path):
    repo, out = tmp_path / "repo", tmp_path / "out"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    out.mkdir()
    (repo / "benchmarks" / "results" / "old.json").write_text("{}")
    runner = repo / "runner.sh"  # stands in for on_device.sh: runs each argument as a command
    runner.write_text('status=0; for c in "$@"; do echo "=== $c"; bash -c "$c" || status=1; done; exit $status\n')
    env = {**os.environ, "MICROTURN_DETACHED_DIR": str(tmp_path / "d"), "MICROTURN_DETACHED_RUNNER": str(runner),
           "OUT": str(out)}
    started = _run(repo, env, "start", "sleep 2; echo '{\"x\": 1}' > benchmarks/results/new.json",
                   "echo log > $MICROTURN_DETACHED_DIR/logs/server.log", "false")
    assert started.returncode == 0 and not (repo / "benchmarks" / "results" / "new.json").exists()
    early = _run(repo, env, "wait", "0")
    assert early.returncode == 1 and "still running" in early.stdout
    (repo / "benchmarks" / "results" / "old.json").unlink()  # the next device call re-sends the tree over it
    done = _run(repo, env, "wait", "30")
    assert done.returncode == 0 and "=== done, exit 1" in done.stdout  # `false` failed: the runner says so
    assert not (repo / "benchmarks" / "results" / "new.json").exists()  # written in the run's own copy
    collected = _run(repo, env, "collect")
    assert collected.returncode == 0, collected.stderr
    with tarfile.open(out / "results.tar.gz") as t:
        assert t.getnames() == ["benchmarks/results/new.json"]
    with tarfile.open(out / "logs.tar.gz") as t:
        assert "logs/server.log" in t.getnames()
    assert "=== false" in (out / "detached.log").read_text()


def test_bad_use_is_refused_with_a_message(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "usage" in r.stderr
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"MICROTURN_DETACHED_DIR": str(tmp_path / "d")}
    r = _run(tmp_path, env, "wait", "soon")
    assert r.returncode == 2 and "wait takes a number of seconds, got 'soon'" in r.stderr
    r = _run(tmp_path, env, "collect")
    assert r.returncode != 0 and "collect needs $OUT" in r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing was written
