#!/usr/bin/env bash
# Real-time capacity of `sglang-microturn cluster` (N workers behind SGLang Model Gateway, here sharing one
# GPU): starts the cluster on the benchmark's checkpoint, waits for its ready line, runs
# benchmarks/realtime_capacity.py against the gateway (--gateway-ours), stops the cluster. On the GPU machine
# after benchmarks/on_device.sh's install steps, with smg installed (pip install smg):
#   bash benchmarks/cluster_capacity.sh N "LEVELS" OUT.json LOGDIR
set -uo pipefail
workers=$1 levels=$2 out=$3 logdir=$4
port=31000
model=$(python3 -c "from benchmarks.realtime_capacity import model_spec
from sglang_microturn.model.checkpoints import ensure_checkpoint; print(ensure_checkpoint(model_spec('small')))")
mkdir -p "$logdir"
MICROTURN_LOG_STALLS=1 sglang-microturn cluster --workers "$workers" --port $port --log-dir "$logdir" \
  --model-path "$model" > "$logdir/cluster.out" 2>&1 &
cluster=$!
until grep -q "workers behind the gateway" "$logdir/cluster.out"; do
  kill -0 $cluster 2>/dev/null || { echo "=== cluster exited"; tail -n 30 "$logdir/cluster.out"; exit 1; }
  sleep 3
done
echo "=== cluster of $workers up after $SECONDS s"
python3 -m benchmarks.realtime_capacity --servers ours --url-ours "http://127.0.0.1:$port" --gateway-ours \
  --levels "$levels" --seconds 10 --drain-s 3 --fresh-sessions 0 --out "$out" 2>&1 | grep -E "sessions \(|capacity"
status=${PIPESTATUS[0]}
kill -TERM $cluster; wait $cluster
exit $status
