"""The search pipeline end to end (issue 14): chatd stores and produces every change to
Kafka, chat-indexer writes it into OpenSearch, chatd answers searches from there.

What is checked is what a user and an operator see: search answers over REST (the same
shape as the FTS5 backend's), the documents in the index counted by id against every
acknowledged event, the dead-letter topic, the indexer's /metrics. Outages are real: Kafka
and OpenSearch stopped and started by their scripts, the indexer killed with SIGKILL.
"""

import json
import time
import uuid

from confluent_kafka import Consumer, Producer

from conftest import wait_until


def send_many(client, texts, timeout=30):
    """Send every text without waiting, then collect the acknowledgements (in any order)."""
    want = {}
    for t in texts:
        cid = "c-" + uuid.uuid4().hex
        want[cid] = t
        client.send({"event": "message:message", "message": t, "client_id": cid})
    acks = {}
    end = time.monotonic() + timeout
    while len(acks) < len(want):
        ev = client.recv(timeout=max(0.1, end - time.monotonic()))
        assert ev.get("event") != "error", ev
        if ev.get("event") == "message:message" and ev.get("client_id") in want:
            acks[ev["client_id"]] = ev
    return list(acks.values())


def edit(client, mid, text):
    client.send({"event": "message:edit", "message_id": mid, "message": text})
    return client.wait_for(lambda ev: ev.get("event") == "message:edit" and ev["message_id"] == mid)


def delete(client, mid):
    client.send({"event": "message:delete", "message_id": mid})
    return client.wait_for(lambda ev: ev.get("event") == "message:delete" and ev["message_id"] == mid)


def search(server, chat, q, user="reader", claim=None, **params):
    headers = server.auth(user, chats=claim)
    return server.session.get(f"{server.base_url}/api/chats/{chat}/search",
                              params={"q": q, **params}, headers=headers, timeout=30)


def search_all(server, q, user="reader", claim=None, **params):
    headers = server.auth(user, chats=claim)
    return server.session.get(f"{server.base_url}/api/search", params={"q": q, **params},
                              headers=headers, timeout=30)


def found(server, chat, q, **params):
    r = search(server, chat, q, **params)
    assert r.status_code == 200, r.text
    return r.json()


def ids_of(answer):
    return [m["message_id"] for m in answer["messages"]]


def index_matches_history(engine, server, chats):
    """The index holds exactly one document per message of the REST history, each in its
    current state: text as it is now, a deleted one a tombstone without text."""
    docs = engine.docs()
    want = {}
    for c in chats:
        for m in server.all_history(c):
            want[m["message_id"]] = m
    if set(docs) != set(want):
        return False
    for mid, m in want.items():
        src = docs[mid][1]
        if src["chat_id"] != m["chat_id"] or src["user_from"] != m["user_from"]:
            return False
        if m["deleted"]:
            if not src["deleted"] or "text" in src:
                return False
        elif src["deleted"] or src.get("text") != m["message"]:
            return False
    return True


