#!/usr/bin/env bash
# The Kafka listener against the native protocol, in one run, one broker
# (sync flush: every acknowledged message fdatasynced), one partition per
# topic, 100 B and 1 KiB messages, 1,000,000 each:
#   native produce  bida bench --producers 1 --consumers 0 --batch B --inflight 16
#   native consume  bida bench --producers 0 --consumers 1 (a group: fetch + ack)
#   kcat -P         1 M lines from a file (librdkafka defaults: linger.ms 5,
#                   batch.num.messages 10000, batch.size 1 MB, acks all)
#   kcat -C         reads them back (-e: exits at the end)
#   confluent       scripts/kafka-produce.py (linger.ms 20, batch.size 1 MiB)
# B is what librdkafka puts in one request at that size: 10,000 (100 B) and
# 1,000 (1 KiB, the 1 MB batch.size). Rounds alternate the order of the
# Kafka and native cases. Prints one line per case per round (messages/s).
# Needs kcat and .venv-kafka (scripts/kafka-clients.sh).
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
now() { date +%s.%N; }
rate() { echo "scale=0; $count / ($(now) - $1)" | bc; }
json() { python3 -c "import json,sys; print(round(json.load(sys.stdin)['$1']))"; }
topic() { "$bin" topics --broker 127.0.0.1:$port create "$1" --partitions 1 > /dev/null; }
for size in 100 1024; do
  head -c $((size - 1)) /dev/zero | tr '\0' x > "$work/line"; echo >> "$work/line"
  yes "$(cat "$work/line")" | head -n "$count" > "$work/lines-$size"
done
kafka() {
  local size=$1 r=$2 t
  topic "k$size-$r"; t=$(now)
  kcat -b 127.0.0.1:$kport -t "k$size-$r" -P -l "$work/lines-$size"
  echo "round $r size $size kcat-P $(rate "$t")"
  t=$(now)
  got=$(kcat -b 127.0.0.1:$kport -t "k$size-$r" -C -e -q -o beginning -f '\n' | wc -l)
  [ "$got" -eq "$count" ] || { echo "kcat -C read $got of $count" >&2; exit 1; }
  echo "round $r size $size kcat-C $(rate "$t")"
  topic "c$size-$r"
  echo "round $r size $size confluent-P $("$py" "$produce_py" 127.0.0.1:$kport "c$size-$r" "$count" "$size")"
}
native() {
  local size=$1 r=$2 batch=10000
  [ "$size" -gt 100 ] && batch=1000
  topic "n$size-$r"
  out=$("$bin" bench --broker 127.0.0.1:$port --topic "n$size-$r" --partitions 1 --producers 1 \
    --consumers 0 --count "$count" --size "$size" --batch "$batch" --inflight 16 --json)
  echo "round $r size $size native-P $(echo "$out" | json produce_msgs_per_s)"
  out=$("$bin" bench --broker 127.0.0.1:$port --topic "n$size-$r" --partitions 1 --producers 0 \
    --consumers 1 --count "$count" --size "$size" --json)
  echo "round $r size $size native-C $(echo "$out" | json consume_msgs_per_s)"
}
for r in $(seq "$rounds"); do
  for size in 100 1024; do
    if [ $((r % 2)) -eq 1 ]; then kafka "$size" "$r"; native "$size" "$r"
    else native "$size" "$r"; kafka "$size" "$r"; fi
  done
done
