#!/usr/bin/env bash
# Well-behaved throughput under hostile clients (docs/RELIABILITY.md).
#
# Starts one broker (release build, sync flush, default limits) and runs
# `bida bench` (1 producer, 1 consumer, 100 B messages, batch 1,000) for
# BENCH_S seconds, alternating: alone, then beside one `bida attack` kind,
# REPS times per kind. The attacker runs at nice 19: on a small machine
# what it should cost the well-behaved client is the broker's work on its
# behalf, not the attacker's own CPU. Prints a markdown table of median
# msgs/s with the ratio to the median of the runs alone, and the largest
# rise of the broker's anonymous memory (RssAnon, sampled every 50 ms)
# over its value just before the attack.
#
#   scripts/hostile.sh            # REPS=3 BENCH_S=5 by default
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
BENCH_S=${BENCH_S:-5}
cargo build --release --quiet
BIDA=$PWD/target/release/bida
WORK=$(mktemp -d)
trap 'kill $BROKER_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT

"$BIDA" serve --data "$WORK/data" --listen 127.0.0.1:0 --admin-listen off >"$WORK/serve.out" 2>"$WORK/serve.err" &
BROKER_PID=$!
for _ in $(seq 100); do
  grep -q "listening on" "$WORK/serve.out" 2>/dev/null && break
  sleep 0.1
done
ADDR=$(sed -n 's/^bida: listening on //p' "$WORK/serve.out" | head -1)
[ -n "$ADDR" ] || { echo "the broker did not start" >&2; exit 1; }

rss_anon() { sed -n 's/^RssAnon:[[:space:]]*\([0-9]*\) kB/\1/p' /proc/$BROKER_PID/status; }
median() { sort -n | awk '{a[NR]=$1} END {printf "%.0f\n", (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0) ? a / b : 0 }'; }
field() { grep -o "\"$1\": *[0-9.e+]*" | head -1 | sed 's/.*: *//'; }

RUN=0
bench() { # -> "produce consume" msgs/s
  RUN=$((RUN + 1))
  local out
  out=$("$BIDA" bench --broker "$ADDR" --topic calm --group "g$RUN" --size 100 \
    --batch 1000 --consumers 1 --count 1000000000 --duration-s "$BENCH_S" --json 2>/dev/null)
  printf '%.0f %.0f\n' "$(field produce_msgs_per_s <<<"$out")" "$(field consume_msgs_per_s <<<"$out")"
}

# Data for the never-reading clients to fetch.
"$BIDA" bench --broker "$ADDR" --topic attack --size 1024 --count 200000 --consumers 0 >/dev/null 2>&1

declare -A ATTACK=(
  [slowloris]="--kind slowloris --connections 1000"
  [idle]="--kind idle --connections 1000"
  [no-read]="--kind no-read --connections 16 --topic attack"
  [huge]="--kind huge --connections 50 --send-bytes 8388608"
  [flood]="--kind flood --connections 64"
)
KINDS=${KINDS:-"slowloris idle no-read huge flood"}

: >"$WORK/alone"
for kind in $KINDS; do
  : >"$WORK/$kind"
  echo 0 >"$WORK/$kind.peak"
done
for rep in $(seq "$REPS"); do
  bench >>"$WORK/alone"
  for kind in $KINDS; do
    # shellcheck disable=SC2086
    base=$(rss_anon)
    nice -n 19 "$BIDA" attack --broker "$ADDR" ${ATTACK[$kind]} --duration-s $((BENCH_S + 3)) >"$WORK/$kind.attack.$rep" &
    ATTACK_PID=$!
    sleep 1
    peak=$(cat "$WORK/$kind.peak")
    ( while kill -0 $ATTACK_PID 2>/dev/null; do rss_anon; sleep 0.05; done ) >"$WORK/$kind.rss.$rep" &
    SAMPLER_PID=$!
    bench >>"$WORK/$kind"
    wait $ATTACK_PID
    wait $SAMPLER_PID
    now=$(( $(sort -n "$WORK/$kind.rss.$rep" | tail -1) - base ))
    if [ "$now" -gt "$peak" ]; then echo "$now" >"$WORK/$kind.peak"; fi
    bench >>"$WORK/alone"
  done
done

alone_p=$(cut -d' ' -f1 "$WORK/alone" | median)
alone_c=$(cut -d' ' -f2 "$WORK/alone" | median)
echo "bench: 1 producer + 1 consumer, 100 B, batch 1000, ${BENCH_S} s, sync flush; $REPS runs per row, medians"
echo
echo "| beside | produce msgs/s | ratio | consume msgs/s | ratio | broker RssAnon rise | what the attack saw (last run) |"
echo "|---|---|---|---|---|---|---|"
printf '| nothing | %s | 1.00 | %s | 1.00 | | |\n' "$alone_p" "$alone_c"
for kind in $KINDS; do
  p=$(cut -d' ' -f1 "$WORK/$kind" | median)
  c=$(cut -d' ' -f2 "$WORK/$kind" | median)
  peak=$(($(cat "$WORK/$kind.peak") / 1024))
  seen=$(sed 's/^bida attack [A-Za-z]*: //' "$WORK/$kind.attack.$REPS")
  printf '| %s | %s | %s | %s | %s | %s MiB | %s |\n' "$kind" "$p" \
    "$(ratio "$p" "$alone_p")" "$c" "$(ratio "$c" "$alone_c")" "$peak" "$seen"
done