def test_sends_edits_deletes_become_searchable(pipeline):
    server = pipeline.chatd()
    ix = pipeline.indexer()
    t0 = time.monotonic()
    alice = server.client("room-a", "alice")
    bob = server.client("room-b", "bob")
    a = send_many(alice, ["On se voit au café ?", "hello world", "secret plans <b>here</b>",
                          "the red fox jumps", "red apples, not a fox"])
    b = send_many(bob, ["café au lait in room b"])
    by_text = {ev["message"]: ev["message_id"] for ev in a}
    edit(alice, by_text["hello world"], "bonjour le monde")
    delete(alice, by_text["secret plans <b>here</b>"])
    wait_until(lambda: index_matches_history(pipeline.engine, server, ["room-a", "room-b"]),
               what="the index matching the history")
    print(f"indexed in {time.monotonic() - t0:.1f}s")

    # folding: "cafe" finds "café"; the highlight is HTML-escaped text with <em>
    ans = found(server, "room-a", "cafe")
    assert ids_of(ans) == [by_text["On se voit au café ?"]]
    assert ans["messages"][0]["highlight"] == "On se voit au <em>café</em> ?"
    assert set(ans) == {"chat_id", "messages", "next_before", "scanned"}
    assert ans["chat_id"] == "room-a" and ans["next_before"] is None
    # the edited text is found, the old one is not; the deleted message never is
    assert ids_of(found(server, "room-a", "bonjour")) == [by_text["hello world"]]
    assert found(server, "room-a", "hello")["messages"] == []
    assert found(server, "room-a", "secret")["messages"] == []
    assert found(server, "room-a", "plans")["messages"] == []
    # phrases and exclusions
    assert ids_of(found(server, "room-a", '"red fox"')) == [by_text["the red fox jumps"]]
    assert ids_of(found(server, "room-a", "fox -apples")) == [by_text["the red fox jumps"]]
    assert ids_of(found(server, "room-a", "red fox")) == [by_text["red apples, not a fox"],
                                                          by_text["the red fox jumps"]]
    # paging with before
    page = found(server, "room-a", "fox", limit=1)
    assert ids_of(page) == [by_text["red apples, not a fox"]]
    assert page["next_before"] == by_text["red apples, not a fox"]
    page = found(server, "room-a", "fox", limit=1, before=page["next_before"])
    assert ids_of(page) == [by_text["the red fox jumps"]]
    # a hit is the history's message plus its highlight
    hist = {m["message_id"]: m for m in server.all_history("room-a")}
    hit = dict(found(server, "room-a", "bonjour")["messages"][0])
    assert hit.pop("highlight") == "<em>bonjour</em> le monde"
    assert hit == hist[by_text["hello world"]]

    # across chats, newest first, each hit with its chat_id; from= keeps one author
    r = search_all(server, "cafe", chats="room-a,room-b")
    assert r.status_code == 200, r.text
    ans = r.json()
    assert ans["chats"] == ["room-a", "room-b"]
    assert ids_of(ans) == [b[0]["message_id"], by_text["On se voit au café ?"]]
    assert [m["chat_id"] for m in ans["messages"]] == ["room-b", "room-a"]
    r = search_all(server, "cafe", chats="room-a,room-b", **{"from": "alice"})
    assert ids_of(r.json()) == [by_text["On se voit au café ?"]]

    # the chats claim is respected on both endpoints
    r = search(server, "room-b", "cafe", claim=["room-a"])
    assert r.status_code == 403 and r.json()["error"] == "forbidden", r.text
    r = search_all(server, "cafe", claim=["room-a"], chats="room-a,room-b")
    assert r.status_code == 403 and r.json()["error"] == "forbidden", r.text
    r = search_all(server, "cafe", claim=["room-a"])  # the claim's chats by default
    assert r.status_code == 200 and ids_of(r.json()) == [by_text["On se voit au café ?"]]

    # bad syntax is our 400, never the engine's error
    for q in ['"unbalanced', "-only", "!!!"]:
        r = search(server, "room-a", q)
        assert r.status_code == 400 and r.json()["error"] == "bad_query", (q, r.text)

    m = ix.metrics()
    assert m["chat_indexer_docs_indexed_total"] >= 8  # 6 sends, an edit, a delete
    assert m["chat_indexer_dead_letters_total"] == 0
    assert m["chat_indexer_bulk_latency_seconds_count"] >= 1
    assert ix.lag() == 0


def test_poison_record_goes_to_the_dead_letter_topic_and_blocks_nothing(pipeline):
    server = pipeline.chatd()
    ix = pipeline.indexer()
    p = Producer({"bootstrap.servers": pipeline.brokers})
    p.produce(pipeline.topic, key=b"room-p", value=b"{not json", headers={"version": b"5"})
    assert p.flush(30) == 0
    del p
    alice = server.client("room-p", "alice")
    after = send_many(alice, ["after the poison"])[0]
    wait_until(lambda: list(pipeline.engine.docs()) == [after["message_id"]],
               what="the record after the poison indexed")
    assert ids_of(found(server, "room-p", "poison")) == [after["message_id"]]
    assert ix.metric("chat_indexer_dead_letters_total") == 1

    c = Consumer({"bootstrap.servers": pipeline.brokers, "group.id": "dlq-" + uuid.uuid4().hex,
                  "auto.offset.reset": "earliest"})
    try:
        c.subscribe([pipeline.topic + ".dlq"])
        got = None
        end = time.monotonic() + 30
        while got is None and time.monotonic() < end:
            msg = c.poll(0.5)
            if msg is not None and not msg.error():
                got = msg
    finally:
        c.close()
    assert got is not None, "nothing in the dead-letter topic"
    assert got.value() == b"{not json" and got.key() == b"room-p"
    headers = {k: v.decode() for k, v in got.headers()}
    assert headers["version"] == "5"
    assert "JSON" in headers["dlq_reason"]
    assert headers["dlq_source"].startswith(pipeline.topic + ":")


def test_kafka_down_then_up_every_acknowledged_event_is_indexed_once(pipeline, kafka):
    server = pipeline.chatd()
    pipeline.indexer()
    alice = server.client("room-k", "alice")
    acked = send_many(alice, ["before the outage"])
    wait_until(lambda: len(pipeline.engine.docs()) == 1, what="the first document")
    assert kafka.stop().returncode == 0
    try:
        acked += send_many(alice, [f"while kafka is down {i}" for i in range(40)])
        edit(alice, acked[1]["message_id"], "edited while kafka is down")
        delete(alice, acked[2]["message_id"])
    finally:
        kafka.start()
    wait_until(lambda: index_matches_history(pipeline.engine, server, ["room-k"]), timeout=90,
               what="every acknowledged event indexed")
    docs = pipeline.engine.docs()
    assert sorted(docs) == sorted(ev["message_id"] for ev in acked)  # each once, by id
    assert ids_of(found(server, "room-k", "edited")) == [acked[1]["message_id"]]


