#!/usr/bin/env bash
# Several configurations of `sglang-microturn serve` measured in one GPU run: every variant starts at once on
# its own port with a share of the GPU's memory (each starts once the previous one holds its memory; the rest of
# startup, ~3 min, overlaps), then
# benchmarks/realtime_capacity.py measures each in turn against the running server (--url-ours). On the GPU
# machine after benchmarks/on_device.sh's install steps:
#   bash benchmarks/serve_variants.sh OUTDIR "LEVELS" "name1=serve flags, env VAR=value ..." "name2=..." ...
# A variant is NAME=WORDS: words of the form MICROTURN_*=value or SGLANG_*=value set its environment, the rest
# are `serve` flags. Results: OUTDIR/variant_NAME.json (one realtime_capacity result each) and its server log.
set -uo pipefail
outdir=$1 levels=$2; shift 2
mem_fraction=$(python3 -c "print(round(0.8 / $#, 3))")
model=$(python3 -c "from benchmarks.realtime_capacity import model_spec
from sglang_microturn.model.checkpoints import ensure_checkpoint; print(ensure_checkpoint(model_spec('small')))")
mkdir -p "$outdir"
names=() ports=() pids=()
port=30000
for variant in "$@"; do
  name=${variant%%=*} words=${variant#*=}
  envs=() flags=()
  for w in $words; do [[ $w =~ ^(MICROTURN|SGLANG)_[A-Z0-9_]+= ]] && envs+=("$w") || flags+=("$w"); done
  env MICROTURN_LOG_STALLS=1 "${envs[@]}" sglang-microturn serve --model-path "$model" --port $port \
    --mem-fraction-static "$mem_fraction" "${flags[@]}" > "$outdir/server_$name.log" 2>&1 &
  names+=("$name") ports+=($port) pids+=($!)
  echo "=== $name on port $port: env ${envs[*]:-} flags ${flags[*]:-}"
  # The next server starts once this one holds its memory: SGLang sizes its KV pool from the memory free at
  # its start, and one profiled while another is still loading found none left (seen on an H200).
  until grep -q "Memory pool end" "$outdir/server_$name.log"; do
    kill -0 "${pids[-1]}" 2>/dev/null || break
    sleep 2
  done
  port=$((port + 1))
done
for i in "${!names[@]}"; do
  until python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:${ports[$i]}/health', timeout=2)" \
      2>/dev/null; do
    kill -0 "${pids[$i]}" 2>/dev/null || { echo "=== ${names[$i]} died"; tail -n 20 "$outdir/server_${names[$i]}.log"; break; }
    sleep 3
  done
done
echo "=== all up after $SECONDS s"
for i in "${!names[@]}"; do
  kill -0 "${pids[$i]}" 2>/dev/null || continue
  python3 -m benchmarks.realtime_capacity --servers ours --url-ours "http://127.0.0.1:${ports[$i]}" \
    --server-log-ours "$outdir/server_${names[$i]}.log" --server-pid-ours "${pids[$i]}" --levels "$levels" --seconds 8 --drain-s 3 \
    --fresh-sessions 0 --stop-miss-rate 1 --client-procs 6 --out "$outdir/variant_${names[$i]}.json" 2>&1 \
    | grep -E "sessions \(|capacity"
done
kill "${pids[@]}" 2>/dev/null; wait
