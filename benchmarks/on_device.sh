#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root, with .devbundle carried (see ../shared/device/README.md):
# installs the SGLang 0.5.17 bundle and this package, applies our patches, then runs each argument as a shell
# command. Example:
#   MICROTURN_GIT_COMMIT=<sha> bash benchmarks/on_device.sh "python3 -m benchmarks.smoke_session --out \$OUT/smoke.json"
set -uo pipefail
bash .devbundle/install.sh /tmp/site >/dev/null || exit 1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
sglang-microturn patch apply || exit 1
# What `pip install '.[serve]'` brings and the SGLang bundle lacks (benchmarks/devbundle_extras.sh adds it).
python3 -c "import httptools, websockets" 2>/dev/null \
  || echo "=== warning: httptools/websockets missing: uvicorn parses HTTP with h11 and refuses WebSockets; run benchmarks/devbundle_extras.sh"
status=0
for cmd in "$@"; do
  echo "=== $cmd"
  bash -c "$cmd" || { echo "=== FAILED ($?): $cmd"; status=1; }
done
exit $status
