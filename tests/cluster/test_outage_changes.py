"""An edit and a delete made while Redis is down reach the members of other nodes.

Node 1 takes the edit and the delete (both are stored and acknowledged to their author) and
then dies with kill -9 before Redis is back, so the publishes it kept for the reconnect are
gone with it: nothing but node 2's catch-up from the store can bring the changes to node 2's
member. Without the catch-up of changes this test fails every time, not by timing."""

import asyncio
import json

from clusterlib import Member, wait_until

CHAT = "outage-changes"


def changes(member, event):
    return {e["message_id"]: e for e in member.others if e.get("event") == event}


async def scenario(cluster):
    n1, n2 = cluster.node(1), cluster.node(2)
    alice = Member(cluster.secret, CHAT, "alice")  # the author, on node 1
    bob = Member(cluster.secret, CHAT, "bob")  # the reader, on node 2
    await alice.connect(n1.url)
    await bob.connect(n2.url)

    await alice.send("first, to be edited", "c-1")
    await alice.send("second, to be deleted", "c-2")
    await alice.send("third, left alone", "c-3")
    await alice.wait_for(lambda m: len(m.acks) == 3, 10, "three acks")
    ids = [alice.acks[c] for c in ("c-1", "c-2", "c-3")]
    await bob.wait_ids(ids, 10)

    await asyncio.to_thread(cluster.redis.kill9)
    # Both nodes lose the bus: a node learns of it from its broken connections.
    await asyncio.to_thread(
        wait_until, lambda: "bus_down" in n2.log.read_text() and "bus_down" in n1.log.read_text(),
        10, "both nodes saw the bus go down")

    await alice.ws.send(json.dumps({"event": "message:edit", "message_id": ids[0],
                                    "message": "first, edited during the outage"}))
    await alice.ws.send(json.dumps({"event": "message:delete", "message_id": ids[1]}))
    await alice.wait_for(
        lambda m: ids[0] in changes(m, "message:edit") and ids[1] in changes(m, "message:delete"),
        10, "the edit and the delete acknowledged on node 1")
    assert not changes(bob, "message:edit") and not changes(bob, "message:delete"), \
        "node 2 heard of the changes with the bus down"

    await asyncio.to_thread(n1.kill9)
    await asyncio.to_thread(cluster.redis.start)

    await bob.wait_for(
        lambda m: ids[0] in changes(m, "message:edit") and ids[1] in changes(m, "message:delete"),
        20, "the edit and the delete after the catch-up")
    edit = changes(bob, "message:edit")[ids[0]]
    assert edit["message"] == "first, edited during the outage"
    assert edit["user_from"] == "alice" and edit.get("edited_at")
    delete = changes(bob, "message:delete")[ids[1]]
    assert delete.get("deleted_at") and not delete.get("message")
    # the untouched message is neither re-sent as a change nor delivered twice
    assert ids[2] not in changes(bob, "message:edit")
    assert ids[2] not in changes(bob, "message:delete")
    assert bob.ids().count(ids[2]) == 1
    assert bob.connections == 1 and not bob.closed.is_set()

    # and the store agrees with what bob was told
    hist = {m["message_id"]: m for m in n2.history(CHAT)}
    assert hist[ids[0]]["message"] == "first, edited during the outage"
    assert hist[ids[1]].get("deleted_at")

    await bob.close()
    await alice.close()


def test_changes_during_a_bus_outage_reach_other_nodes(cluster):
    asyncio.run(scenario(cluster))
