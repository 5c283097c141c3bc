"""The SGLang entry point: found by SGLang's loader, logs what it registered, refuses to run unpatched."""

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from sglang_microturn.server import plugin
from sglang_microturn.patchset.patching import PatchState

UNPATCHED_DEMO = """--- a/sglang/version.py
+++ b/sglang/version.py
@@ -1,2 +1,2 @@
 try:
-    from sglang._version import __version__, __version_tuple__
+    from sglang._version import __version__, __version_tuple__  # demo change, never applied
"""


def test_entry_point_is_declared():
    [ep] = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "microturn"]
    assert ep.value == "sglang_microturn.server.plugin:register"


def test_register_logs_one_line(capsys):
    plugin.register()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[sglang-microturn ") and "patches verified" in lines[0]


def test_register_refuses_unpatched_sglang(monkeypatch):
    monkeypatch.setattr(plugin, "unapplied", lambda: [("0001-x.patch", PatchState.NOT_APPLIED)])
    with pytest.raises(SystemExit) as exc:
        plugin.register()
    message = str(exc.value)
    assert "\n" not in message
    assert "0001-x.patch (not applied)" in message and "run `sglang-microturn patch apply`" in message


def _load_plugins_in_subprocess(env_extra):
    code = "from sglang.srt.plugins import load_plugins; load_plugins(); print('LOADED')"
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_sglang_loader_runs_the_plugin():
    proc = _load_plugins_in_subprocess({})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED" in proc.stdout
    assert "[sglang-microturn" in proc.stderr and "plugin registered: patches verified" in proc.stderr


def test_sglang_loader_stops_when_a_patch_is_missing(tmp_path):
    """SGLang's loader only logs plugin exceptions; ours must still stop the process, with the fix named."""
    (tmp_path / "0099-demo.patch").write_text(UNPATCHED_DEMO)
    proc = _load_plugins_in_subprocess({"MICROTURN_PATCHES_DIR": str(tmp_path)})
    assert proc.returncode != 0 and "LOADED" not in proc.stdout
    assert "0099-demo.patch (not applied); run `sglang-microturn patch apply`" in proc.stderr


def test_a_bad_setting_stops_register_with_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("MICROTURN_COHORT_WAIT_MS", "soon")
    with pytest.raises(SystemExit) as exc:
        plugin.register()
    assert str(exc.value) == "sglang-microturn: MICROTURN_COHORT_WAIT_MS='soon': want milliseconds in [0, 1000] (0 = off)"
