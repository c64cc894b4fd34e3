#!/usr/bin/env bash
# Produce throughput across many partitions: `bida bench --partitions N
# --keys` (4 producers, 100 B messages, batches of 1,000 keyed so they
# spread over every partition) against a fresh `bida serve` per run, for
# N = 1, 100, 1,000 and 10,000, sync and async flush, ROUNDS times with the
# cases alternating; then, per N, the sync p99 ack latency at half the sync
# median. Prints one line per run and the medians.
# Usage: scripts/partitions-bench.sh BIN [ROUNDS] [COUNT_PER_PRODUCER]
set -uo pipefail
bin="$1"; rounds="${2:-3}"; count="${3:-2000000}"; port=17985
out="$(mktemp)"
start() { # flush
  dir=$(mktemp -d -p "${TMPDIR:-/tmp}" bida-pb.XXXXXX)
  BIDA_LOG=warn "$bin" serve --admin-listen off --data "$dir" --listen 127.0.0.1:$port --flush "$1" > /dev/null &
  broker=$!
  for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && return; sleep 0.1; done
  echo "broker did not start" >&2; exit 1
}
stop() { kill -TERM "$broker"; wait "$broker"; rm -rf "$dir"; }
bench() { # field args...
  local field="$1"; shift
  "$bin" bench --broker 127.0.0.1:$port --json --topic pb --keys --producers 4 --consumers 0 "$@" |
    python3 -c "import json,sys; r=json.load(sys.stdin); print($field)"
}
median_of() { awk -v k="$1" '$1 == k {print $3}' "$out" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
for round in $(seq "$rounds"); do
  for flush in sync async; do
    for n in 1 100 1000 10000; do
      start "$flush"
      echo "$flush-$n $round $(bench "round(r['produce_msgs_per_s'])" --partitions "$n" --count "$count")" | tee -a "$out"
      stop
    done
  done
done
for n in 1 100 1000 10000; do
  half=$(( $(median_of "sync-$n") / 2 ))
  start sync
  echo "p99us-at-half-$n 1 $(bench "r['ack_latency']['p99_us']" --partitions "$n" --count $(( half * 3 / 4 )) --rate $(( half / 4 )))" | tee -a "$out"
  stop
done
echo "medians (case median):"
for k in $(awk '{print $1}' "$out" | sort -u); do echo "$k $(median_of "$k")"; done
rm -f "$out"
