#!/usr/bin/env bash
# On the CPU machine, after ../shared/device/build.sh: add the wheels of the `serve` extra and the client that the
# SGLang bundle lacks (the GPU machine has no internet), so the GPU server runs as users install it:
# httptools (uvicorn's C HTTP parser; without it uvicorn parses with h11, pure Python) and websockets (uvicorn's
# WebSocket protocol for WS /microturn/ws, and the client's). .devbundle/install.sh installs every wheel there.
#   bash benchmarks/devbundle_extras.sh [.devbundle]
set -euo pipefail
bundle=${1:-.devbundle}
[ -d "$bundle/wheels" ] || { echo "no $bundle/wheels: build the bundle first (../shared/device/build.sh $bundle)" >&2; exit 1; }
# The GPU machine's Python (../shared/device/README.md): CPython 3.12 on x86_64 Linux.
python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.12 \
  --implementation cp -d "$bundle/wheels" "httptools==0.9.0" "websockets==17.4"
ls "$bundle/wheels" | grep -E '^(httptools|websockets)-'
