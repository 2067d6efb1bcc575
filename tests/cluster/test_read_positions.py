"""Read positions across nodes: a user's tabs on different nodes follow each other's read
position through the bus, the other members on those nodes hear nothing of it, and every
node answers GET /api/chats/{chat}/read with the same stored position."""

import asyncio
import json

from clusterlib import Member


def reads(m):
    return [ev for ev in m.others if ev.get("event") == "read"]


async def scenario(cluster):
    n1, n2, n3 = cluster.nodes
    tabs = []
    for node in (n1, n2, n3):
        t = Member(cluster.secret, "rp", "alice")
        await t.connect(node.url)
        tabs.append(t)
    bobs = []
    for node in (n2, n3):
        b = Member(cluster.secret, "rp", "bob")
        await b.connect(node.url)
        bobs.append(b)

    sender = bobs[0]
    for i in range(3):
        await sender.send(f"m{i}", f"m{i}")
    await sender.wait_for(lambda x: len(x.acks) == 3, 10, "acks")
    ids = [sender.acks[f"m{i}"] for i in range(3)]
    for t in tabs:
        await t.wait_ids(ids)

    # tab on node 1 reads m1: the tabs on nodes 2 and 3 are told
    await tabs[0].ws.send(json.dumps({"event": "read", "message_id": ids[1]}))
    want = {"event": "read", "chat_id": "rp", "message_id": ids[1], "user_from": "alice"}
    for t in tabs:
        await t.wait_for(lambda x: want in reads(x), 10, "the read event")
    # the bobs share nodes 2 and 3 with the tabs that were just told: had it been theirs,
    # it would have come with them
    for b in bobs:
        assert reads(b) == [], reads(b)

    # a stale tab on node 3 sends an older id: the position stays, only it is answered
    await tabs[2].ws.send(json.dumps({"event": "read", "message_id": ids[0]}))
    await tabs[2].wait_for(lambda x: len(reads(x)) == 2, 10, "the answer to a stale read")
    assert reads(tabs[2])[-1]["message_id"] == ids[1]

    # then node 2's tab reads the newest: everyone of alice's moves on
    await tabs[1].ws.send(json.dumps({"event": "read", "message_id": ids[2]}))
    for t in tabs:
        await t.wait_for(lambda x: reads(x) and reads(x)[-1]["message_id"] == ids[2], 10,
                         "the newest position")
    assert [r["message_id"] for r in reads(tabs[0])] == [ids[1], ids[2]]
    for b in bobs:
        assert reads(b) == [], reads(b)

    for node in (n1, n2, n3):
        r = node.get("/api/chats/rp/read", user="alice")
        assert r.status_code == 200, r.text
        assert r.json() == {"chat_id": "rp", "message_id": ids[2], "unread": 0,
                            "unread_capped": False}
    r = n3.get("/api/chats/rp/read", user="bob")
    assert r.json()["message_id"] is None and r.json()["unread"] == 0  # all three are his

    for m in tabs + bobs:
        await m.close()


def test_read_positions_follow_the_user_across_nodes(cluster):
    asyncio.run(scenario(cluster))
