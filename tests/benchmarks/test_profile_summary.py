import json

from benchmarks import profile_summary

PROFILE = """\
process 1:"python3 -m sglang.launch_server --port 30000";run (a.py:1);handle (b.py:2);gc_heavy (c.py:3) 30
process 1:"python3 -m sglang.launch_server --port 30000";run (a.py:1);handle (b.py:2) 10
process 1:"python3 -m sglang.launch_server --port 30000";process 7:"sglang::scheduler";loop (s.py:1);forward (m.py:9) 45
process 1:"python3 -m sglang.launch_server --port 30000";process 7:"sglang::scheduler";loop (s.py:1);loop (s.py:1) 5
"""


def test_samples_go_to_the_innermost_process_and_frames_count_once_per_sample(tmp_path):
    path = tmp_path / "profile.txt"
    path.write_text(PROFILE)
    out = tmp_path / "summary.json"
    assert profile_summary.main([str(path), "--seconds", "1", "--rate", "100", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result) == ["scheduler", "http+tokenizer_manager"]  # most samples first
    http, sched = result["http+tokenizer_manager"], result["scheduler"]
    assert (http["samples"], http["cpu_share"], sched["samples"], sched["cpu_share"]) == (40, 0.4, 50, 0.5)
    assert dict(map(tuple, http["top_inclusive"]))["handle (b.py:2)"] == 1.0
    assert dict(map(tuple, http["top_self"])) == {"gc_heavy (c.py:3)": 0.75, "handle (b.py:2)": 0.25}
    assert dict(map(tuple, sched["top_inclusive"]))["loop (s.py:1)"] == 1.0  # recursion does not count twice
