"""confluent-kafka (librdkafka) against bida's Kafka listener: an idempotent
producer (enable.idempotence=true) sending through BOOTSTRAP (a proxy that
drops some produce responses, so librdkafka retries; the broker advertises
it, so every request goes through it), then a read-back bootstrapped at
DIRECT (the proxy forwards fetches untouched): every message stored exactly once,
in order per partition.
Then idempotent batches compressed with lz4 and zstd read back intact.

  confluent_idempotent.py BOOTSTRAP DIRECT TOPIC COUNT
"""
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def read_all(direct, topic, partitions, expect):
    c = Consumer({"bootstrap.servers": direct, "group.id": f"check-{time.time()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out = {}
    deadline = time.time() + 60
    n = 0
    while n < expect:
        assert time.time() < deadline, f"read {n} of {expect}"
        m = c.poll(0.5)
        if m is None:
            continue
        assert m.error() is None, m.error()
        out.setdefault(m.partition(), []).append((m.offset(), m.key(), m.value()))
        n += 1
    # Nothing more: exactly once.
    extra = c.consume(num_messages=100, timeout=2)
    assert not [m for m in extra if m.error() is None], "more messages than were sent"
    c.close()
    return out


def main():
    bootstrap, direct, topic, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    admin = AdminClient({"bootstrap.servers": direct})
    for t, f in admin.create_topics([NewTopic(topic, 3, 1), NewTopic(topic + "-lz4", 1, 1),
                                     NewTopic(topic + "-zstd", 1, 1)]).items():
        f.result(30)
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                  "linger.ms": 5, "message.timeout.ms": 120000, "request.timeout.ms": 2000,
                  "retry.backoff.ms": 50})
    errors = []
    for i in range(count):
        p.produce(topic, key=f"k{i % 97}".encode(), value=f"{i}".encode(),
                  on_delivery=lambda err, msg: err and errors.append(err))
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(120) == 0, "unflushed messages"
    assert not errors, errors[:3]
    got = read_all(direct, topic, 3, count)
    values = [v for part in got.values() for (_, _, v) in part]
    assert len(values) == count and len(set(values)) == count, (len(values), len(set(values)))
    for part, msgs in got.items():
        offsets = [o for (o, _, _) in msgs]
        assert offsets == list(range(len(msgs))), f"partition {part}: offsets not contiguous"
        # Per key (one partition each), values in the order sent.
        by_key = {}
        for (_, k, v) in msgs:
            by_key.setdefault(k, []).append(int(v))
        for k, vs in by_key.items():
            assert vs == sorted(vs), f"partition {part} key {k}: out of order"
    print(f"idempotent: {count} messages stored exactly once, in order")
    for codec in ("lz4", "zstd"):
        # The broker advertises the proxy, so these batches cross it too:
        # idempotent as well, or a retried batch would be stored twice.
        cp = Producer({"bootstrap.servers": direct, "compression.type": codec, "linger.ms": 20,
                       "batch.num.messages": 500, "enable.idempotence": True,
                       "request.timeout.ms": 2000, "retry.backoff.ms": 50})
        for i in range(2000):
            cp.produce(f"{topic}-{codec}", value=(f"{codec}-{i}-" + "x" * 200).encode())
        assert cp.flush(60) == 0
        back = read_all(direct, f"{topic}-{codec}", 1, 2000)[0]
        assert [v for (_, _, v) in back] == [(f"{codec}-{i}-" + "x" * 200).encode() for i in range(2000)]
        print(f"{codec}: 2000 messages read back intact")


if __name__ == "__main__":
    main()
