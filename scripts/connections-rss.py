#!/usr/bin/env python3
"""Opens N connections to a running `bida serve`, each saying HELLO, and
prints the broker's resident memory before and with them.

Usage: scripts/connections-rss.py PID [PORT] [N]
  PID   the broker's process id (e.g. `pgrep -f 'bida serve'`)
  PORT  default 7878; N default 1000
"""
import socket
import struct
import sys
import time


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit("no VmRSS")


def main():
    pid = int(sys.argv[1])
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 7878
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    # HELLO, version 1..1, client "x" (docs/PROTOCOL.md, "Example").
    body = bytes([1, 1]) + struct.pack("<H", 1) + b"x"
    frame = struct.pack("<IHBBHHQ", 16 + len(body), 0xB1DA, 1, 0x01, 0, 0, 1) + body
    before = rss_kb(pid)
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(frame)
        socks.append(s)
    for s in socks:
        if not s.recv(64):
            raise SystemExit("a connection was closed instead of answered")
    time.sleep(1)
    after = rss_kb(pid)
    print(f"RSS {before} kB idle, {after} kB with {n} connections: "
          f"{(after - before) / n:.1f} kB per connection")


if __name__ == "__main__":
    main()
