#!/usr/bin/env python3
"""confluent-kafka's producer as a throughput user sets it up: COUNT
messages of SIZE bytes to TOPIC, acks=all, linger.ms=20, batch.size 1 MiB,
10,000 messages per batch at most. Prints messages a second, from the first
produce() to the end of flush() (every message acknowledged).

  kafka-produce.py BOOTSTRAP TOPIC COUNT SIZE
"""
import sys
import time

from confluent_kafka import Producer

bootstrap, topic, count, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 20,
              "batch.size": 1 << 20, "batch.num.messages": 10000,
              "queue.buffering.max.messages": 2_000_000, "queue.buffering.max.kbytes": 4 << 20})
value = b"x" * size
failed = []
on_delivery = lambda err, msg: err and failed.append(err)
start = time.time()
for i in range(count):
    while True:
        try:
            p.produce(topic, value, on_delivery=on_delivery)
            break
        except BufferError:
            p.poll(0.01)
    if i % 10000 == 0:
        p.poll(0)
assert p.flush(300) == 0, "unflushed messages"
elapsed = time.time() - start
assert not failed, failed[:3]
print(f"{count / elapsed:.0f}")
