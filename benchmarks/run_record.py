"""The provenance every committed result carries: card, date, git commit, exact command."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path


def git_commit() -> str:
    """HEAD of this checkout; the device machine gets no .git, so callers pass MICROTURN_GIT_COMMIT there."""
    env = os.environ.get("MICROTURN_GIT_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def card_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def write_result(path: str | os.PathLike, results: dict) -> Path:
    """Write `results` with provenance to `path` (JSON) and return the path."""
    record = {
        "card": card_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": " ".join([os.path.basename(sys.executable), *sys.orig_argv[1:]]),  # keeps `-m benchmarks.<name>`
        **results,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
