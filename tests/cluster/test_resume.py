"""Resume: a member that reconnects with ?since= the newest id it saw gets precisely what it
missed (every message stored meanwhile, once, in id order) and then the live ones, on the
node it left or on another one."""

import asyncio
import sqlite3
import time

import pytest

from clusterlib import Member, describe_duplicates, duplicates, wait_until

CHAT = "resume"
CYCLES = 8


async def scenario(cluster, back_on):
    n1, n2, n3 = cluster.nodes
    a = Member(cluster.secret, CHAT, "alice")
    b = Member(cluster.secret, CHAT, "bob")
    c = Member(cluster.secret, CHAT, "carol")
    await a.connect(n1.url)
    await b.connect(n2.url)
    await c.connect(n3.url)

    async def say(m, cid):
        await m.send(f"{m.user}: {cid}", cid)
        await m.wait_for(lambda x: cid in x.acks, 10, f"ack of {cid}")
        return m.acks[cid]

    seen = [await say(b if k % 2 else c, f"before-{k}") for k in range(6)]
    await a.wait_ids(seen, 15)
    last = a.max_id()
    assert str(last) == max(seen, key=int)
    await a.close()

    missed = [await say(b if k % 2 else c, f"missed-{k}") for k in range(10)]
    # and one over REST, as a bot would
    r = await asyncio.to_thread(n1.post, f"/api/chats/{CHAT}/messages", {"message": "bot"})
    assert r.status_code == 201, r.text
    missed.append(r.json()["message_id"])

    before = len(a.events)
    await a.connect(cluster.node(back_on).url, since=last)
    await a.wait_for(lambda x: len(x.events) >= before + len(missed), 15, "the replay")
    live = await say(b, "live")
    await a.wait_ids([live], 15)
    # a last one, so a late duplicate of anything would be in before it
    tail = await say(c, "tail")
    await a.wait_ids([tail], 15)

    got = a.ids()[before:]
    assert got == sorted(missed, key=int) + [live, tail], (
        f"after since={last}: expected the {len(missed)} missed messages in id order, then "
        f"the 2 live ones; got {got}")

    # since= the newest id: nothing to replay, only what comes live
    d = Member(cluster.secret, CHAT, "dave")
    await d.connect(cluster.node(back_on).url, since=tail)
    live2 = await say(b, "live2")
    await d.wait_ids([live2], 15)
    assert d.ids() == [live2]

    for m in (a, b, c, d):
        await m.close()


@pytest.mark.parametrize("back_on", [1, 3], ids=["same-node", "other-node"])
def test_resume_gets_exactly_what_was_missed(cluster, back_on):
    asyncio.run(scenario(cluster, back_on))


async def resume_under_traffic(cluster):
    n1, n2, n3 = cluster.nodes
    a = Member(cluster.secret, CHAT, "alice")
    b = Member(cluster.secret, CHAT, "bob")
    c = Member(cluster.secret, CHAT, "carol")
    await a.connect(n1.url)
    await b.connect(n2.url)
    await c.connect(n3.url)
    stop = asyncio.Event()

    async def sender(m):
        seq = 0
        while not stop.is_set():
            await m.send(f"{m.user} {seq}", f"{m.user}-{seq}")
            seq += 1
            await asyncio.sleep(0.01)
        await m.wait_for(lambda x: len(x.acks) == seq, 15, "every ack")

    senders = [asyncio.create_task(sender(m)) for m in (b, c)]
    cursors = []  # (connection number, since)
    for k in range(CYCLES):
        await asyncio.sleep(0.15)
        await a.close()
        await asyncio.sleep(0.05)
        # one cursor per origin node: ids of different nodes interleave, so a single
        # newest id could pass over a message of another node still on its way
        since = a.cursors()
        await a.connect(cluster.nodes[k % 3].url, since=since)
        cursors.append((a.connections, since))
        # and speaks at once, while its backlog is still being read (as a client that
        # resends what was never acknowledged does)
        for j in range(3):
            await a.send(f"alice {k}.{j}", f"alice-{k}.{j}")
    await asyncio.sleep(0.15)
    stop.set()
    await asyncio.gather(*senders)
    await a.wait_for(lambda x: len(x.acks) == 3 * CYCLES, 15, "alice's acks")
    acked = {i for m in (a, b, c) for i in m.acks.values()}
    await b.send("tail", "tail")
    await b.wait_for(lambda x: "tail" in x.acks, 10, "tail ack")
    tail = b.acks["tail"]
    await a.wait_ids([tail], 15)

    assert not duplicates(a.ids()), describe_duplicates(a)
    for conn, since in cursors:
        later = {e["message_id"] for e in a.events if e["_conn"] >= conn}
        owed = {i for i in acked if int(i) > cursor_for(since, int(i))}
        missing = owed - later
        assert not missing, (
            f"after reconnect #{conn} with since={since}: {len(missing)} acknowledged messages "
            f"above it never arrived, e.g. {sorted(missing, key=int)[:3]}")

    for m in (a, b, c):
        await m.close()


