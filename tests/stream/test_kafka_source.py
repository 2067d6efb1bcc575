"""chatd as a Kafka source (issue 14): every event acknowledged to a sender reaches the topic
at least once and in per-chat order, keyed by chat_id, its value the very bytes members
received; through a Kafka outage, through a kill -9, and bounded by --outbox-max-rows.

What is checked is what a consumer sees: an independent client (confluent-kafka) reads the
topic from the beginning. At-least-once allows duplicates; they are counted and printed,
and the order is checked on each event's first copy (a consumer keeps the newest version,
which the `version` header orders).
"""

import base64
import json
import os
import subprocess
import time
import uuid
from collections import defaultdict

import pytest
from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from conftest import CHATCTL, clean_env
from helpers import metric_value, parse_metrics


def brokers(kafka):
    return f"127.0.0.1:{kafka.port}"


def migrate(kafka, store, topic, *extra):
    return subprocess.run(
        [str(CHATCTL), "migrate", "--store", store, "--kafka", brokers(kafka), "--kafka-topic",
         topic, *extra],
        capture_output=True, text=True, timeout=120, env=clean_env())


def new_topic(kafka, tmp_path):
    topic = "chat.events.t" + uuid.uuid4().hex[:10]
    p = migrate(kafka, f"sqlite:{tmp_path}/migrate.db", topic)
    assert p.returncode == 0, p.stdout + p.stderr
    return topic


def start_chatd(chatd, kafka, topic, *extra, store=None):
    return chatd("--kafka", brokers(kafka), "--kafka-topic", topic, *extra, store=store)


class Record:
    def __init__(self, m):
        self.key = m.key().decode()
        self.value = m.value().decode()
        self.partition = m.partition()
        self.headers = {k: v.decode() for k, v in (m.headers() or [])}

    @property
    def version(self):
        return int(self.headers["version"])


