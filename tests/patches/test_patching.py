"""The patch machinery: parse, state, apply (idempotent), revert, conflicts, version gate, and our real patches."""

import shutil

import pytest

from sglang_microturn import SGLANG_VERSION
from sglang_microturn.cli import main as cli
from sglang_microturn.patchset import patching
from sglang_microturn.patchset.patching import PatchError, PatchState, PatchTarget, UnsupportedSGLang

ORIGINAL_A = "".join(f"line {i}\n" for i in range(1, 41))
ORIGINAL_B = "alpha\nbeta\ngamma\n"

TWO_FILE_PATCH = """Subject: demo

Free text before the diff is the description.
---
--- a/sglang/a.py
+++ b/sglang/a.py
@@ -2,3 +2,4 @@
 line 2
-line 3
+line three
+line 3.5
 line 4
@@ -30,2 +31,2 @@
 line 30
-line 31
+line thirty-one
--- a/sglang/b.py
+++ b/sglang/b.py
@@ -1,3 +1,3 @@
 alpha
-beta
+BETA
 gamma
"""


@pytest.fixture
def target(tmp_path):
    (tmp_path / "sglang").mkdir()
    (tmp_path / "sglang" / "a.py").write_text(ORIGINAL_A)
    (tmp_path / "sglang" / "b.py").write_text(ORIGINAL_B)
    return PatchTarget(tmp_path, SGLANG_VERSION)


def read(target, rel):
    return (target.root / rel).read_text()


def test_parse_reads_files_and_hunks():
    patch = patching.parse_patch("demo.patch", TWO_FILE_PATCH)
    assert [f.path for f in patch.files] == ["sglang/a.py", "sglang/b.py"]
    first = patch.files[0].hunks[0]
    assert first.old == ("line 2\n", "line 3\n", "line 4\n")
    assert first.new == ("line 2\n", "line three\n", "line 3.5\n", "line 4\n")


@pytest.mark.parametrize(
    "text, message",
    [
        ("just words\n", "not a unified diff"),
        ("--- a/x.py\n+++ x.py\n@@ -1 +1 @@\n-a\n+b\n", "expected a 'b/' path"),
        ("--- a/x.py\n+++ b/x.py\n@@ nonsense @@\n", "bad hunk header"),
        ("--- a/x.py\n+++ b/x.py\n@@ -1,3 +1,3 @@\n a\n", "ends early"),
        ("--- a/x.py\n+++ b/x.py\n", "no hunks"),
    ],
)
def test_parse_rejects_malformed_patches(text, message):
    with pytest.raises(PatchError, match=message):
        patching.parse_patch("bad.patch", text)


def test_apply_is_idempotent_and_revert_restores_bytes(target):
    patch = patching.parse_patch("demo.patch", TWO_FILE_PATCH)
    assert patching.state(patch, target) is PatchState.NOT_APPLIED
    assert patching.apply(patch, target) is PatchState.NOT_APPLIED  # state found before acting
    patched_a, patched_b = read(target, "sglang/a.py"), read(target, "sglang/b.py")
    assert "line three\nline 3.5\n" in patched_a and "line thirty-one\n" in patched_a
    assert patched_b == "alpha\nBETA\ngamma\n"
    assert patching.state(patch, target) is PatchState.APPLIED

    assert patching.apply(patch, target) is PatchState.APPLIED  # second apply: no-op
    assert (read(target, "sglang/a.py"), read(target, "sglang/b.py")) == (patched_a, patched_b)

    assert patching.revert(patch, target) is PatchState.APPLIED
    assert (read(target, "sglang/a.py"), read(target, "sglang/b.py")) == (ORIGINAL_A, ORIGINAL_B)
    assert patching.revert(patch, target) is PatchState.NOT_APPLIED  # second revert: no-op
    assert read(target, "sglang/a.py") == ORIGINAL_A


def test_hunks_still_apply_when_lines_moved(target):
    (target.root / "sglang" / "a.py").write_text("# a new header line\n" * 5 + ORIGINAL_A)
    patch = patching.parse_patch("demo.patch", TWO_FILE_PATCH)
    assert patching.apply(patch, target) is PatchState.NOT_APPLIED
    assert read(target, "sglang/a.py").startswith("# a new header line\n" * 5 + "line 1\nline 2\nline three\n")


