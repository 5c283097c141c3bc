"""Apply, check and revert our patch-set against the installed SGLang package.

Core SGLang changes exist only as unified diffs in `patches/` beside this module (package data; git
format-patch style: a free-text header, then `--- a/sglang/...` / `+++ b/sglang/...` file sections), written
against SGLang's source so they can go upstream unchanged. Paths are relative to the directory that holds the `sglang` package (site-packages).

A patch is in exactly one state, decided from the files alone (no bookkeeping that could go stale):
  applied      every hunk matches in reverse (the "+" side is what the file holds now),
  not applied  every hunk matches forward,
  conflict     neither: the file was changed by something else, or is a different SGLang build.
Hunks must match exactly (no fuzz); only their line offset may move. A patch touches all its files or none.
"""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.resources
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sglang_microturn import SGLANG_VERSION, config

_HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(Exception):
    """A patch file is malformed, or the installed SGLang cannot take the patch-set."""


class UnsupportedSGLang(PatchError):
    """SGLang is missing, or is not the one release our patches target."""


class PatchState(enum.Enum):
    APPLIED = "applied"
    NOT_APPLIED = "not applied"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class Hunk:
    old_start: int  # 1-based line of the first "-"/context line in the original file
    old: tuple[str, ...]  # context + removed lines, each with its newline
    new: tuple[str, ...]  # context + added lines


@dataclass(frozen=True)
class FilePatch:
    path: str  # relative to the directory holding the `sglang` package
    hunks: tuple[Hunk, ...]


@dataclass(frozen=True)
class Patch:
    name: str
    files: tuple[FilePatch, ...]


