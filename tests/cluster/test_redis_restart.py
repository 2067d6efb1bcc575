"""Redis dies (kill -9) and comes back on the same port while members on every node send.
Sends keep working (the store is the truth), each node reconnects and resubscribes, reads
from the store what its chats missed, and every member ends up with every acknowledged
message exactly once.

Order: message ids are assigned by the node that took the message (ms | node id | seq),
and a node stores and publishes its own messages in id order, so at every member the
messages from any one node arrive in increasing id order. Across nodes there is no total
order to expect: during the outage a member sees its own node's messages at once and the
others' only after the catch-up, so ids from different nodes interleave freely."""

import asyncio

from clusterlib import Member, describe_duplicates, duplicates, origin_node, wait_all, wait_until

CHAT = "redis-restart"
PER_NODE = 2
SENDS = 60


async def scenario(cluster):
    redis = cluster.redis
    members = []
    for node in cluster.nodes:
        for k in range(PER_NODE):
            m = Member(cluster.secret, CHAT, f"n{node.idx}-u{k}")
            await m.connect(node.url)
            m.node = node
            members.append(m)

    async def sender(m):
        for seq in range(SENDS):
            await m.send(f"{m.user} seq={seq}", f"{m.user}-{seq}")
            await asyncio.sleep(0.02)
        await m.wait_for(lambda x: len(x.acks) == SENDS, 30, "every ack")

    async def outage():
        await members[0].wait_for(lambda x: len(x.acks) >= 10, 20, "10 acks before the outage")
        await asyncio.to_thread(redis.kill9)
        # long enough that the nodes notice, and messages pile up on every node
        await asyncio.sleep(1.0)
        await asyncio.to_thread(redis.start)

    await asyncio.gather(outage(), *(sender(m) for m in members))

    expected = {i for m in members for i in m.acks.values()}
    assert len(expected) == SENDS * len(members)
    await wait_all(members, expected, 45)

    barrier = members[-1]
    await barrier.send("barrier", "barrier")
    await barrier.wait_for(lambda x: "barrier" in x.acks, 10, "barrier ack")
    expected.add(barrier.acks["barrier"])
    await wait_all(members, expected, 15)

    for m in members:
        assert m.connections == 1 and not m.closed.is_set(), f"{m.user} lost its connection"
        ids = m.ids()
        assert not duplicates(ids), describe_duplicates(m)
        assert set(ids) == expected, f"{m.user} got {len(set(ids) - expected)} unexpected"
        per_origin = {}
        for i in ids:
            per_origin.setdefault(origin_node(i), []).append(int(i))
        assert set(per_origin) == {1, 2, 3}
        for node_id, seq in per_origin.items():
            assert seq == sorted(seq), f"{m.user}: node {node_id}'s messages out of id order"

    # the registry is rebuilt on the new Redis by the heartbeats
    n1 = cluster.node(1)
    want = sorted(n.url for n in cluster.nodes)
    await asyncio.to_thread(wait_until, lambda: n1.node_urls() == want, 10,
                            "the three nodes registered again")

    for m in members:
        await m.close()


def test_redis_restart_loses_nothing(cluster):
    asyncio.run(scenario(cluster))
