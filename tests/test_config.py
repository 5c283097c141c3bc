"""Every MICROTURN_* setting is declared once in sglang_microturn/config.py, read only through it, listed in
README's settings table, and refused with one error style."""

import ast
import re
from pathlib import Path

import pytest

from sglang_microturn import config
from sglang_microturn.config import SettingError

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sglang_microturn"
NAME = re.compile(r"\bMICROTURN_[A-Z0-9_]*[A-Z0-9](?![A-Z0-9_]*\*)")  # not a prefix wildcard (MICROTURN_ATTN_*)


def _names_in_package() -> dict[str, str]:
    found = {}
    for path in PACKAGE.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".patch", ".md", ".txt"):
            for name in NAME.findall(path.read_text()):
                found.setdefault(name, str(path.relative_to(REPO)))
    return found


def _readme_settings() -> set[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("### Settings", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `(MICROTURN_[A-Z0-9_]+)`", section, re.M))


def test_every_name_in_the_package_is_declared_in_config():
    undeclared = {name: where for name, where in _names_in_package().items() if name not in config.SETTINGS}
    assert undeclared == {}


def test_every_setting_is_in_the_readme_table_and_nothing_else_is():
    assert _readme_settings() == set(config.SETTINGS)


def test_only_config_reads_the_environment_for_a_microturn_name():
    readers = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "config.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = ast.unparse(node.func)
                if func in ("os.environ.get", "os.getenv", "environ.get") and str(node.args[0].value).startswith("MICROTURN_"):
                    readers.append(f"{path.relative_to(REPO)}:{node.lineno}")
            if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ" and not isinstance(node.ctx, ast.Store):
                readers.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert readers == []


@pytest.mark.parametrize("name", sorted(config.SETTINGS))
def test_defaults_when_unset(monkeypatch, name):
    monkeypatch.delenv(name, raising=False)
    assert config.value(name) == config.SETTINGS[name].default


BAD = {
    config.SESSION_KV_TOKENS: "-1", config.SESSION_KV_FRACTION: "0", config.MAX_CHUNK_TOKENS: "0",
    config.DEADLINE_MS: "0", config.ADMIT_P99_FRACTION: "-1", config.ADMIT_WINDOW_S: "soon",
    config.MAX_LIVE_SESSIONS: "2.5", config.WARMUP_SESSIONS: "many", config.COHORT_WAIT_MS: "nan",
    config.LOG_STALLS: "yes", config.STALL_LOG_GC_MS: "-5", config.MOE_GEMV_MAX_TOKENS: "lots",
    config.MOE_ALIGNED: "2", config.ALIGNMENT: "on", config.ALIGNED_ATTENTION: "flash",
    config.ATTN_SPLIT: "0", config.ATTN_BLOCK_N: "x", config.ATTN_BLOCK_M: "1e99", config.ATTN_WORKSPACE_MB: "-1",
    config.CACHE: "", config.PATCHES_DIR: "", config.MAX_SESSIONS: "0", config.IDLE_TIMEOUT_S: "inf",
    config.CLOSED_GRACE_S: "-1", config.MAX_BODY_BYTES: "100",
}


def test_every_setting_has_a_bad_value_case():
    assert set(BAD) == set(config.SETTINGS)


@pytest.mark.parametrize("name, raw", sorted(BAD.items()))
def test_a_bad_value_names_the_variable_the_value_and_what_is_allowed(monkeypatch, name, raw):
    monkeypatch.setenv(name, raw)
    with pytest.raises(SettingError) as e:
        config.value(name)
    assert str(e.value) == f"{name}={raw!r}: want {config.SETTINGS[name].allowed}"
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("name, raw, want", [
    (config.SESSION_KV_TOKENS, "4096", 4096), (config.MAX_LIVE_SESSIONS, "3", 3), (config.DEADLINE_MS, "150", 150.0),
    (config.LOG_STALLS, "1", True), (config.LOG_STALLS, "0", False), (config.ALIGNMENT, "true", True),
    (config.ALIGNED_ATTENTION, "Triton", "triton"), (config.CACHE, "/tmp/c", "/tmp/c"), (config.COHORT_WAIT_MS, "0", 0.0),
])
def test_good_values(monkeypatch, name, raw, want):
    monkeypatch.setenv(name, raw)
    assert config.value(name) == want
