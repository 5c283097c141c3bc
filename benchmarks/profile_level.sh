#!/usr/bin/env bash
# Where a server's CPU time goes under load: runs a benchmark command and, once its output shows PATTERN (e.g.
# the summary line of the level before the one to profile), waits LEAD seconds and samples every process of
# the SGLang server then running (the HTTP/tokenizer-manager process, the scheduler, the detokenizer) with
# py-spy for RECORD seconds, non-blocking, into $OUT/profile.txt: collapsed stacks, one line per stack with
# its sample count, the process first (`python3 -m benchmarks.profile_summary $OUT/profile.txt --seconds RECORD` ranks them).
# On the GPU machine after benchmarks/on_device.sh's install steps, with a py-spy wheel carried (py-spy is not
# in the bundle and the machine has no internet):
#   bash benchmarks/profile_level.sh WHEEL 'ours +128 sessions \(' 3 8 "python3 -m benchmarks.realtime_capacity ..."
set -uo pipefail
wheel=$1 pattern=$2 lead_s=$3 record_s=$4 cmd=$5
python3 -m pip install -q --no-deps --no-index --target /tmp/pyspy "$wheel" || exit 1
log=$(mktemp)
bash -c "$cmd" > >(tee "$log") 2>&1 &
bench=$!
until grep -qE "$pattern" "$log"; do
  kill -0 $bench 2>/dev/null || { echo "=== profile_level: '$pattern' never appeared"; wait $bench; exit $?; }
  sleep 1
done
sleep "$lead_s"
root=$(pgrep -of "sglang.launch_server|sglang-microturn serve")
echo "=== profiling pid $root and its children for $record_s s"
/tmp/pyspy/bin/py-spy record --pid "$root" --subprocesses --nonblocking --rate 250 --duration "$record_s" \
  --format raw --output "$OUT/profile.txt" || echo "=== py-spy failed"
wait $bench
