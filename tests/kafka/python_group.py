"""kafka-python against bida's Kafka listener: a producer with acks=all, then
a consumer group of two consumers on a topic of four partitions that
rebalances when one leaves; together they get every message; the offsets
they committed survive a broker restart (checked by the caller, which
restarts the broker and runs `resume`).

  python_group.py produce BOOTSTRAP TOPIC COUNT
  python_group.py consume BOOTSTRAP TOPIC GROUP COUNT
  python_group.py resume BOOTSTRAP TOPIC GROUP EXPECT_MORE
"""
import sys
import threading
import time

from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import CommitFailedError


def produce(bootstrap, topic, count):
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    futures = [producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode()) for i in range(count)]
    for f in futures:
        f.get(timeout=30)
    producer.flush()
    producer.close()
    print(f"produced {count}")


def consumer(bootstrap, topic, group):
    return KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
        max_poll_records=200,
    )


def consume(bootstrap, topic, group, count):
    seen = set()
    lock = threading.Lock()
    a, b = consumer(bootstrap, topic, group), consumer(bootstrap, topic, group)
    stop_b = threading.Event()
    assigned_both = threading.Event()

    def run(c, stop, name):
        while not stop.is_set():
            batch = c.poll(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    with lock:
                        seen.add(r.value)
            if batch:
                try:
                    c.commit()
                except CommitFailedError:
                    # A rebalance between join and sync: the next poll
                    # rejoins, and these records come again (seen is a set).
                    pass
            if a.assignment() and b.assignment():
                assigned_both.set()

    stop_a = threading.Event()
    ta = threading.Thread(target=run, args=(a, stop_a, "a"), daemon=True)
    tb = threading.Thread(target=run, args=(b, stop_b, "b"), daemon=True)
    ta.start()
    tb.start()
    deadline = time.time() + 60
    while not assigned_both.is_set():
        assert time.time() < deadline, "the two consumers never shared the partitions"
        time.sleep(0.05)
    parts_a, parts_b = set(a.assignment()), set(b.assignment())
    assert parts_a and parts_b and not (parts_a & parts_b), (parts_a, parts_b)
    assert len(parts_a | parts_b) == 4, (parts_a, parts_b)
    # Half way, b leaves: a gets all four partitions.
    while True:
        with lock:
            if len(seen) >= count // 2:
                break
        assert time.time() < deadline, f"only {len(seen)} messages"
        time.sleep(0.05)
    stop_b.set()
    tb.join()
    b.close()
    while len(a.assignment()) != 4:
        assert time.time() < deadline, f"a holds {a.assignment()} after b left"
        time.sleep(0.05)
    while True:
        with lock:
            if len(seen) >= count:
                break
        assert time.time() < deadline, f"only {len(seen)} of {count}"
        time.sleep(0.05)
    stop_a.set()
    ta.join()
    a.close()
    expected = {f"v{i}".encode() for i in range(count)}
    assert seen == expected, f"missing {len(expected - seen)}"
    print(f"consumed {len(seen)} with a rebalance")


def resume(bootstrap, topic, group, more):
    """After a restart: the group resumes at its committed offsets, so it
    gets exactly the messages produced since."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for i in range(more):
        producer.send(topic, value=f"after-{i}".encode()).get(timeout=30)
    producer.close()
    c = consumer(bootstrap, topic, group)
    got = []
    deadline = time.time() + 60
    while len(got) < more:
        assert time.time() < deadline, f"got {got}"
        for records in c.poll(timeout_ms=500).values():
            got.extend(r.value for r in records)
    time.sleep(1)
    for records in c.poll(timeout_ms=500).values():
        got.extend(r.value for r in records)
    c.close()
    assert sorted(got) == sorted(f"after-{i}".encode() for i in range(more)), got
    print(f"resumed at the committed offsets: {len(got)} new messages")


if __name__ == "__main__":
    cmd, bootstrap, topic = sys.argv[1:4]
    if cmd == "produce":
        produce(bootstrap, topic, int(sys.argv[4]))
    elif cmd == "consume":
        consume(bootstrap, topic, sys.argv[4], int(sys.argv[5]))
    elif cmd == "resume":
        resume(bootstrap, topic, sys.argv[4], int(sys.argv[5]))
