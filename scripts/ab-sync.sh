#!/usr/bin/env bash
# Produce, 100 B, sync (or FLUSH=async), of any number of `bida serve`
# binaries in turn
# (A, B, C, A, B, C, ...), a fresh broker and data directory for every run,
# one client binary (CLIENT, default the last BIN): `bida bench --count
# 4000000 --consumers 0` (1 producer, batches of 1,000, 1 partition).
# Prints `binary run msgs/s` per run, then each binary's median.
# Usage: [CLIENT=BIN] [FLUSH=async] scripts/ab-sync.sh RUNS BIN [BIN ...]
set -uo pipefail
runs="$1"; shift; bins=("$@"); client="${CLIENT:-${bins[-1]}}"; port=17983
out="$(mktemp)"
for i in $(seq "$runs"); do
  for bin in "${bins[@]}"; do
    dir=$(mktemp -d -p "${TMPDIR:-/tmp}" bida-ab.XXXXXX)
    BIDA_LOG=warn "$bin" serve --admin-listen off --data "$dir" --listen 127.0.0.1:$port --flush "${FLUSH:-sync}" > /dev/null &
    broker=$!
    for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
    v=$("$client" bench --broker 127.0.0.1:$port --json --count 4000000 --consumers 0 |
      python3 -c "import json,sys; print(round(json.load(sys.stdin)['produce_msgs_per_s']))")
    kill -TERM "$broker"; wait "$broker"; rm -rf "$dir"
    echo "$bin $i $v" | tee -a "$out"
  done
done
echo "medians (binary median):"
for bin in "${bins[@]}"; do
  printf '%s %s\n' "$bin" "$(awk -v b="$bin" '$1 == b {print $3}' "$out" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')"
done
rm -f "$out"
