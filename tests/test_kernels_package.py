"""`microturn_kernels` (the kernels/ folder) must import with torch + triton only: trainers use it without SGLang."""

import subprocess
import sys


def test_kernels_import_without_sglang():
    code = (
        "import sys, importlib, pkgutil\n"
        "sys.modules['sglang'] = None  # any import of SGLang now fails\n"
        "import microturn_kernels\n"
        "for m in pkgutil.iter_modules(microturn_kernels.__path__):\n"
        "    importlib.import_module('microturn_kernels.' + m.name)\n"
        "print('ok', sorted(n for n in sys.modules if n.startswith('microturn_kernels')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")
    assert "kernels" not in {m for m in proc.stdout.split("'")}  # never shadows Hugging Face's `kernels`
