#!/usr/bin/env python3
"""Soak: a `bida serve` under produce and consume at a fixed rate for a
while, with retention keeping its disk bounded, sampling the broker's
memory (VmRSS, RssAnon, RssFile + RssShmem from /proc/PID/status), its
threads, its dedup memory (from /metrics) and its data directory's size every
few seconds. Fails (exit 1) if the broker logged a warning or an error or
a batch failed. Writes samples.csv, broker.log and, where matplotlib is installed
(`pip install matplotlib`), soak.png.

  scripts/soak.py --bin target/release/bida --minutes 30 --rate 625000 --out /tmp/soak

The load: `bida bench --partitions 4 --producers 2 --consumers 2` (100 B
messages, sync flush), each producer at --rate messages a second.
"""
import argparse
import csv
import json
import re
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
            elif key == "Threads":
                out[key] = int(value)
    return out


def disk_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def metric(admin, name):
    try:
        text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/bida")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=int, default=625_000, help="messages a second per producer")
    ap.add_argument("--retention-bytes", type=int, default=1 << 30, help="per partition")
    ap.add_argument("--every-s", type=float, default=5)
    ap.add_argument("--out", default="soak-out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    data = tempfile.mkdtemp(prefix="bida-soak.", dir=os.environ.get("TMPDIR", "/tmp"))
    port, admin_port = free_port(), free_port()
    admin = f"127.0.0.1:{admin_port}"
    env = dict(os.environ, BIDA_LOG="warn")
    broker_log = open(os.path.join(args.out, "broker.log"), "wb")
    broker = subprocess.Popen(
        [args.bin, "serve", "--data", data, "--listen", f"127.0.0.1:{port}", "--admin-listen", admin,
         "--retention-bytes", str(args.retention_bytes), "--retention-check-interval-ms", "2000"],
        env=env, stdout=subprocess.DEVNULL, stderr=broker_log)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    seconds = int(args.minutes * 60)
    load = subprocess.Popen(
        [args.bin, "bench", "--broker", f"127.0.0.1:{port}", "--topic", "soak", "--partitions", "4",
         "--producers", "2", "--consumers", "2", "--count", str(args.rate * seconds * 2),
         "--rate", str(args.rate), "--duration-s", str(seconds), "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    rows = []
    start = time.time()
    with open(os.path.join(args.out, "samples.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "vmrss", "rss_anon", "rss_file", "threads", "dedup_bytes", "disk_bytes"])
        while load.poll() is None:
            s = status(broker.pid)
            row = [round(time.time() - start, 1), s["VmRSS"], s["RssAnon"],
                   s["RssFile"] + s.get("RssShmem", 0), s["Threads"],
                   int(metric(admin, "bida_dedup_memory_bytes") or 0), disk_bytes(data)]
            w.writerow(row)
            f.flush()
            rows.append(row)
            time.sleep(args.every_s)
    report = load.stdout.read().decode()
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        f.write(report)
    broker.terminate()
    broker.wait()
    shutil.rmtree(data, ignore_errors=True)
    mb = lambda b: b / 1e6
    last = [r for r in rows if r[0] >= rows[-1][0] * 2 / 3]
    print(f"{len(rows)} samples over {rows[-1][0]:.0f} s")
    print(f"VmRSS max {mb(max(r[1] for r in rows)):.0f} MB; RssAnon max {mb(max(r[2] for r in rows)):.0f} MB, "
          f"last third {mb(min(r[2] for r in last)):.0f}-{mb(max(r[2] for r in last)):.0f} MB; "
          f"mapped file pages max {mb(max(r[3] for r in rows)):.0f} MB; threads max {max(r[4] for r in rows)}; "
          f"disk max {mb(max(r[6] for r in rows)):.0f} MB")
    print(report)
    broker_log.close()
    with open(os.path.join(args.out, "broker.log"), errors="replace") as f:
        logged = [re.sub(r"\x1b\[[0-9;]*m", "", l) for l in f.read().splitlines()]
    warnings = [l for l in logged if " WARN " in l or " ERROR " in l]
    print(f"broker warnings and errors: {len(warnings)} (broker.log)")
    for line in warnings[:10]:
        print("  " + line)
    failed = bool(warnings) or json.loads(report).get("failed_batches", 1) != 0
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install matplotlib)", file=sys.stderr)
        return failed
    t = [r[0] / 60 for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    ax1.plot(t, [mb(r[1]) for r in rows], label="VmRSS")
    ax1.plot(t, [mb(r[2]) for r in rows], label="RssAnon")
    ax1.plot(t, [mb(r[3]) for r in rows], label="mapped file pages (RssFile+RssShmem)")
    ax1.plot(t, [mb(r[5]) for r in rows], label="dedup windows (/metrics)", linestyle="--")
    ax1.set_ylabel("MB")
    ax1.set_title(f"bida serve: 2 producers x {args.rate:,} msgs/s, 2 consumers, 4 partitions, sync, 100 B")
    ax1.legend(loc="lower right", fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(t, [r[6] / 1e9 for r in rows], color="tab:gray", label="data directory (allocated)")
    ax2.set_ylabel("GB on disk")
    ax2.set_xlabel("minutes")
    ax2.legend(loc="lower right", fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "soak.png"), dpi=100)
    print(f"chart: {os.path.join(args.out, 'soak.png')}")
    return failed


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
