"""benchmarks/server_cpu.py: CPU time of a process tree from /proc, named as SGLang names its processes."""

import subprocess
import sys
import time

import pytest

from benchmarks import server_cpu

pytestmark = pytest.mark.skipif(not server_cpu.PROC.exists(), reason="needs Linux /proc")

# A parent that idles and a child that burns CPU under SGLang's kind of title (setproctitle rewrites argv[0]).
TREE = """
import subprocess, sys, time
child = subprocess.Popen(["sglang::scheduler_TP0", "-c", "import time\\nt = time.process_time()\\n"
                          "while time.process_time() - t < 0.6: pass\\ntime.sleep(30)"], executable=sys.executable)
print(child.pid, flush=True)
time.sleep(30)
"""


def test_the_tree_cpu_is_split_by_process_and_a_turn_gets_its_share():
    parent = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(parent.stdout.readline())
        before = server_cpu.cpu_seconds(parent.pid)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            after = server_cpu.cpu_seconds(parent.pid)
            if after.get("scheduler_TP0", 0) >= 0.6:
                break
            time.sleep(0.1)
        assert set(after) == {"http", "scheduler_TP0"}
        assert after["scheduler_TP0"] >= 0.6 and after["http"] < 0.5  # the parent only waited
        per_turn = server_cpu.per_turn_ms(before, after, turns=100)
        assert per_turn["scheduler_TP0"] == pytest.approx((after["scheduler_TP0"] - before.get("scheduler_TP0", 0))
                                                          * 10, abs=1e-3)
    finally:
        if child is not None:
            subprocess.run(["kill", str(child)], check=False)
        parent.kill()
        parent.wait()
    assert server_cpu.cpu_seconds(parent.pid) == {}  # gone: nothing to read
    assert server_cpu.per_turn_ms({}, {"http": 1.0}, 10) is None and server_cpu.per_turn_ms({"a": 1}, {"a": 2}, 0) is None
