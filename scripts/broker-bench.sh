#!/usr/bin/env bash
# The broker's performance table: `bida serve` and `bida bench` as separate
# processes on loopback, 1 producer, batches of 1,000, 1 partition. Each
# case runs RUNS times on a fresh broker and data directory; prints every
# run's JSON summary line and the median. The last case paces the producer
# at half the sync median measured before it ("half of maximum load").
# Usage: scripts/broker-bench.sh [RUNS] [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"; base="${2:-${TMPDIR:-/tmp}}"
cargo build --release --quiet
bin=target/release/bida
port=17979

start_broker() { # flush
  dir="$(mktemp -d -p "$base" bida-bb.XXXXXX)"
  BIDA_LOG=warn "$bin" serve --admin-listen off --data "$dir" --listen "127.0.0.1:$port" --flush "$1" > /dev/null &
  broker=$!
  for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && return; sleep 0.1; done
  echo "broker did not start" >&2; exit 1
}
stop_broker() { kill -TERM "$broker"; wait "$broker" || true; rm -rf "$dir"; }

median() { sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

run_case() { # name flush field bench-args...
  local name="$1" flush="$2" field="$3"; shift 3
  local values=()
  for i in $(seq "$runs"); do
    start_broker "$flush"
    if [ "$name" = consume-backlog ]; then
      "$bin" bench --broker "127.0.0.1:$port" --topic backlog --consumers 0 --count 4000000 --json > /dev/null
    fi
    v="$("$bin" bench --broker "127.0.0.1:$port" --json "$@" | python3 -c "import json,sys; r=json.load(sys.stdin); print($field)")"
    stop_broker
    echo "$name run $i: $v"
    values+=("$v")
  done
  last_median="$(printf '%s\n' "${values[@]}" | median)"
  printf '%s median: %s\n' "$name" "$last_median"
}

run_case async-100B     async "round(r['produce_msgs_per_s'])" --count 4000000 --consumers 0
run_case sync-100B      sync  "round(r['produce_msgs_per_s'])" --count 4000000 --consumers 0
half=$((last_median / 2)) # "half of maximum load": half the sync median just measured
run_case async-1KiB-MBps async "round(r['produce_mb_per_s'])"  --count 1000000 --size 1024 --consumers 0
run_case consume-backlog async "round(r['consume_msgs_per_s'])" --topic backlog --producers 0 --consumers 1 --count 4000000
run_case produce+consume async "(round(r['produce_msgs_per_s']), round(r['consume_msgs_per_s']))" --count 3000000 --consumers 1
run_case sync-1M-per-s-p99-us sync "r['ack_latency']['p99_us']" --count 3000000 --consumers 0 --rate 1000000
run_case "sync-half-max-$half-per-s-p99-us" sync "r['ack_latency']['p99_us']" --count $((half * 3)) --consumers 0 --rate "$half"