def cursor_for(since, message_id):
    """What the server owes after a list-form since=: it reads from 10 s before the newest
    cursor, never earlier, and sends per origin node what is after that node's cursor; for a
    node the list does not name, all it read."""
    cursors = [int(c) for c in since.split(",")]
    if len(cursors) == 1:
        return cursors[0]
    start = max(cursors) - (10000 << 22)
    node = (message_id >> 12) & 1023
    named = [c for c in cursors if (c >> 12) & 1023 == node]
    return max(named + [start])


def test_resume_under_live_traffic_no_duplicate(cluster):
    """Reconnect with since= again and again while two other nodes keep sending, and send at
    once after each reconnect: the replay and the live events meet on the new connection,
    and each message must come once. (That
    a message below the cursor, still in flight from another node when the member left,
    is not replayed is test_failover's matter.)"""
    asyncio.run(resume_under_traffic(cluster))


async def orphan_scenario(cluster):
    n1, n2, n3 = cluster.nodes
    chat = "orphan"
    # every node registered (a node is known to the others by its heartbeats)
    await asyncio.to_thread(wait_until, lambda: len(n2.node_urls() or []) == 3, 15,
                            "three nodes in the registry")
    carol = Member(cluster.secret, chat, "carol")
    alice = Member(cluster.secret, chat, "alice")
    await carol.connect(n2.url)
    await alice.connect(n1.url)
    before = []
    for k in range(3):
        await alice.send(f"before {k}", f"before-{k}")
        await alice.wait_for(lambda x, k=k: f"before-{k}" in x.acks, 10, "ack")
        before.append(alice.acks[f"before-{k}"])
    await carol.wait_ids(before, 15)
    # What n1 leaves behind when it is killed after its commit (and the sender's ack) but
    # before its publish reached Redis: a stored message nobody else received. Written into
    # the shared store as n1's writer would have.
    ms = int(time.time() * 1000) - 1577836800000
    mid = (ms << 22) | (n1.idx << 12) | 4095
    db = sqlite3.connect(cluster.store[len("sqlite:"):], timeout=10)
    with db:
        db.execute("INSERT INTO messages (chat_id, id, user_from, message, client_id, created_at)"
                   " VALUES (?, ?, 'alice', 'stored, never published', 'orphan-1', ?)",
                   (chat, mid, ms + 1577836800000))
    db.close()
    n1.kill9()
    await carol.wait_ids([str(mid)], 30)
    assert carol.ids() == before + [str(mid)], carol.ids()
    await carol.close()
    await alice.close()


def test_message_a_killed_node_never_published_reaches_the_others(cluster):
    """A node killed between a commit and its publish: once it drops out of the node
    registry, the other nodes read back what it stored and deliver what their members had
    not seen, once."""
    asyncio.run(orphan_scenario(cluster))


async def resumed_past_scenario(cluster):
    n1, n2, n3 = cluster.nodes
    chat = "resumed-past"
    alice = Member(cluster.secret, chat, "alice")
    carol = Member(cluster.secret, chat, "carol")
    await alice.connect(n1.url)
    await carol.connect(n2.url)
    seen = []
    for k in range(3):
        await alice.send(f"seen {k}", f"seen-{k}")
        await alice.wait_for(lambda x, k=k: f"seen-{k}" in x.acks, 10, "ack")
        seen.append(alice.acks[f"seen-{k}"])
    await carol.wait_ids(seen, 15)
    await carol.close()
    # carol moves to n3, where she is the chat's first member: a room with no history of
    # what it delivered. Her cursors say she has the three.
    await carol.connect(n3.url, since=carol.cursors())
    # Redis restarts: n3's room reads back the last seconds from the store on its return,
    # and finds the three again.
    await asyncio.to_thread(cluster.redis.kill9)
    await asyncio.to_thread(cluster.redis.start)
    await asyncio.to_thread(wait_until, lambda: len(n3.node_urls() or []) == 3, 20,
                            "n3 back on the bus with the others")
    tail = None
    for k in range(40):  # until the bus carries n1's messages to n3 again
        await alice.send(f"tail {k}", f"tail-{k}")
        await alice.wait_for(lambda x, k=k: f"tail-{k}" in x.acks, 10, "tail ack")
        tail = alice.acks[f"tail-{k}"]
        try:
            await carol.wait_ids([tail], 1)
            break
        except AssertionError:
            continue
    await carol.wait_ids([tail], 15)
    assert not duplicates(carol.ids()), describe_duplicates(carol)
    await carol.close()
    await alice.close()


def test_resumed_client_gets_no_repeat_from_a_later_read_back(cluster):
    """A member that resumed with cursors on a node whose room is new gets nothing it
    already has again when that room reads back the store (after a Redis restart): its
    cursors filter its live stream too, not only its replay."""
    asyncio.run(resumed_past_scenario(cluster))
