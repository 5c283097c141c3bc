#!/usr/bin/env bash
# GPU runs longer than one device-tool call (10 min): start them detached on the warm machine, then wait in
# calls of under 10 min each (back to back, so the machine stays held), then collect the results.
#
#   bash benchmarks/detached.sh start "cmd1" "cmd2" ...   # runs benchmarks/on_device.sh with these, returns at once
#   bash benchmarks/detached.sh wait 540                  # waits up to 540 s; prints the log's tail; exit 0 = done
#   bash benchmarks/detached.sh collect                   # copies results JSON + a tarball of logs into $OUT
#
# The commands should write their JSON under benchmarks/results/ and logs under /tmp/detached/logs/. At most 8
# files come back from $OUT, so collect packs the new results into one tarball beside the log's.
# They run in a copy of the working tree ($DIR/tree, made by start): every device call re-sends the tree and
# replaces what is there, so a result written into it would be overwritten or deleted by the next wait call
# (seen: three results of one run lost that way before they were collected).
set -uo pipefail
DIR=${MICROTURN_DETACHED_DIR:-/tmp/detached}
RUNNER=${MICROTURN_DETACHED_RUNNER:-benchmarks/on_device.sh}
case "${1:-}" in
  start)
    shift
    mkdir -p "$DIR/logs"
    export DETACHED_DIR=$DIR
    rm -rf "$DIR/rc" "$DIR/tree"
    cp -a . "$DIR/tree" || exit 1
    date +%s > "$DIR/started"
    (cd "$DIR/tree" && exec setsid bash -c 'bash "$0" "$@" > "$DETACHED_DIR/log" 2>&1; echo $? > "$DETACHED_DIR/rc"' \
      "$RUNNER" "$@") < /dev/null > /dev/null 2>&1 &
    echo "started: log in $DIR/log"
    ;;
  wait)
    limit=${2:-540}
    [[ $limit =~ ^[0-9]+$ ]] || { echo "wait takes a number of seconds, got '$limit'" >&2; exit 2; }
    end=$((SECONDS + limit))
    while [ ! -f "$DIR/rc" ] && [ $SECONDS -lt $end ]; do sleep 5; done
    tail -n 40 "$DIR/log"
    if [ -f "$DIR/rc" ]; then echo "=== done, exit $(cat "$DIR/rc")"; exit 0; fi
    echo "=== still running"; exit 1
    ;;
  collect)
    : "${OUT:?collect needs \$OUT (the device tool sets it)}"
    (cd "$DIR/tree" && find benchmarks/results -name '*.json' -newer "$DIR/started" -print0 \
      | tar -czf "$OUT/results.tar.gz" --null -T -)
    cp "$DIR/log" "$OUT/detached.log"
    tar -czf "$OUT/logs.tar.gz" -C "$DIR" logs
    tar -tzf "$OUT/results.tar.gz"
    ;;
  *)
    echo "usage: $0 start CMD... | wait [SECONDS] | collect" >&2
    exit 2
    ;;
esac
