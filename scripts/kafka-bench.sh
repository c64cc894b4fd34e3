#!/usr/bin/env bash
# The Kafka listener against the native protocol, in one run, one broker
# (sync flush: every acknowledged message fdatasynced), one partition per
# topic, 100 B and 1 KiB messages, COUNT (1,000,000) each:
#   native-P     bida bench --producers 1 --consumers 0 --batch B --inflight 16
#   native-C     bida bench --producers 0 --consumers 1 (a group: fetch + ack)
#   kcat-P       COUNT lines from a file (librdkafka defaults: linger.ms 5,
#                batch.num.messages 10000, batch.size 1 MB, acks all)
#   kcat-C       reads them back (-c COUNT: exits at the last one, not after
#                the end-of-log long poll of fetch.wait.max.ms)
#   confluent-P  scripts/kafka-produce.py (linger.ms 20, batch.size 1 MiB)
#   bench-kafka-P  bida bench --kafka: native-P's client, batches and window,
#                speaking Kafka (Produce v9, acks -1): the broker's two doors
#                with the same client
# B is what librdkafka puts in one request at that size: 10,000 (100 B) and
# 1,000 (1 KiB, the 1 MB batch.size). Rounds alternate the order of the
# Kafka and native cases. One line per case per round: messages a second,
# then the CPU seconds the broker and the client spent on it (user + system,
# from /proc/PID/stat and /usr/bin/time): which side is the bottleneck.
# Needs kcat, bc, /usr/bin/time and .venv-kafka (scripts/kafka-clients.sh).
# Usage: scripts/kafka-bench.sh BIN [ROUNDS] [COUNT]
set -euo pipefail
bin="$1"; rounds="${2:-3}"; count="${3:-1000000}"
py="$(dirname "$0")/../.venv-kafka/bin/python"
produce_py="$(dirname "$0")/kafka-produce.py"
work=$(mktemp -d -p "${TMPDIR:-/tmp}" bida-kafka-bench.XXXXXX)
trap 'kill $broker 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
port=$((20000 + RANDOM % 20000)); kport=$((port + 1))
BIDA_LOG=warn "$bin" serve --data "$work/data" --listen 127.0.0.1:$port --admin-listen off \
  --kafka-listen 127.0.0.1:$kport --auto-create-topics false > /dev/null &
broker=$!
for _ in $(seq 1000); do (echo > /dev/tcp/127.0.0.1/$kport) 2> /dev/null && break; sleep 0.01; done
tck=$(getconf CLK_TCK)
now() { date +%s.%N; }
ticks() { awk '{ print $14 + $15 }' /proc/$broker/stat; }
json() { python3 -c "import json,sys; print(round(json.load(sys.stdin)['$1']))"; }
topic() { "$bin" topics --broker 127.0.0.1:$port create "$1" --partitions 1 > /dev/null; }
# measure LABEL RATE-FROM(wall|stdout) CMD...: runs CMD, prints LABEL, the
# rate (COUNT / wall seconds, or what CMD printed), broker and client CPU.
measure() {
  local label=$1 from=$2; shift 2
  local t0 b0 out rate
  b0=$(ticks); t0=$(now)
  out=$(/usr/bin/time -f "client-cpu %U %S" -o "$work/time" "$@")
  if [ "$from" = wall ]; then rate=$(echo "scale=0; $count / ($(now) - $t0)" | bc)
  else rate=$out; fi
  local b1; b1=$(ticks)
  read -r _ u s < "$work/time"
  echo "$label $rate msgs/s broker-cpu $(echo "scale=2; ($b1 - $b0) / $tck" | bc) s client-cpu $(echo "$u + $s" | bc) s"
}
for size in 100 1024; do
  awk -v n="$count" -v s=$((size - 1)) \
    'BEGIN { l = sprintf("%*s", s, ""); gsub(/ /, "x", l); for (i = 0; i < n; i++) print l }' \
    > "$work/lines-$size"
done
kcat_consume() { kcat -b 127.0.0.1:$kport -t "$1" -C -c "$count" -q -o beginning -f '\n' > "$work/out"; }
native_json() {
  local key=$1; shift
  "$bin" bench --broker 127.0.0.1:$port --partitions 1 --count "$count" --json "$@" | json "$key"
}
kafka() {
  local size=$1 r=$2
  topic "k$size-$r"
  measure "round $r size $size kcat-P" wall kcat -b 127.0.0.1:$kport -t "k$size-$r" -P -l "$work/lines-$size"
  measure "round $r size $size kcat-C" wall bash -c 'kcat_consume "$1"' _ "k$size-$r"
  got=$(wc -l < "$work/out")
  [ "$got" -eq "$count" ] || { echo "kcat -C read $got of $count" >&2; exit 1; }
  local batch=10000
  [ "$size" -gt 100 ] && batch=1000
  topic "b$size-$r"
  measure "round $r size $size bench-kafka-P" stdout \
    bash -c 'native_json "$@"' _ produce_msgs_per_s --topic "b$size-$r" --kafka 127.0.0.1:$kport \
    --producers 1 --consumers 0 --size "$size" --batch "$batch" --inflight 16
  topic "c$size-$r"
  measure "round $r size $size confluent-P" stdout "$py" "$produce_py" 127.0.0.1:$kport "c$size-$r" "$count" "$size"
}
native() {
  local size=$1 r=$2 batch=10000
  [ "$size" -gt 100 ] && batch=1000
  topic "n$size-$r"
  measure "round $r size $size native-P" stdout \
    bash -c 'native_json "$@"' _ produce_msgs_per_s --topic "n$size-$r" \
    --producers 1 --consumers 0 --size "$size" --batch "$batch" --inflight 16
  measure "round $r size $size native-C" stdout \
    bash -c 'native_json "$@"' _ consume_msgs_per_s --topic "n$size-$r" \
    --producers 0 --consumers 1 --size "$size"
}
export -f kcat_consume native_json json
export kport port count work bin
for r in $(seq "$rounds"); do
  for size in 100 1024; do
    if [ $((r % 2)) -eq 1 ]; then kafka "$size" "$r"; native "$size" "$r"
    else native "$size" "$r"; kafka "$size" "$r"; fi
  done
done
