"""What the server benchmarks share: their common command-line arguments and how they start our server.

Every benchmark runs from the repository root as `python -m benchmarks.<name>` (no sys.path edits) and writes
its JSON through benchmarks/run_record.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys

# GPU flags both servers of the latency and alignment comparisons run with.
COMMON_FLAGS = ["--disable-prefill-cuda-graph", "--cuda-graph-max-bs-decode", "64"]


def benchmark_parser(doc: str, *, log: str | None = None, sglang_args: bool = True) -> argparse.ArgumentParser:
    """The head every server benchmark has: --out (JSON), --port, the server log (`--log PATH` when `log` gives
    its default, else `--log-dir`), and extra SGLang flags after `--`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--port", type=int, default=30000)
    if log is not None:
        p.add_argument("--log", default=log)
    else:
        p.add_argument("--log-dir", default="/tmp")
    if sglang_args:
        p.add_argument("sglang_args", nargs="*", help="extra SGLang flags (after --)")
    return p


def microturn_exe() -> str:
    """The `sglang-microturn` command of this environment."""
    return shutil.which("sglang-microturn") or sys.exit("sglang-microturn is not on PATH: pip install -e . first")


def serve_argv(port: int, *flags: str, model_path: str | None = None) -> list[str]:
    """`sglang-microturn serve` on `port` (the default model unless `model_path`), then `flags`."""
    model = [] if model_path is None else ["--model-path", model_path]
    return [microturn_exe(), "serve", *model, "--port", str(port), *flags]
