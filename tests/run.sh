#!/usr/bin/env bash
# Install what the CPU test suite needs into .venv (first run, or when the lock changed), then run pytest.
# Any arguments go to pytest. CPU only: SGLang's Python classes run on CPU, Triton kernels under
# TRITON_INTERPRET=1 (set in tests/conftest.py); tests marked `gpu` are skipped without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MICROTURN_VENV:-.venv}
LOCK=requirements/cpu-test.lock
STAMP="$VENV/.cpu-test-lock.sha256"

if ! { [ -f "$STAMP" ] && sha256sum --quiet -c "$STAMP" >/dev/null 2>&1; }; then
  echo "installing the CPU test environment into $VENV (first run: a few minutes, ~3 GB download)"
  python3 -m venv "$VENV"
  # --no-deps: the lock is SGLang 0.5.17's CPU-importable subset, not its full CUDA dependency set
  "$VENV/bin/python" -m pip install -q --no-deps -r "$LOCK"
  sha256sum "$LOCK" > "$STAMP"
fi
# The browser console's test drives headless Chromium (tests/server/test_console.py); it skips without one.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q chromium >/dev/null 2>&1 || echo "note: could not install chromium: the console test will skip"
fi
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/sglang-microturn" patch apply >/dev/null
exec "$VENV/bin/python" -m pytest "$@"
