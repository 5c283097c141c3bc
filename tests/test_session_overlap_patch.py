"""Patch 0001: a rejected overlapping append must not clear the in-flight guard of the running turn.

The scenario runs SGLang's real session classes (tests/session_rig.py). It runs twice: against the installed,
patched SGLang, where the guard holds, and in a subprocess against the pristine 0.5.17 source of the patched
modules (rebuilt by reverse-applying our patches in memory), where the bug must reproduce. The second run is
what proves the test can fail.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sglang_microturn import patching

PATCHED_MODULES = {
    "sglang.srt.session.session_controller": "sglang/srt/session/session_controller.py",
    "sglang.srt.session.streaming_session": "sglang/srt/session/streaming_session.py",
}


def overlap_scenario(first_turn_running: bool) -> dict:
    """Turn k runs; a second append arrives and is rejected; then a third append arrives while turn k
    still runs. Returns whether the third was rejected, and the session length after turn k finishes."""
    from session_rig import SessionRig

    rig = SessionRig()
    assert rig.open("s")
    if not first_turn_running:
        rig.run_turn("s", list(range(1, 41)), [7, 8, 9])  # committed history of 43 tokens
    running = rig.submit("s", [21, 22, 23], max_new_tokens=2)
    rig.admit(running)
    rig.prefill_done(running, 1)  # now decoding: the turn holds the guard

    rejected = rig.submit("s", [31], max_new_tokens=1)
    second_rejected = rejected.to_finish is not None
    rig.finish_rejected(rejected)  # the rejected request is retired through admission + prefill

    third = rig.submit("s", [41], max_new_tokens=1)
    third_rejected = third.to_finish is not None
    rig.decode_step(running, 2)
    return {
        "second_rejected": second_rejected,
        "third_rejected": third_rejected,
        "running_finished": running.finished(),
        "session_len": rig.session_len("s"),
        "leaked_kv": rig.leaked_kv(),
    }


@pytest.mark.parametrize("first_turn_running", [False, True], ids=["later-turn", "first-turn"])
def test_patched_sglang_keeps_guard_of_running_turn(sglang_ctx, first_turn_running):
    assert patching.unapplied() == [], "run `sglang-microturn patch apply` (tests/run.sh does)"
    result = overlap_scenario(first_turn_running)
    assert result == {
        "second_rejected": True,
        "third_rejected": True,
        "running_finished": True,
        "session_len": (3 + 2) if first_turn_running else (43 + 3 + 2),
        "leaked_kv": 0,
    }


_PRISTINE_RUN = textwrap.dedent(
    """
    import json, sys, types
    from sglang_microturn import patching
    target = patching.installed_sglang()
    patches = patching.load_patches()
    for name, rel in {modules!r}.items():
        module = types.ModuleType(name)
        module.__file__ = str(target.root / rel)
        sys.modules[name] = module  # before exec: dataclasses look their module up in sys.modules
        exec(compile(patching.pristine_source(rel, target, patches), module.__file__, "exec"), module.__dict__)
    from sglang.srt.runtime_context import get_context, get_parallel
    get_context().override_server_args(enable_streaming_session=True).install()
    with get_parallel().override(tp_rank=0):
        from test_session_overlap_patch import overlap_scenario
        print("RESULT " + json.dumps(overlap_scenario({first_turn_running})))
    """
)


@pytest.mark.parametrize("first_turn_running", [False, True], ids=["later-turn", "first-turn"])
def test_pristine_sglang_reproduces_the_bug(first_turn_running):
    code = _PRISTINE_RUN.format(modules=PATCHED_MODULES, first_turn_running=first_turn_running)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["second_rejected"]
    assert not result["third_rejected"], "unpatched 0.5.17 should accept the third append (the bug)"
