#!/usr/bin/env bash
# Transactions against plain produce, same `bida bench` options: for
# transactions of 1, 10 and 100 messages, `--txn N` (begin, N halves in one
# request, commit) against `--batch N` (plain PRODUCE of N). 100 B
# messages, 1 producer, 64 transactions or batches in flight, sync flush,
# a fresh broker per run. Prints every run and the median msgs/s.
# Usage: scripts/txn-bench.sh [RUNS] [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"; base="${2:-${TMPDIR:-/tmp}}"
cargo build --release --quiet
bin=target/release/bida
port=17981

start_broker() {
  dir="$(mktemp -d -p "$base" bida-tb.XXXXXX)"
  BIDA_LOG=warn "$bin" serve --admin-listen off --data "$dir" --listen "127.0.0.1:$port" --flush sync > /dev/null &
  broker=$!
  for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && return; sleep 0.1; done
  echo "broker did not start" >&2; exit 1
}
stop_broker() { kill -TERM "$broker"; wait "$broker" || true; rm -rf "$dir"; }
median() { sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

for n in 1 10 100; do
  count=$((n == 1 ? 20000 : n == 10 ? 100000 : 300000))
  for mode in plain txn; do
    values=()
    for i in $(seq "$runs"); do
      start_broker
      if [ "$mode" = txn ]; then flag=(--txn "$n"); else flag=(--batch "$n"); fi
      v="$("$bin" bench --broker "127.0.0.1:$port" --json --consumers 0 --inflight 64 \
            --count "$count" "${flag[@]}" \
          | python3 -c "import json,sys; r=json.load(sys.stdin); print(round(r['produce_msgs_per_s']))")"
      stop_broker
      echo "$mode n=$n run $i: $v msgs/s"
      values+=("$v")
    done
    printf '%s n=%s median: %s msgs/s\n' "$mode" "$n" "$(printf '%s\n' "${values[@]}" | median)"
  done
done
