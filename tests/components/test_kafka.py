"""The Kafka that scripts/kafka starts does what the search pipeline will ask of it: a topic
of 12 partitions, keyed messages kept in order per key, a consumer group that resumes from
its committed offsets, and a stop that really ends the broker.

Clients: confluent-kafka, on librdkafka: the C client library, not the broker's own Java
one, so these checks do not share the broker's code.
"""

import time
from collections import defaultdict

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from conftest import KAFKA_CLUSTER_ID, assert_stops

PARTITIONS = 12
KEYS = [f"chat-{i}" for i in range(30)]
PER_KEY = 20


def bootstrap(kafka):
    return f"127.0.0.1:{kafka.port}"


@pytest.fixture
def topic(kafka, request):
    """A new topic of 12 partitions, named after the test: chat.events.TEST."""
    name = "chat.events." + request.node.name.removeprefix("test_")
    admin = AdminClient({"bootstrap.servers": bootstrap(kafka)})
    futures = admin.create_topics([NewTopic(name, num_partitions=PARTITIONS,
                                            replication_factor=1)])
    futures[name].result(30)
    return name


def consume(kafka, topic, group, want, deadline_s=60):
    """Messages read by a fresh member of `group` until `want` arrived (or the deadline),
    then a short extra poll (nothing more may come), then one commit of its positions;
    returns [(key, value, partition)]."""
    c = Consumer({"bootstrap.servers": bootstrap(kafka), "group.id": group,
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    got = []

    def take(m):
        if m is None:
            return
        if m.error():
            raise KafkaException(m.error())
        got.append((m.key().decode(), m.value().decode(), m.partition()))

    try:
        c.subscribe([topic])
        end = time.monotonic() + deadline_s
        while len(got) < want and time.monotonic() < end:
            take(c.poll(0.5))
        end = time.monotonic() + 2
        while time.monotonic() < end:
            take(c.poll(0.2))
        if got:
            c.commit(asynchronous=False)
    finally:
        c.close()
    return got


def produce(kafka, topic, pairs):
    """Send (key, value) pairs with acks=all and idempotence; returns the delivery errors."""
    p = Producer({"bootstrap.servers": bootstrap(kafka), "acks": "all",
                  "enable.idempotence": True, "linger.ms": 5})
    errors = []

    def on_delivery(err, msg):
        if err is not None:
            errors.append(err)

    for k, v in pairs:
        p.produce(topic, key=k.encode(), value=v.encode(), on_delivery=on_delivery)
        p.poll(0)
    left = p.flush(30)
    assert left == 0, f"{left} messages not delivered within 30 s"
    return errors


def test_the_broker_has_the_cluster_id_it_was_formatted_with(kafka):
    md = AdminClient({"bootstrap.servers": bootstrap(kafka)}).list_topics(timeout=10)
    assert md.cluster_id == KAFKA_CLUSTER_ID
    assert list(md.brokers) == [1]


def test_topic_with_twelve_partitions(kafka, topic):
    admin = AdminClient({"bootstrap.servers": bootstrap(kafka)})
    md = admin.list_topics(topic, timeout=10)
    assert md.topics[topic].error is None
    assert sorted(md.topics[topic].partitions) == list(range(PARTITIONS))
    # every partition has a leader: this one broker
    assert {p.leader for p in md.topics[topic].partitions.values()} == {1}


def test_keyed_messages_come_back_in_order_per_key(kafka, topic):
    # interleaved across keys, as many chats write at once
    pairs = [(k, f"{k}:{n}") for n in range(PER_KEY) for k in KEYS]
    assert produce(kafka, topic, pairs) == []

    got = consume(kafka, topic, "indexer", len(pairs))
    assert len(got) == len(pairs), f"consumed {len(got)} of {len(pairs)}"
    by_key = defaultdict(list)
    partitions_of = defaultdict(set)
    for key, value, partition in got:
        by_key[key].append(value)
        partitions_of[key].add(partition)
    for k in KEYS:
        assert by_key[k] == [f"{k}:{n}" for n in range(PER_KEY)], k
        # one key, one partition: the order is the partition's order
        assert len(partitions_of[k]) == 1, (k, partitions_of[k])
    # the keys spread over more than one partition
    assert len(set().union(*partitions_of.values())) > 1


def test_consumer_group_resumes_after_its_committed_offsets(kafka, topic):
    first = [(k, f"{k}:0") for k in KEYS]
    assert produce(kafka, topic, first) == []
    assert len(consume(kafka, topic, "indexer", len(first))) == len(first)

    # the group committed all of that: its next member sees only what is new
    assert produce(kafka, topic, [("chat-0", "chat-0:late")]) == []
    got = consume(kafka, topic, "indexer", 1, deadline_s=30)
    assert [(k, v) for k, v, _ in got] == [("chat-0", "chat-0:late")]

    # a group that never committed reads the topic from the start
    assert len(consume(kafka, topic, "replay", len(first) + 1)) == len(first) + 1

    # the committed offsets are the broker's, per partition, and add up to the whole topic
    c = Consumer({"bootstrap.servers": bootstrap(kafka), "group.id": "indexer"})
    try:
        committed = c.committed([TopicPartition(topic, p) for p in range(PARTITIONS)],
                                timeout=10)
    finally:
        c.close()
    assert sum(max(tp.offset, 0) for tp in committed) == len(first) + 1


def test_unknown_topic_is_not_created_on_use(kafka):
    admin = AdminClient({"bootstrap.servers": bootstrap(kafka)})
    p = Producer({"bootstrap.servers": bootstrap(kafka), "message.timeout.ms": 3000})
    errors = []
    p.produce("chat.evnets", value=b"typo", on_delivery=lambda err, msg: errors.append(err))
    p.flush(10)
    assert len(errors) == 1 and errors[0] is not None
    assert "chat.evnets" not in admin.list_topics(timeout=10).topics


def test_stop_ends_the_broker(kafka):
    assert_stops(kafka)