def consume(kafka, topic, want, deadline_s=90):
    """Every record of the topic from the beginning, once `want` arrived (or the deadline
    passed), plus whatever comes in a short quiet period after."""
    c = Consumer({"bootstrap.servers": brokers(kafka), "group.id": "t-" + uuid.uuid4().hex,
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    got = []

    def take(m):
        if m is None:
            return
        if m.error():
            raise KafkaException(m.error())
        got.append(Record(m))

    try:
        c.subscribe([topic])
        end = time.monotonic() + deadline_s
        while len(got) < want and time.monotonic() < end:
            take(c.poll(0.5))
        end = time.monotonic() + 2
        while time.monotonic() < end:
            take(c.poll(0.2))
    finally:
        c.close()
    return got


def by_chat_first_copies(records):
    """{chat: [record, ...]} keeping each value's first copy; and the number of extra copies."""
    chats, seen, dups = defaultdict(list), set(), 0
    for r in records:
        if (r.key, r.value) in seen:
            dups += 1
            continue
        seen.add((r.key, r.value))
        chats[r.key].append(r)
    return chats, dups


def rebuild(records):
    """A chat as a consumer rebuilds it: per message_id the event of the highest version,
    as a history entry (no "event", a "deleted" flag), newest first."""
    latest = {}
    for r in records:
        mid = r.headers["message_id"]
        if mid not in latest or r.version > latest[mid][0]:
            latest[mid] = (r.version, json.loads(r.value))
    out = []
    for _, ev in latest.values():
        entry = {k: v for k, v in ev.items() if k != "event"}
        entry["deleted"] = ev["event"] == "message:delete"
        out.append(entry)
    return sorted(out, key=lambda e: int(e["message_id"]), reverse=True)


def metrics(server):
    return parse_metrics(server.metrics_text())


def wait_metric(server, name, pred, timeout=60):
    end = time.monotonic() + timeout
    while True:
        v = metric_value(metrics(server), name)
        if pred(v):
            return v
        if time.monotonic() > end:
            raise AssertionError(f"{name} is {v} after {timeout}s")
        time.sleep(0.2)


def raw_events(client, n, timeout=10):
    """The next n frames a member receives, as the exact text of each."""
    out = []
    for _ in range(n):
        out.append(client.ws.recv(timeout=timeout))
    return out


def ack(client, pred, timeout=10):
    """The sender's acknowledgement matching pred; an error event instead fails the test."""
    def check(ev):
        if ev.get("event") == "error":
            raise AssertionError(f"error instead of an ack: {ev}")
        return pred(ev)

    return client.wait_for(check, timeout=timeout)


def test_events_reach_the_topic_as_members_receive_them(kafka, store, chatd, tmp_path):
    topic = new_topic(kafka, tmp_path)
    server = start_chatd(chatd, kafka, topic, store=store())
    chats = ["room-a", "room-b", "room-c"]
    alice = {c: server.client(c, "alice") for c in chats}
    bob = {c: server.client(c, "bob") for c in chats}
    ids = defaultdict(list)
    for i in range(5):
        for c in chats:
            ids[c].append(alice[c].say(f"{c} hello {i} café")["message_id"])
    for c in chats:
        alice[c].send({"event": "message:edit", "message_id": ids[c][1], "message": f"{c} edited"})
        ack(alice[c], lambda ev: ev.get("event") == "message:edit")
        alice[c].send({"event": "message:delete", "message_id": ids[c][3]})
        ack(alice[c], lambda ev: ev.get("event") == "message:delete")
    # what a member received, byte for byte: 5 messages, an edit and a delete per chat
    seen = {c: raw_events(bob[c], 7) for c in chats}

    records = consume(kafka, topic, want=7 * len(chats))
    got, dups = by_chat_first_copies(records)
    print(f"records={len(records)} duplicates={dups}")
    assert sorted(got) == sorted(chats)
    for c in chats:
        assert [r.value for r in got[c]] == seen[c], c
        assert len({r.partition for r in got[c]}) == 1, "one chat, one partition"
        versions = [r.version for r in got[c]]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
        assert [r.headers["message_id"] for r in got[c]] == \
            [json.loads(v)["message_id"] for v in seen[c]]
        kinds = [json.loads(r.value)["event"] for r in got[c]]
        assert kinds == ["message:message"] * 5 + ["message:edit", "message:delete"]
    # any consumer can rebuild each chat from the topic alone: the newest version of each
    # message is exactly what the REST history says
    for c in chats:
        assert rebuild(got[c]) == server.all_history(c), c
    m = metrics(server)
    assert metric_value(m, "chat_kafka_produced_total") >= 7 * len(chats)
    wait_metric(server, "chat_outbox_depth", lambda v: v == 0)


def test_kafka_down_then_up_every_acknowledged_event_arrives_in_order(kafka, store, chatd,
                                                                     tmp_path):
    topic = new_topic(kafka, tmp_path)
    server = start_chatd(chatd, kafka, topic, store=store())
    chats = ["down-a", "down-b", "down-c"]
    alice = {c: server.client(c, "alice") for c in chats}
    acked = defaultdict(list)  # chat -> the acknowledged events, in order
    # first one event through a running Kafka, so the outage hits a connected producer
    acked["down-a"].append(alice["down-a"].say("before the outage"))
    wait_metric(server, "chat_kafka_produced_total", lambda v: v >= 1)
    wait_metric(server, "chat_outbox_depth", lambda v: v == 0)

    assert kafka.stop().returncode == 0
    try:
        for i in range(20):
            for c in chats:
                acked[c].append(alice[c].say(f"{c} while down {i}"))
        for c in chats:
            mid = acked[c][0]["message_id"]
            alice[c].send({"event": "message:edit", "message_id": mid, "message": "edited while down"})
            acked[c].append(ack(alice[c], lambda ev: ev.get("event") == "message:edit"))
        n_down = 21 * len(chats)
        # the outbox holds every one of them, and nothing was lost in it
        wait_metric(server, "chat_outbox_depth", lambda v: v == n_down)
        m = metrics(server)
        assert metric_value(m, "chat_kafka_produced_total") == 1
        wait_metric(server, "chat_outbox_oldest_age_seconds", lambda v: v > 0)
    finally:
        kafka.start()

    total = sum(len(v) for v in acked.values())
    records = consume(kafka, topic, want=total)
    got, dups = by_chat_first_copies(records)
    print(f"acknowledged={total} records={len(records)} duplicates={dups}")
    for c in chats:
        want = [(ev["event"], ev["message_id"], ev.get("message")) for ev in acked[c]]
        have = [(json.loads(r.value)["event"], json.loads(r.value)["message_id"],
                 json.loads(r.value).get("message")) for r in got[c]]
        assert have == want, c
    # and the outbox drains
    wait_metric(server, "chat_outbox_depth", lambda v: v == 0)
    assert metric_value(metrics(server), "chat_kafka_produced_total") >= total


def test_kill9_while_kafka_down_and_a_full_outbox(kafka, store, chatd, tmp_path):
    topic = new_topic(kafka, tmp_path)
    victim = start_chatd(chatd, kafka, topic, store=store())
    bounded = start_chatd(chatd, kafka, topic, "--outbox-max-rows", "3", store=store())
    assert kafka.stop().returncode == 0
    try:
        a = victim.client("kill9-chat", "alice")
        acked = [a.say(f"acknowledged then killed {i}") for i in range(25)]
        victim.kill9()  # right after the last acknowledgement

        # bounded: past --outbox-max-rows a send is refused, clearly, and nothing is stored
        b = bounded.client("bounded-chat", "carol")
        kept = [b.say(f"fits {i}") for i in range(3)]
        b.send({"event": "message:message", "message": "one too many", "client_id": "c-over"})
        err = b.wait_for(lambda ev: ev.get("event") == "error")
        assert err["code"] == "unavailable" and err.get("client_id") == "c-over", err
        r = bounded.post("/api/chats/bounded-chat/messages", user="carol",
                         json={"message": "over REST"})
        assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
        m = metrics(bounded)
        assert metric_value(m, "chat_outbox_refused_total") == 2
        assert metric_value(m, "chat_outbox_depth") == 3
        assert metric_value(m, "chat_store_errors_total") == 0  # a refusal, not a failure
        hist = [x["message"] for x in bounded.all_history("bounded-chat")]
        assert "one too many" not in hist and "over REST" not in hist
    finally:
        kafka.start()

    victim.start()  # same store: the outbox the killed process left
    records = consume(kafka, topic, want=len(acked) + len(kept))
    got, dups = by_chat_first_copies(records)
    print(f"acknowledged={len(acked) + len(kept)} records={len(records)} duplicates={dups}")
    assert [json.loads(r.value)["message_id"] for r in got["kill9-chat"]] == \
        [ev["message_id"] for ev in acked]
    assert [json.loads(r.value)["message"] for r in got["bounded-chat"]] == \
        [ev["message"] for ev in kept]
    # once Kafka took them, the bounded node accepts sends again
    wait_metric(bounded, "chat_outbox_depth", lambda v: v == 0)
    b.say("after the catch-up")
    wait_metric(victim, "chat_outbox_depth", lambda v: v == 0)


def test_migrate_creates_the_topic_with_12_partitions(kafka, tmp_path):
    topic = "chat.events.m" + uuid.uuid4().hex[:10]
    store = f"sqlite:{tmp_path}/m.db"
    p = migrate(kafka, store, topic)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"kafka topic created: {topic} (12 partitions, replication 1)" in p.stdout
    md = AdminClient({"bootstrap.servers": brokers(kafka)}).list_topics(topic, timeout=30)
    assert len(md.topics[topic].partitions) == 12
    # idempotent
    p = migrate(kafka, store, topic)
    assert p.returncode == 0 and f"kafka topic exists: {topic}" in p.stdout, p.stdout + p.stderr
    # a replication the cluster cannot give is an error that says so, not a half-made topic
    other = topic + ".r3"
    p = migrate(kafka, store, other, "--kafka-replication", "3", "--kafka-partitions", "4")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "replication" in p.stderr.lower(), p.stderr
    md = AdminClient({"bootstrap.servers": brokers(kafka)}).list_topics(timeout=30)
    assert other not in md.topics
    # bad numbers are usage errors
    p = migrate(kafka, store, other, "--kafka-partitions", "0")
    assert p.returncode == 2 and "kafka-partitions" in p.stderr


def set_topic_config(kafka, topic, **cfg):
    admin = AdminClient({"bootstrap.servers": brokers(kafka)})
    entries = [ConfigEntry(k.replace("_", "."), str(v),
                           incremental_operation=AlterConfigOpType.SET) for k, v in cfg.items()]
    res = ConfigResource("topic", topic, incremental_configs=entries)
    for f in admin.incremental_alter_configs([res]).values():
        f.result(30)


def test_a_record_kafka_refuses_blocks_until_fixed_and_nothing_is_skipped(kafka, chatd, tmp_path):
    """A record the topic refuses for good (here: larger than its max.message.bytes) is
    counted, produced again and again, and holds back what follows it; once the operator
    raises the limit, it and everything after it arrive, in order."""
    topic = new_topic(kafka, tmp_path)
    set_topic_config(kafka, topic, max_message_bytes=1500)
    server = start_chatd(chatd, kafka, topic)
    alice = server.client("poison", "alice")
    acked = [alice.say("small before")]
    wait_metric(server, "chat_kafka_produced_total", lambda v: v >= 1)
    # random text: the relay compresses (lz4), and 3000 x's would shrink below the limit
    acked.append(alice.say(base64.b64encode(os.urandom(2400)).decode()))
    acked.append(alice.say("small after"))
    wait_metric(server, "chat_kafka_produce_errors_total", lambda v: v >= 1)
    wait_metric(server, "chat_kafka_resends_total", lambda v: v >= 2)
    assert metric_value(metrics(server), "chat_outbox_depth") >= 2
    assert "kafka_delivery_failed" in server.log

    set_topic_config(kafka, topic, max_message_bytes=1048588)
    records = consume(kafka, topic, want=3)
    got, dups = by_chat_first_copies(records)
    print(f"acknowledged=3 records={len(records)} duplicates={dups}")
    assert [json.loads(r.value)["message_id"] for r in got["poison"]] == \
        [ev["message_id"] for ev in acked]
    wait_metric(server, "chat_outbox_depth", lambda v: v == 0)


def test_two_nodes_sharing_one_store_each_relay_every_event(kafka, chatd, tmp_path):
    """Two nodes on one SQLite file: each relays the shared outbox. A node gets its own
    commits' events in memory; the other's come between them as gaps in the seqs, which it
    reads from the outbox. Every acknowledged event reaches the topic, in order, however the
    two nodes' relays and deletes interleave."""
    topic = new_topic(kafka, tmp_path)
    store = f"sqlite:{tmp_path}/shared.db"
    a = start_chatd(chatd, kafka, topic, "--node-id", "1", store=store)
    b = start_chatd(chatd, kafka, topic, "--node-id", "2", store=store)
    alice, bob = a.client("shared", "alice"), b.client("shared", "bob")
    acked = []
    for i in range(15):
        acked.append(alice.say(f"from node a {i}"))
        acked.append(bob.say(f"from node b {i}"))
    records = consume(kafka, topic, want=len(acked))
    got, dups = by_chat_first_copies(records)
    print(f"acknowledged={len(acked)} records={len(records)} duplicates={dups}")
    assert [json.loads(r.value)["message_id"] for r in got["shared"]] == \
        [ev["message_id"] for ev in acked]
    for node in (a, b):
        wait_metric(node, "chat_outbox_depth", lambda v: v == 0)
    # each read the other's events back from the outbox (or found them relayed already)
    m = [metrics(n) for n in (a, b)]
    print("read back: a", metric_value(m[0], "chat_outbox_read_total"),
          "b", metric_value(m[1], "chat_outbox_read_total"))


def acquired_shards(server):
    return server.log.count("outbox_shard_acquired")


@pytest.mark.parametrize("store", ["cassandra"], indirect=True)
def test_two_nodes_on_one_keyspace_a_killed_relay_s_shards_move(kafka, store, chatd, tmp_path):
    """Two chatd on one Cassandra keyspace; the one relaying every shard (it came first) is
    killed while Kafka is down, right after acknowledging: the other takes the shards over
    once their leases run out, and every acknowledged event of both reaches the topic, in
    per-chat order."""
    url = store()
    topic = new_topic(kafka, tmp_path)
    first = start_chatd(chatd, kafka, topic, "--node-id", "1", store=url)
    end = time.monotonic() + 30
    while acquired_shards(first) < 16 and time.monotonic() < end:
        time.sleep(0.1)
    assert acquired_shards(first) == 16, first.log
    second = start_chatd(chatd, kafka, topic, "--node-id", "2", store=url)
    chats = {"lease-a": first, "lease-b": first, "lease-c": second, "lease-d": second}
    clients = {c: node.client(c, "alice") for c, node in chats.items()}
    acked = defaultdict(list)
    assert kafka.stop().returncode == 0
    try:
        for i in range(5):
            for c, cl in clients.items():
                acked[c].append(cl.say(f"{c} {i}"))
        first.kill9()
        assert acquired_shards(second) == 0  # the first one still held them all
    finally:
        kafka.start()
    total = sum(len(v) for v in acked.values())
    records = consume(kafka, topic, want=total)
    got, dups = by_chat_first_copies(records)
    print(f"acknowledged={total} records={len(records)} duplicates={dups}")
    for c in chats:
        assert [json.loads(r.value)["message_id"] for r in got[c]] == \
            [ev["message_id"] for ev in acked[c]], c
    assert acquired_shards(second) == 16
    wait_metric(second, "chat_outbox_depth", lambda v: v == 0)


def lose_outbox_rows(url):
    """Every outbox row of the keyspace behind a cassandra:// store URL removed, as if the
    relay had never been able to see them."""
    import cassandra_support

    cql = cassandra_support.MiniCQL(int(url.split(":")[2].split("/")[0]))
    cql.query(f"TRUNCATE {url.rsplit('/', 1)[1]}.outbox", consistency=0x0005)  # ALL
    cql.close()


@pytest.mark.parametrize("store", ["cassandra"], indirect=True)
def test_a_retry_answered_with_the_stored_message_reaches_the_topic(kafka, store, chatd,
                                                                      tmp_path):
    """On Cassandra a send whose write timed out was reported failed, yet its batch can still
    land (the batch log replays it) after the relay's read horizon passed its outbox row. The
    client retries with the same client_id and is acknowledged with the stored message: that
    acknowledgement must reach the topic too. The late row is made by hand: the first
    attempt's outbox row is removed before the relay could read it (Kafka is down, and the
    relay reads rows only 5 s after they were written)."""
    topic = new_topic(kafka, tmp_path)
    url = store()
    server = start_chatd(chatd, kafka, topic, store=url)
    assert kafka.stop().returncode == 0
    try:
        first = server.client("retry-chat", "alice").say("sent, then retried", client_id="c-r1")
        lose_outbox_rows(url)
        again = server.client("retry-chat", "alice").say("sent, then retried", client_id="c-r1")
        assert again["message_id"] == first["message_id"]  # the stored one, not a new message
    finally:
        kafka.start()
    marker = server.client("retry-chat", "bob").say("after the retry")
    records = consume(kafka, topic, want=2, deadline_s=40)
    got, _ = by_chat_first_copies(records)
    ids = [json.loads(r.value)["message_id"] for r in got.get("retry-chat", [])]
    assert first["message_id"] in ids, f"the acknowledged retry never reached the topic: {ids}"
    assert rebuild(got["retry-chat"]) == server.all_history("retry-chat")
    assert marker["message_id"] in ids


@pytest.mark.parametrize("store", ["cassandra"], indirect=True)
def test_a_delete_retried_after_its_event_was_lost_reaches_the_topic(kafka, store, chatd,
                                                                      tmp_path):
    """On Cassandra a delete is a lightweight transaction and its outbox row a write after it:
    if chatd dies between the two, the message is deleted and the topic never hears of it (a
    search engine fed from the topic would keep finding it). The author's client, never
    acknowledged, deletes again: still not_found, as on SQLite, but the tombstone now reaches
    the topic. The lost row is made by hand (removed while Kafka is down)."""
    topic = new_topic(kafka, tmp_path)
    url = store()
    server = start_chatd(chatd, kafka, topic, store=url)
    assert kafka.stop().returncode == 0
    try:
        alice = server.client("undelete-chat", "alice")
        m = alice.say("secret, then deleted")
        alice.send({"event": "message:delete", "message_id": m["message_id"]})
        ack(alice, lambda ev: ev.get("event") == "message:delete")
        lose_outbox_rows(url)
        alice.send({"event": "message:delete", "message_id": m["message_id"]})
        err = alice.wait_for(lambda ev: ev.get("event") == "error")
        assert err["code"] == "not_found", err
    finally:
        kafka.start()
    marker = alice.say("after the second delete")
    records = consume(kafka, topic, want=2, deadline_s=40)
    events = [json.loads(r.value) for r in records if r.key == "undelete-chat"]
    assert {"event": "message:delete", "message_id": m["message_id"]}.items() <= \
        next((e for e in events if e["event"] == "message:delete"), {}).items(), events
    assert marker["message_id"] in [e["message_id"] for e in events]
