#!/usr/bin/env bash
# Scale targets of one broker, on this machine's disk: a topic of 10,000
# partitions created (timed), one message produced to each, then restarts
# to serving after SIGKILL and after SIGTERM (timed until the port
# accepts), with threads, descriptors, memory and disk read from /proc and
# du. Runs ROUNDS times; prints a line per figure per round.
# Usage: scripts/partitions-scale.sh BIN [ROUNDS] [PARTITIONS]
set -uo pipefail
bin="$1"; rounds="${2:-3}"; n="${3:-10000}"; port=17986
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
start() {
  BIDA_LOG=warn "$bin" serve --admin-listen off --data "$dir" --listen 127.0.0.1:$port > /dev/null &
  broker=$!
  for _ in $(seq 2000); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && return; sleep 0.005; done
  echo "broker did not start" >&2; exit 1
}
facts() {
  echo "  threads $(awk '/^Threads:/ {print $2}' /proc/$broker/status)" \
       "descriptors $(ls /proc/$broker/fd | wc -l)" \
       "VmRSS $(awk '/^VmRSS:/ {print $2}' /proc/$broker/status) kB" \
       "RssAnon $(awk '/^RssAnon:/ {print $2}' /proc/$broker/status) kB" \
       "disk $(du -sk "$dir" | cut -f1) kB"
}
for round in $(seq "$rounds"); do
  dir=$(mktemp -d -p "${TMPDIR:-/tmp}" bida-scale.XXXXXX)
  start
  t=$(now); "$bin" topics --broker 127.0.0.1:$port create many --partitions "$n" > /dev/null
  echo "round $round: create $n partitions: $(since "$t") s"; facts
  "$bin" bench --broker 127.0.0.1:$port --topic many --partitions "$n" --producers 1 --consumers 0 \
    --count "$n" --batch 1 --inflight 64 > /dev/null
  echo "round $round: one message in each partition"; facts
  kill -KILL "$broker"; wait "$broker" 2>/dev/null
  t=$(now); start; echo "round $round: restart to serving after SIGKILL: $(since "$t") s"; facts
  kill -TERM "$broker"; wait "$broker"
  t=$(now); start; echo "round $round: restart to serving after SIGTERM: $(since "$t") s"; facts
  kill -TERM "$broker"; wait "$broker"
  rm -rf "$dir"
done
