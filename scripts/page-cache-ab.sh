#!/usr/bin/env bash
# A/B of dropping flushed pages behind the writer (the default) against
# keeping them (--keep-page-cache): RUNS alternating runs of each, every run
# appending RECORDS async 1 KiB records in batches of 1024 to a fresh
# directory. Prints wall seconds, CPU seconds and peak RSS per run
# (from /usr/bin/time), then the medians.
# Usage: scripts/page-cache-ab.sh [RUNS] [RECORDS] [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"; records="${2:-2000000}"; base="${3:-${TMPDIR:-/tmp}}"
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (Debian package 'time')" >&2; exit 1; }
cargo build --release --quiet
bin=target/release/bida
results="$(mktemp)"
for i in $(seq "$runs"); do
  for variant in drop keep; do
    dir="$(mktemp -d -p "$base" bida-pc.XXXXXX)"
    flag=""; [ "$variant" = keep ] && flag="--keep-page-cache"
    /usr/bin/time -f "$variant %e %U %S %M" -o "$results.one" \
      "$bin" append --data "$dir" --flush async --generate "$records" --size 1024 --batch 1024 $flag >/dev/null 2>&1
    cat "$results.one" | tee -a "$results"
    rm -rf "$dir"
  done
done
echo "variant  median_wall_s  median_cpu_s  median_peak_MiB"
median() { sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
for variant in drop keep; do
  rows="$(grep "^$variant " "$results")"
  wall="$(echo "$rows" | awk '{print $2}' | median)"
  cpu="$(echo "$rows" | awk '{print $3+$4}' | median)"
  peak="$(echo "$rows" | awk '{print int($5/1024)}' | median)"
  printf '%-8s %13s %13s %16s\n' "$variant" "$wall" "$cpu" "$peak"
done
rm -f "$results" "$results.one"
