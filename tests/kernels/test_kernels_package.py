"""`microturn_kernels` (kernels/microturn_kernels/) must import with torch + triton only: trainers use it without
SGLang. And the repository must never shadow Hugging Face's `kernels` package, which SGLang imports."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str) -> subprocess.CompletedProcess:
    # cwd = the repository root: `python -c` puts it first on sys.path, as `python -m sglang...` from there would.
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_kernels_import_without_sglang():
    proc = _run(
        "import sys, importlib, pkgutil\n"
        "sys.modules['sglang'] = None  # any import of SGLang now fails\n"
        "import microturn_kernels\n"
        "names = [m.name for m in pkgutil.iter_modules(microturn_kernels.__path__)]\n"
        "for name in names:\n"
        "    importlib.import_module('microturn_kernels.' + name)\n"
        "print('imported', len(names))\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("imported") and int(proc.stdout.split()[1]) >= 2


def test_repository_root_does_not_shadow_hf_kernels():
    proc = _run(
        "import importlib.util, os\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print('none' if spec is None else 'namespace' if spec.origin in (None, 'namespace') else spec.origin)\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = proc.stdout.strip()
    # Either HF's package, nothing, or (HF absent) an empty namespace portion: never a module of ours.
    assert found in ("none", "namespace") or not found.startswith(REPO), found