def parse_patch(name: str, text: str) -> Patch:
    """Parse a unified diff. Text before the first `--- ` line is the patch's description."""
    lines = text.splitlines(keepends=True)
    files: list[FilePatch] = []
    i = 0
    while i < len(lines):
        if not (lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ ")):
            i += 1
            continue
        path = _strip_prefix(lines[i + 1][4:].split("\t")[0].strip(), name)
        i += 2
        hunks: list[Hunk] = []
        while i < len(lines) and lines[i].startswith("@@"):
            m = _HUNK_HEADER.match(lines[i])
            if not m:
                raise PatchError(f"{name}: bad hunk header {lines[i].strip()!r}")
            old_len = int(m.group(2) or 1)
            new_len = int(m.group(4) or 1)
            old: list[str] = []
            new: list[str] = []
            i += 1
            while len(old) < old_len or len(new) < new_len:
                if i >= len(lines):
                    raise PatchError(f"{name}: hunk in {path} ends early")
                line = lines[i]
                tag, body = line[:1], line[1:]
                if line.startswith("\\"):  # "\ No newline at end of file"
                    i += 1
                    continue
                if tag in (" ", "\n"):
                    body = body if tag == " " else "\n"
                    old.append(body)
                    new.append(body)
                elif tag == "-":
                    old.append(body)
                elif tag == "+":
                    new.append(body)
                else:
                    raise PatchError(f"{name}: unexpected line in hunk of {path}: {line!r}")
                i += 1
            hunks.append(Hunk(int(m.group(1)), tuple(old), tuple(new)))
        if not hunks:
            raise PatchError(f"{name}: no hunks for {path}")
        files.append(FilePatch(path, tuple(hunks)))
    if not files:
        raise PatchError(f"{name}: not a unified diff (no '--- a/...' / '+++ b/...' file header)")
    return Patch(name, tuple(files))


def _strip_prefix(path: str, name: str) -> str:
    if not path.startswith("b/"):
        raise PatchError(f"{name}: expected a 'b/' path in the +++ header, got {path!r}")
    return path[2:]


def _apply_hunks(lines: list[str], hunks: tuple[Hunk, ...], reverse: bool) -> list[str] | None:
    """The file's lines with every hunk applied (reverse: undone), or None if any hunk does not match."""
    out = list(lines)
    shift = 0  # how far earlier hunks moved later line numbers
    for hunk in hunks:
        find, put = (hunk.new, hunk.old) if reverse else (hunk.old, hunk.new)
        at = _locate(out, find, hunk.old_start - 1 + shift)
        if at is None:
            return None
        out[at : at + len(find)] = put
        shift += (at - (hunk.old_start - 1 + shift)) + len(put) - len(find)
    return out


def _locate(lines: list[str], block: tuple[str, ...], expected: int) -> int | None:
    """Index of the exact match of `block` nearest to `expected` (patch offsets may drift, content may not)."""
    n = len(block)
    for distance in range(len(lines) + 1):
        for at in (expected - distance, expected + distance) if distance else (expected,):
            if 0 <= at <= len(lines) - n and tuple(lines[at : at + n]) == block:
                return at
    return None


@dataclass
class PatchTarget:
    """The installed SGLang that patches are applied to."""

    root: Path  # directory holding the `sglang` package
    version: str

    def read(self, rel: str) -> list[str]:
        path = self.root / rel
        if not path.is_file():
            raise PatchError(f"{path} does not exist: not an SGLang {SGLANG_VERSION} install")
        return path.read_text().splitlines(keepends=True)

    def write(self, rel: str, lines: list[str]) -> None:
        path = self.root / rel
        tmp = path.with_name(path.name + ".microturn-tmp")
        tmp.write_text("".join(lines))
        os.chmod(tmp, path.stat().st_mode)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written SGLang source file


def installed_sglang() -> PatchTarget:
    """Locate the installed SGLang without importing it (importing takes seconds and may pull CUDA)."""
    try:
        version = importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        raise UnsupportedSGLang(
            f"SGLang is not installed; install it with: pip install 'sglang=={SGLANG_VERSION}'"
        ) from None
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("the `sglang` distribution is installed but its package cannot be found on sys.path")
    return PatchTarget(Path(next(iter(spec.submodule_search_locations))).parent, version)


def check_version(target: PatchTarget) -> None:
    if target.version != SGLANG_VERSION:
        raise UnsupportedSGLang(
            f"sglang-microturn patches target SGLang {SGLANG_VERSION}, but SGLang {target.version} is installed "
            f"at {target.root}; install the supported version: pip install 'sglang=={SGLANG_VERSION}'"
        )


def patches_dir() -> Path:
    """The patch-set shipped inside this package (`sglang_microturn/patchset/patches/`, package data, so an
    installed wheel has it too); MICROTURN_PATCHES_DIR overrides."""
    override = config.value(config.PATCHES_DIR)
    if override:
        return Path(override)
    # A wheel installs as plain files, and an editable install points at the checkout: a real folder either way.
    return Path(str(importlib.resources.files("sglang_microturn.patchset") / "patches"))


def load_patches(directory: Path | None = None) -> list[Patch]:
    """All `*.patch` files in name order (the order they are applied in)."""
    directory = directory or patches_dir()
    files = sorted(directory.glob("*.patch"))
    if not files:
        raise PatchError(f"no *.patch files in {directory}")
    return [parse_patch(f.name, f.read_text()) for f in files]


def state(patch: Patch, target: PatchTarget) -> PatchState:
    forward = reverse = True
    for fp in patch.files:
        lines = target.read(fp.path)
        forward = forward and _apply_hunks(lines, fp.hunks, reverse=False) is not None
        reverse = reverse and _apply_hunks(lines, fp.hunks, reverse=True) is not None
    if reverse and not forward:
        return PatchState.APPLIED
    if forward and not reverse:
        return PatchState.NOT_APPLIED
    return PatchState.CONFLICT  # neither matches, or both do (an ambiguous patch is a bug in the patch)


def _rewrite(patch: Patch, target: PatchTarget, reverse: bool) -> None:
    new_contents = {}
    for fp in patch.files:
        lines = _apply_hunks(target.read(fp.path), fp.hunks, reverse=reverse)
        if lines is None:
            raise PatchError(f"{patch.name}: {fp.path} does not match; run `sglang-microturn patch check`")
        new_contents[fp.path] = lines
    for rel, lines in new_contents.items():  # every file matched: now write them all
        target.write(rel, lines)


def apply(patch: Patch, target: PatchTarget) -> PatchState:
    """Apply if not applied. Returns the state found before acting (APPLIED means nothing was done)."""
    before = state(patch, target)
    if before is PatchState.NOT_APPLIED:
        _rewrite(patch, target, reverse=False)
    return before


def revert(patch: Patch, target: PatchTarget) -> PatchState:
    """Undo if applied. Returns the state found before acting (NOT_APPLIED means nothing was done)."""
    before = state(patch, target)
    if before is PatchState.APPLIED:
        _rewrite(patch, target, reverse=True)
    return before


def pristine_source(rel: str, target: PatchTarget, patches: list[Patch]) -> str:
    """The text `rel` had before our applied patches touched it (for tests that reproduce upstream bugs)."""
    lines = target.read(rel)
    for patch in reversed(patches):
        for fp in patch.files:
            if fp.path == rel and state(patch, target) is PatchState.APPLIED:
                lines = _apply_hunks(lines, fp.hunks, reverse=True)
    return "".join(lines)


def unapplied(target: PatchTarget | None = None) -> list[tuple[str, PatchState]]:
    """Patches that are not applied (name, state); empty when the install is fully patched."""
    target = target or installed_sglang()
    check_version(target)
    return [(p.name, s) for p in load_patches() if (s := state(p, target)) is not PatchState.APPLIED]