def test_conflict_touches_no_file(target):
    # b.py was changed by someone else: the patch must not half-apply (a.py would match on its own).
    (target.root / "sglang" / "b.py").write_text("alpha\nsomething else\ngamma\n")
    patch = patching.parse_patch("demo.patch", TWO_FILE_PATCH)
    assert patching.state(patch, target) is PatchState.CONFLICT
    assert patching.apply(patch, target) is PatchState.CONFLICT
    assert read(target, "sglang/a.py") == ORIGINAL_A
    assert read(target, "sglang/b.py") == "alpha\nsomething else\ngamma\n"


def test_missing_file_names_the_path(target):
    (target.root / "sglang" / "b.py").unlink()
    patch = patching.parse_patch("demo.patch", TWO_FILE_PATCH)
    with pytest.raises(PatchError, match="b.py does not exist"):
        patching.state(patch, target)


def test_wrong_sglang_version_is_refused(target, monkeypatch, capsys):
    target.version = "0.5.23"
    with pytest.raises(UnsupportedSGLang, match=r"target SGLang 0\.5\.17, but SGLang 0\.5\.23"):
        patching.check_version(target)
    monkeypatch.setattr(patching, "installed_sglang", lambda: target)
    for action in ("apply", "check", "revert"):
        assert cli.main(["patch", action]) == 2
        err = capsys.readouterr().err
        assert "0.5.23" in err and "pip install 'sglang==0.5.17'" in err
    assert read(target, "sglang/a.py") == ORIGINAL_A


def test_cli_reports_each_patch(target, monkeypatch, capsys, tmp_path_factory):
    patches = tmp_path_factory.mktemp("patches")
    (patches / "0001-demo.patch").write_text(TWO_FILE_PATCH)
    monkeypatch.setenv("MICROTURN_PATCHES_DIR", str(patches))
    monkeypatch.setattr(patching, "installed_sglang", lambda: target)
    assert cli.main(["patch", "check"]) == 1
    assert "0001-demo.patch: not applied" in capsys.readouterr().out
    assert cli.main(["patch", "apply"]) == 0
    assert "0001-demo.patch: applied" in capsys.readouterr().out
    assert cli.main(["patch", "apply"]) == 0
    assert "0001-demo.patch: already applied" in capsys.readouterr().out
    assert cli.main(["patch", "check"]) == 0
    assert cli.main(["patch", "revert"]) == 0
    assert "0001-demo.patch: reverted" in capsys.readouterr().out
    (target.root / "sglang" / "b.py").write_text("changed\n")
    assert cli.main(["patch", "apply"]) == 1
    assert "0001-demo.patch: conflict" in capsys.readouterr().out


def test_our_patches_round_trip_on_a_copy_of_the_installed_sglang(tmp_path):
    """Every patch in patches/ applies to, and reverts from, SGLang 0.5.17's real files byte for byte."""
    installed = patching.installed_sglang()
    patches = patching.load_patches()
    copy = PatchTarget(tmp_path, installed.version)
    files = sorted({fp.path for p in patches for fp in p.files})
    for rel in files:  # start from pristine sources, whatever state the installed copy is in
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(patching.pristine_source(rel, installed, patches))
    pristine = {rel: read(copy, rel) for rel in files}
    for patch in patches:
        assert patching.apply(patch, copy) is PatchState.NOT_APPLIED
        assert patching.state(patch, copy) is PatchState.APPLIED
    for patch in reversed(patches):
        assert patching.revert(patch, copy) is PatchState.APPLIED
    assert {rel: read(copy, rel) for rel in files} == pristine


def test_installed_sglang_is_patched():
    """The test environment (tests/run.sh) applies the patches; everything else here assumes it."""
    assert patching.unapplied() == []


def test_patch_files_apply_with_gnu_patch_too(tmp_path):
    """Our patches are plain unified diffs that upstream tooling (`patch -p1`) accepts, and it produces
    exactly what our machinery produces."""
    if shutil.which("patch") is None:
        pytest.skip("GNU patch not installed")
    import subprocess

    installed = patching.installed_sglang()
    patches = patching.load_patches()
    for rel in sorted({fp.path for p in patches for fp in p.files}):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(patching.pristine_source(rel, installed, patches))
    for path in sorted(patching.patches_dir().glob("*.patch")):  # in order: later patches may build on earlier
        proc = subprocess.run(["patch", "-p1", "-d", str(tmp_path), "-i", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for rel in sorted({fp.path for p in patches for fp in p.files}):
        assert (tmp_path / rel).read_text() == (installed.root / rel).read_text()
