"""chatd and the DataStax Python driver agree on every byte: what chatd stores, the driver
reads back exactly (ids, text with emoji and quotes, times); what the driver writes in the
documented schema, chatd's history API serves."""

import datetime

from conftest import bucket_of, id_ms, keyspace_of, snowflake

TEXTS = [
    "plain",
    "emoji 😀🎉 and a flag 🇫🇷",
    'double "quotes" and \'single\' and `back`',
    "backslash \\ and newline\nand tab\t",
    "ünïcödé — ελληνικά — 日本語",
    "x" * 5000,
]


def rfc3339(ms):
    dt = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def to_ms(dt):
    """A driver timestamp (naive UTC datetime) to Unix ms."""
    return round(dt.replace(tzinfo=datetime.timezone.utc).timestamp() * 1000)


def test_driver_reads_what_chatd_wrote(store_url, chatd_factory, driver_session):
    srv = chatd_factory(store_url)
    ks = keyspace_of(store_url)
    alice = srv.client("cross", "alice")
    acks = []
    for i, text in enumerate(TEXTS):
        acks.append(alice.say(text, client_id=f"cid-{i}"))
    # one edited, one deleted, over REST-visible paths
    alice.send({"event": "message:edit", "message_id": acks[0]["message_id"],
                "message": "edited ✓"})
    alice.wait_for(lambda e: e.get("event") == "message:edit")
    alice.send({"event": "message:delete", "message_id": acks[1]["message_id"]})
    deleted = alice.wait_for(lambda e: e.get("event") == "message:delete")

    rows = {}
    for ack in acks:
        mid = int(ack["message_id"])
        r = driver_session.execute(
            f"SELECT * FROM {ks}.messages_by_chat WHERE chat_id = %s AND bucket = %s "
            "AND message_id = %s",
            ("cross", bucket_of(mid), mid),
        ).one()
        assert r is not None, f"no row for {mid}"
        rows[mid] = r
    for i, ack in enumerate(acks):
        r = rows[int(ack["message_id"])]
        assert r.chat_id == "cross"
        assert r.message_id == int(ack["message_id"])
        assert r.user_from == "alice"
        assert r.client_id == f"cid-{i}"
        assert rfc3339(to_ms(r.created_at)) == ack["created_at"]
        # the id's own time is the message's time
        assert abs(id_ms(r.message_id) - to_ms(r.created_at)) <= 1
        if i == 0:
            assert r.message == "edited ✓" and r.edited_at is not None
        elif i == 1:
            assert r.message is None and r.deleted is True
            assert rfc3339(to_ms(r.deleted_at)) == deleted["deleted_at"]
        else:
            assert r.message == TEXTS[i], (r.message, TEXTS[i])
            assert r.edited_at is None and r.deleted is None
    # the bucket index lists the chat's bucket; the claims map client ids to the messages
    buckets = [r.bucket for r in driver_session.execute(
        f"SELECT bucket FROM {ks}.chat_buckets WHERE chat_id = 'cross'")]
    assert bucket_of(acks[0]["message_id"]) in buckets
    claim = driver_session.execute(
        f"SELECT message_id, created_at FROM {ks}.message_client_ids "
        "WHERE chat_id = 'cross' AND user_from = 'alice' AND client_id = 'cid-3'").one()
    assert claim.message_id == int(acks[3]["message_id"])
    assert rfc3339(to_ms(claim.created_at)) == acks[3]["created_at"]


def test_chatd_serves_what_the_driver_wrote(store_url, chatd_factory, driver_session):
    ks = keyspace_of(store_url)
    now = int(datetime.datetime.now(datetime.timezone.utc).timestamp() * 1000)
    day = 86400000
    # rows in three buckets (today, 25 days ago, 61 days ago), as another writer would
    written = []
    plan = [(61, TEXTS[1]), (25, TEXTS[2]), (25, TEXTS[4]), (0, TEXTS[3])]
    for i, (age, text) in enumerate(plan):
        ms = now - age * day + i
        mid = snowflake(ms, seq=i)
        b = bucket_of(mid)
        driver_session.execute(f"INSERT INTO {ks}.chat_buckets (chat_id, bucket) VALUES (%s, %s)",
                               ("ext", b))
        driver_session.execute(
            f"INSERT INTO {ks}.messages_by_chat (chat_id, bucket, message_id, user_from, message, "
            "client_id, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            ("ext", b, mid, "py-writer", text, None,
             datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)),
        )
        written.append((mid, text, ms))
    # and one deleted by that writer (deleted = true, text gone)
    ms = now - 3 * day
    mid = snowflake(ms, seq=9)
    driver_session.execute(f"INSERT INTO {ks}.chat_buckets (chat_id, bucket) VALUES (%s, %s)",
                           ("ext", bucket_of(mid)))
    driver_session.execute(
        f"INSERT INTO {ks}.messages_by_chat (chat_id, bucket, message_id, user_from, created_at, "
        "deleted, deleted_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        ("ext", bucket_of(mid), mid, "py-writer",
         datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc), True,
         datetime.datetime.fromtimestamp((ms + 5) / 1000, tz=datetime.timezone.utc)),
    )

    srv = chatd_factory(store_url)
    got = srv.all_history("ext", limit=2)
    assert [m["message_id"] for m in got] == [
        str(written[3][0]), str(mid), str(written[2][0]), str(written[1][0]), str(written[0][0])]
    by_id = {m["message_id"]: m for m in got}
    for wid, text, wms in written:
        m = by_id[str(wid)]
        assert m["message"] == text
        assert m["user_from"] == "py-writer"
        assert m["created_at"] == rfc3339(wms)
        assert m["chat_id"] == "ext"
    d = by_id[str(mid)]
    assert d.get("deleted") is True and "message" not in d
    assert d["deleted_at"] == rfc3339(ms + 5)
    # a chatd send lands after them, and the driver's rows can be edited through chatd
    alice = srv.client("ext", "py-writer")
    ack = alice.say("from chatd")
    assert int(ack["message_id"]) > written[3][0]
    alice.send({"event": "message:edit", "message_id": str(written[1][0]), "message": "fixed"})
    ev = alice.wait_for(lambda e: e.get("event") in ("message:edit", "error"))
    assert ev["event"] == "message:edit", ev
    r = driver_session.execute(
        f"SELECT message, edited_at FROM {ks}.messages_by_chat WHERE chat_id = 'ext' "
        "AND bucket = %s AND message_id = %s", (bucket_of(written[1][0]), written[1][0])).one()
    assert r.message == "fixed" and r.edited_at is not None
