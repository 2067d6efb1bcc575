"""History across bucket boundaries: messages whose ids fall in several 10-day buckets (with
empty buckets between them) page correctly through chatd's REST API, newest first, with no
gap and no repeat, whatever the page size; a WebSocket resume (since=) walks them forward."""

import datetime

import pytest
from helpers import Client

from conftest import BUCKET_MS, bucket_of, keyspace_of, snowflake

DAY = 86400000


def seed(driver_session, ks, chat, ages_days):
    """Insert one message per age (days before now), like another writer; returns their ids
    oldest first."""
    now = int(datetime.datetime.now(datetime.timezone.utc).timestamp() * 1000)
    ids = []
    for i, age in enumerate(sorted(ages_days, reverse=True)):
        ms = now - int(age * DAY) + i
        mid = snowflake(ms, seq=i % 4096)
        driver_session.execute(f"INSERT INTO {ks}.chat_buckets (chat_id, bucket) VALUES (%s, %s)",
                               (chat, bucket_of(mid)))
        driver_session.execute(
            f"INSERT INTO {ks}.messages_by_chat (chat_id, bucket, message_id, user_from, message, "
            "created_at) VALUES (%s, %s, %s, %s, %s, %s)",
            (chat, bucket_of(mid), mid, "seed", f"m{i}",
             datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)),
        )
        ids.append(mid)
    return ids


# 200, 180 and 95 days old, a gap of empty buckets, then a cluster across 3 neighbouring
# buckets and today's
AGES = [200, 180, 95, 95, 95, 31, 29, 21, 19.5, 11, 9, 1, 0.5, 0]


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 200])
def test_history_pages_across_buckets(store_url, chatd_factory, driver_session, limit):
    ks = keyspace_of(store_url)
    ids = seed(driver_session, ks, "b", AGES)
    assert len({bucket_of(i) for i in ids}) >= 6  # with empty buckets between
    srv = chatd_factory(store_url)
    # plus two sent now through chatd, in today's bucket
    alice = srv.client("b", "alice")
    ids.append(int(alice.say("now 1")["message_id"]))
    ids.append(int(alice.say("now 2")["message_id"]))

    got, before, pages = [], None, 0
    while True:
        params = {"limit": limit}
        if before is not None:
            params["before"] = before
        page = srv.history("b", **params)
        pages += 1
        assert len(page["messages"]) <= limit
        got.extend(int(m["message_id"]) for m in page["messages"])
        before = page["next_before"]
        if before is None:
            break
        assert pages < 100
    assert got == sorted(ids, reverse=True)
    assert pages == -(-len(ids) // limit)  # no empty last page: chatd reads one row ahead


def test_history_before_an_old_id(store_url, chatd_factory, driver_session):
    ks = keyspace_of(store_url)
    ids = seed(driver_session, ks, "b2", AGES)
    srv = chatd_factory(store_url)
    # before the first message of the 95-day bucket: only the two older ones
    pivot = ids[2]
    page = srv.history("b2", before=pivot, limit=50)
    assert [int(m["message_id"]) for m in page["messages"]] == [ids[1], ids[0]]
    assert page["next_before"] is None
    # before an id in an empty bucket (150 days ago): the same two
    now = int(datetime.datetime.now(datetime.timezone.utc).timestamp() * 1000)
    empty = snowflake(now - 150 * DAY)
    assert bucket_of(empty) not in {bucket_of(i) for i in ids}
    page = srv.history("b2", before=empty, limit=50)
    assert [int(m["message_id"]) for m in page["messages"]] == [ids[1], ids[0]]


def test_resume_since_walks_buckets_forward(store_url, chatd_factory, driver_session):
    ks = keyspace_of(store_url)
    ids = seed(driver_session, ks, "b3", AGES)
    srv = chatd_factory(store_url)
    url = f"ws://127.0.0.1:{srv.port}/ws/chat/b3?token={srv.token('bob')}&since={ids[4]}"
    c = Client(url, user="bob")
    srv.clients.append(c)
    replayed = []
    while len(replayed) < len(ids) - 5:
        ev = c.recv(timeout=10)
        if ev.get("event") == "message:message":
            replayed.append(int(ev["message_id"]))
    assert replayed == ids[5:]
    assert BUCKET_MS == 864000000