def test_indexer_kill9_and_engine_outage_leave_the_index_exact(pipeline, opensearch):
    server = pipeline.chatd()
    alice = server.client("room-x", "alice")
    acked = send_many(alice, [f"burst message {i}" for i in range(1500)], timeout=60)
    ix = pipeline.indexer("--batch", "100")
    # killed with some batches done and others not
    wait_until(lambda: ix.metric("chat_indexer_docs_indexed_total") >= 100, what="a first batch")
    ix.kill9()
    ix.start()
    wait_until(lambda: index_matches_history(pipeline.engine, server, ["room-x"]), timeout=90,
               what="the index exact after the kill")

    # the engine away: chatd answers 503 JSON; the indexer retries, the lag grows, and
    # after the restart nothing is skipped
    assert opensearch.stop().returncode == 0
    try:
        r = search(server, "room-x", "burst")
        assert r.status_code == 503 and r.json()["error"] == "search_unavailable", r.text
        more = send_many(alice, [f"while the engine is down {i}" for i in range(30)])
        edit(alice, acked[0]["message_id"], "edited while the engine is down")
        delete(alice, acked[1]["message_id"])
        wait_until(lambda: ix.metric("chat_indexer_bulk_errors_total") >= 1,
                   what="a failed bulk")
        assert ix.lag() >= 1
    finally:
        opensearch.start()
    wait_until(lambda: index_matches_history(pipeline.engine, server, ["room-x"]), timeout=90,
               what="the index exact after the engine came back")
    docs = pipeline.engine.docs()
    assert len(docs) == len(acked) + len(more)
    wait_until(lambda: ix.lag() == 0, what="no lag")
    ans = found(server, "room-x", '"edited while the engine"')
    assert ids_of(ans) == [acked[0]["message_id"]]


def test_an_independent_consumer_rebuilds_a_chat_as_the_history_says(pipeline):
    """confluent-kafka, not our code, reads the topic: the newest version of each message is
    exactly the REST history."""
    server = pipeline.chatd()
    alice = server.client("room-r", "alice")
    acked = send_many(alice, [f"rebuild {i}" for i in range(10)])
    edit(alice, acked[3]["message_id"], "rebuilt edit")
    delete(alice, acked[5]["message_id"])
    c = Consumer({"bootstrap.servers": pipeline.brokers, "group.id": "rb-" + uuid.uuid4().hex,
                  "auto.offset.reset": "earliest"})
    latest, n = {}, 0
    try:
        c.subscribe([pipeline.topic])
        end = time.monotonic() + 60
        while n < 12 and time.monotonic() < end:  # 10 messages, an edit, a delete
            msg = c.poll(0.5)
            if msg is None or msg.error():
                continue
            n += 1
            h = {k: v.decode() for k, v in msg.headers()}
            ver, mid = int(h["version"]), h["message_id"]
            if mid not in latest or ver > latest[mid][0]:
                latest[mid] = (ver, json.loads(msg.value()))
    finally:
        c.close()
    rebuilt = []
    for _, ev in latest.values():
        entry = {k: v for k, v in ev.items() if k != "event"}
        entry["deleted"] = ev["event"] == "message:delete"
        rebuilt.append(entry)
    rebuilt.sort(key=lambda e: int(e["message_id"]), reverse=True)
    assert rebuilt == server.all_history("room-r")


def partitions_of(ix):
    return {k.split('partition="')[1].split('"')[0] for k in ix.metrics()
            if k.startswith("chat_indexer_consumer_lag{")}


def test_two_indexers_share_the_partitions(pipeline):
    """Two instances of one group: each gets its own half of the 12 partitions, together all
    of them, and between them the index ends exact."""
    server = pipeline.chatd()
    a, b = pipeline.indexer(), pipeline.indexer()
    wait_until(lambda: len(partitions_of(a)) + len(partitions_of(b)) == 12 and
               partitions_of(a) and partitions_of(b), what="both instances assigned")
    pa, pb = partitions_of(a), partitions_of(b)
    assert not pa & pb and len(pa | pb) == 12
    chats = [f"share-{i}" for i in range(30)]
    for c in chats:
        send_many(server.client(c, "alice"), [f"shared work in {c}"])
    wait_until(lambda: index_matches_history(pipeline.engine, server, chats),
               what="the index exact")
    done = [ix.metric("chat_indexer_docs_indexed_total") for ix in (a, b)]
    assert sum(done) == 30 and min(done) > 0, done
