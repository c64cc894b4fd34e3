#!/usr/bin/env python3
"""Restart to serving: time from exec of `bida serve --data DIR` to its
"listening on" line, alternately after a clean stop (SIGTERM) and after
SIGKILL, N times each; prints the medians.

    python3 scripts/serve-restart.py DIR N [BIDA]
"""
import subprocess, time, signal, sys, statistics
data = sys.argv[1]; n = int(sys.argv[2])
BIDA = sys.argv[3] if len(sys.argv) > 3 else "target/release/bida"
res = {"clean": [], "kill": []}
def start():
    t0 = time.monotonic()
    p = subprocess.Popen([BIDA, "serve", "--data", data,
        "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    assert line.startswith("bida: listening on"), line
    return p, (time.monotonic() - t0) * 1000
p, _ = start()
kind = "clean"
for i in range(2 * n):
    kind = "clean" if i % 2 == 0 else "kill"
    if kind == "clean":
        p.send_signal(signal.SIGTERM)
    else:
        p.kill()
    p.wait()
    p, ms = start()
    res[kind].append(ms)
    print(kind, round(ms), flush=True)
p.send_signal(signal.SIGTERM); p.wait()
for k, v in res.items():
    print(k, "median", round(statistics.median(v)), "ms of", [round(x) for x in v])
