#!/usr/bin/env bash
# A/B of two `bida serve` binaries over the cases of the broker table
# (scripts/broker-bench.sh): the two alternate (old, new, old, ...), a fresh
# broker and data directory for every run, one client binary (CLIENT,
# default NEW) running `bida bench`. Prints one line per run:
#   case which run value
# and the medians at the end. The last case paces a sync producer at half
# the sync 100 B median of both binaries measured before it.
# Usage: scripts/ab-serve.sh OLD_BIN NEW_BIN [RUNS] [CLIENT]
# Build OLD_BIN from another commit with, e.g.:
#   git worktree add /tmp/old <commit> && (cd /tmp/old && cargo build --release)
set -uo pipefail
old="$1"; new="$2"; runs="${3:-5}"; client="${4:-$new}"; port=17981
out="$(mktemp)"
start() { # bin flush
  dir=$(mktemp -d -p "${TMPDIR:-/tmp}" bida-ab.XXXXXX)
  BIDA_LOG=warn "$1" serve --admin-listen off --data "$dir" --listen 127.0.0.1:$port --flush "$2" > /dev/null &
  broker=$!
  for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && return; sleep 0.1; done
  echo "broker did not start" >&2; exit 1
}
stop() { kill -TERM "$broker"; wait "$broker"; rm -rf "$dir"; }
bench() { # python-field bench-args...
  local field="$1"; shift
  "$client" bench --broker 127.0.0.1:$port --json "$@" |
    python3 -c "import json,sys; r=json.load(sys.stdin); print($field)"
}
run_case() { # name flush field bench-args...
  local name="$1" flush="$2" field="$3"; shift 3
  for i in $(seq "$runs"); do
    for which in old new; do
      bin=$old; [ "$which" = new ] && bin=$new
      start "$bin" "$flush"
      if [ "$name" = consume-backlog ]; then
        "$client" bench --broker 127.0.0.1:$port --topic backlog --consumers 0 --count 4000000 --json > /dev/null
      fi
      echo "$name $which $i $(bench "$field" "$@")" | tee -a "$out"
      stop
    done
  done
}
median_of() { # name
  awk -v n="$1" '$1 == n {print $4}' "$out" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'
}
msgs="round(r['produce_msgs_per_s'])"
run_case async-100B async "$msgs" --count 4000000 --consumers 0
run_case sync-100B sync "$msgs" --count 4000000 --consumers 0
run_case async-1KiB async "$msgs" --count 1000000 --size 1024 --consumers 0
run_case sync-1KiB sync "$msgs" --count 1000000 --size 1024 --consumers 0
run_case consume-backlog async "round(r['consume_msgs_per_s'])" --topic backlog --producers 0 --consumers 1 --count 4000000
half=$(( $(median_of sync-100B) / 2 ))
run_case "sync-p99-us-at-$half-per-s" sync "r['ack_latency']['p99_us']" --count $((half * 3)) --consumers 0 --rate "$half"
echo "medians (case which median):"
for name in $(awk '{print $1}' "$out" | sort -u); do
  for which in old new; do
    printf '%s %s %s\n' "$name" "$which" \
      "$(awk -v n="$name" -v w="$which" '$1 == n && $2 == w {print $4}' "$out" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')"
  done
done
rm -f "$out"
