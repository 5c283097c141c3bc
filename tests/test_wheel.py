"""A plain (non-editable) install works: the wheel carries the patch-set and the example `demo` runs, and
`sglang-microturn patch check` run from the installed wheel (not this checkout) finds the patches."""

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATCHES = sorted(p.name for p in (REPO / "sglang_microturn" / "patchset" / "patches").glob("*.patch"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(REPO / "sglang_microturn", src / "sglang_microturn", ignore=ignore)
    shutil.copytree(REPO / "kernels", src / "kernels", ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("sglang_microturn-*.whl")
    return path


def test_the_wheel_carries_the_patches_the_example_and_the_entry_points(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert PATCHES and {f"sglang_microturn/patchset/patches/{p}" for p in PATCHES} <= names
    assert "sglang_microturn/examples/duplex_chat.py" in names
    assert "sglang_microturn/examples/web/console.html" in names  # served at /microturn/console
    assert "microturn_kernels/aligned_attention.py" in names
    (ep,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    entry_points = configparser.ConfigParser()
    entry_points.read_string(zipfile.ZipFile(wheel).read(ep).decode())
    assert entry_points["console_scripts"]["sglang-microturn"] == "sglang_microturn.cli.main:main"
    assert entry_points["sglang.srt.plugins"]["microturn"] == "sglang_microturn.server.plugin:register"


def test_patch_check_from_the_installed_wheel_finds_the_patches(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # cwd and PYTHONPATH point away from this checkout: the package comes from the wheel, SGLang from the venv
    code = ("import sglang_microturn, sys\n"
            "from sglang_microturn.cli.main import main\n"
            "print('FROM', sglang_microturn.__file__)\n"
            "sys.exit(main(['patch', 'check']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert f"FROM {target}" in proc.stdout
    assert all(f"{p}: applied" in proc.stdout for p in PATCHES), proc.stdout
