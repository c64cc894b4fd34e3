#!/usr/bin/env bash
# A/B of two `bida serve` binaries: the two alternate (old, new, old, ...),
# a fresh broker and data directory for every run, one client binary
# (CLIENT, default NEW) driving `bida bench --consumers 0`. Prints one line
# per run: flush size which run msgs/s.
# Usage: scripts/ab-serve.sh OLD_BIN NEW_BIN [RUNS] [CLIENT]
# Build OLD_BIN from another commit with, e.g.:
#   git worktree add /tmp/old <commit> && (cd /tmp/old && cargo build --release)
set -uo pipefail
old="$1"; new="$2"; runs="${3:-5}"; client="${4:-$new}"; port=17981
start() { # bin flush
  dir=$(mktemp -d -p "${TMPDIR:-/tmp}" bida-ab.XXXXXX)
  BIDA_LOG=warn "$1" serve --admin-listen off --data "$dir" --listen 127.0.0.1:$port --flush "$2" > /dev/null &
  broker=$!
  for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && return; sleep 0.1; done
  echo "broker did not start" >&2; exit 1
}
stop() { kill -TERM "$broker"; wait "$broker"; rm -rf "$dir"; }
for case in "async 100 4000000" "sync 100 4000000" "sync 1024 1000000"; do
  set -- $case
  for i in $(seq "$runs"); do
    for which in old new; do
      bin=$old; [ "$which" = new ] && bin=$new
      start "$bin" "$1"
      v=$("$client" bench --broker 127.0.0.1:$port --json --count "$3" --size "$2" --consumers 0 |
        python3 -c "import json,sys; print(round(json.load(sys.stdin)['produce_msgs_per_s']))")
      stop
      echo "$1 $2 $which $i $v"
    done
  done
done
