"""One Redis subscription per node per chat, never one per connection: PUBSUB NUMSUB counts
the subscriber connections of a channel, so it tells how many nodes listen to a chat.

Before reading it, each step proves that the subscriptions it expects are live (a message
published by another node reached the members), so the count is read when it must be
final, not while a SUBSCRIBE is still in flight."""

import asyncio

from clusterlib import Member, wait_until

CHAT = "subs-x"
CHANNEL = f"chat:{CHAT}"
CROWD = 50


async def post_and_wait(node, members, text):
    """A message sent over REST on node; returns when every member has it."""
    r = await asyncio.to_thread(node.post, f"/api/chats/{CHAT}/messages", {"message": text})
    assert r.status_code == 201, (r.status_code, r.text)
    mid = r.json()["message_id"]
    await asyncio.gather(*(m.wait_ids([mid], 15) for m in members))


async def numsub_becomes(redis, n):
    await asyncio.to_thread(wait_until, lambda: redis.numsub(CHANNEL) == n, 10,
                            f"PUBSUB NUMSUB {CHANNEL} == {n}")


async def scenario(cluster):
    redis = cluster.redis
    n1, n2, n3 = cluster.nodes
    assert redis.numsub(CHANNEL) == 0

    crowd = []
    for k in range(CROWD):
        m = Member(cluster.secret, CHAT, f"crowd{k}")
        await m.connect(n1.url)
        crowd.append(m)
    # node 2 has no member: it only publishes; all 50 receiving it proves node 1 listens
    await post_and_wait(n2, crowd, "from node 2")
    assert redis.numsub(CHANNEL) == 1, "50 members on one node must share one subscription"

    m2 = Member(cluster.secret, CHAT, "on-node2")
    await m2.connect(n2.url)
    m3 = Member(cluster.secret, CHAT, "on-node3")
    await m3.connect(n3.url)
    everyone = crowd + [m2, m3]
    for node in cluster.nodes:
        await post_and_wait(node, everyone, f"from node {node.idx}")
    assert redis.numsub(CHANNEL) == 3, "one subscription per node with members of the chat"

    # another chat does not add to this one's channel
    other = Member(cluster.secret, "subs-y", "elsewhere")
    await other.connect(n1.url)
    assert redis.numsub(CHANNEL) == 3

    # node 3's last member leaves: node 3 unsubscribes, the others stay
    await m3.close()
    await numsub_becomes(redis, 2)
    await post_and_wait(n3, crowd + [m2], "node 3 still publishes")
    assert redis.numsub(CHANNEL) == 2

    # node 1 keeps its subscription until its fiftieth member is gone
    for m in crowd[:-1]:
        await m.close()
    await post_and_wait(n2, [crowd[-1], m2], "one left on node 1")
    assert redis.numsub(CHANNEL) == 2
    await crowd[-1].close()
    await numsub_becomes(redis, 1)
    await m2.close()
    await numsub_becomes(redis, 0)
    await other.close()


def test_one_subscription_per_node_per_chat(cluster):
    asyncio.run(scenario(cluster))
