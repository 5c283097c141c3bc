#!/usr/bin/env bash
# Real-time capacity of `sglang-microturn cluster` (N workers behind SGLang Model Gateway, here sharing one
# GPU) against one of its workers served directly, in one run: with UPSTREAM_LEVELS, first unpatched SGLang
# 0.5.17 alone (realtime_capacity starts and stops it); then starts the cluster on the benchmark's checkpoint,
# waits for its ready line, runs benchmarks/realtime_capacity.py against worker 0 alone (its own port, the
# other workers idle) at ONE_LEVELS, then against the gateway (--gateway-ours) at LEVELS, stops the cluster,
# and merges all into OUT.json (labels "upstream 0.5.17", "1 worker", "N workers + gateway") with its plot.
# The 1-session levels of the two ours runs give what the gateway adds to a micro-turn. On the GPU machine
# after benchmarks/on_device.sh's install steps, with smg installed (pip install smg):
#   bash benchmarks/cluster_capacity.sh N "ONE_LEVELS" "LEVELS" OUT.json LOGDIR ["UPSTREAM_LEVELS"]
set -uo pipefail
workers=$1 one_levels=$2 levels=$3 out=$4 logdir=$5 upstream_levels=${6:-}
port=31000
model=$(python3 -c "from benchmarks.realtime_capacity import model_spec
from sglang_microturn.model.checkpoints import ensure_checkpoint; print(ensure_checkpoint(model_spec('small')))")
mkdir -p "$logdir"
runs=()
if [ -n "$upstream_levels" ]; then
  python3 -m benchmarks.realtime_capacity --servers upstream --levels "$upstream_levels" --seconds 10 --drain-s 3 \
    --fresh-sessions 0 --log-dir "$logdir" --out "$logdir/upstream.json" 2>&1 | grep -E "sessions \(|capacity"
  [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
  runs+=(--merge "upstream 0.5.17=$logdir/upstream.json")
fi
MICROTURN_LOG_STALLS=1 sglang-microturn cluster --workers "$workers" --port $port --log-dir "$logdir" \
  --model-path "$model" > "$logdir/cluster.out" 2>&1 &
cluster=$!
until grep -q "workers behind the gateway" "$logdir/cluster.out"; do
  kill -0 $cluster 2>/dev/null || { echo "=== cluster exited"; tail -n 30 "$logdir/cluster.out"; exit 1; }
  sleep 3
done
echo "=== cluster of $workers up after $SECONDS s"
measure() {  # URL LEVELS OUT [flags]: one realtime_capacity run against a running server
  python3 -m benchmarks.realtime_capacity --servers ours --url-ours "$1" --levels "$2" --seconds 10 --drain-s 3 \
    --fresh-sessions 0 --out "$3" "${@:4}" 2>&1 | grep -E "sessions \(|capacity"
  return "${PIPESTATUS[0]}"
}
measure "http://127.0.0.1:$((port + 1))" "$one_levels" "$logdir/one_worker.json"; one=$?
measure "http://127.0.0.1:$port" "$levels" "$logdir/gateway.json" --gateway-ours; gateway=$?
kill -TERM $cluster; wait $cluster
[ $one -eq 0 ] && [ $gateway -eq 0 ] || exit 1
python3 -m benchmarks.realtime_capacity --out "$out" "${runs[@]}" \
  --merge "1 worker=$logdir/one_worker.json" --merge "$workers workers + gateway=$logdir/gateway.json"
