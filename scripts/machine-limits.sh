#!/usr/bin/env bash
# Measures the machine's own limits, so every benchmark figure can be stated
# as a fraction of them: sequential write bandwidth (buffered writes of 1 MiB
# + fdatasync, and dd with conv=fdatasync) and memcpy bandwidth.
# Usage: scripts/machine-limits.sh [DIR]   (DIR: where to write; default /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-${TMPDIR:-/tmp}}"
echo "== dd: 1 GiB sequential write + fdatasync into $dir"
f="$(mktemp -p "$dir" bida-dd.XXXXXX)"
dd if=/dev/zero of="$f" bs=1M count=1024 conv=fdatasync 2>&1 | tail -1
rm -f "$f"
echo "== criterion: memcpy and write+fdatasync (median in the middle of each [low median high])"
BIDA_BENCH_DIR="$dir" cargo bench --bench machine 2>/dev/null | grep -E "^machine/|thrpt:"
