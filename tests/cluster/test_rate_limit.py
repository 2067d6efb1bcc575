"""--rate-limit across nodes: a refused send is stored nowhere and reaches no node; the
bucket is per user *per node* (as the README says), so the same user on another node has
its own.

Nodes 1 and 2 run with one token back every 10 s and bursts of 3 (nothing here depends on
the machine's speed); node 3 runs without a limit.
"""

import asyncio

from clusterlib import Member

SLOW = ["--rate-limit", "0.1", "--rate-burst", "3"]


def limited(m):
    return [e for e in m.others if e.get("event") == "error" and e.get("code") == "rate_limited"]


async def scenario(cluster):
    n1, n2, n3 = cluster.nodes
    chat = "rl-chat"
    alice = Member(cluster.secret, chat, "alice")
    await alice.connect(n1.url)
    bob = Member(cluster.secret, chat, "bob")  # a member on node 2
    await bob.connect(n2.url)
    carol = Member(cluster.secret, chat, "carol")  # a member on node 3
    await carol.connect(n3.url)

    for i in range(6):
        await alice.send(f"a{i}", f"a-{i}")
    await alice.wait_for(lambda m: len(m.acks) == 3 and len(limited(m)) == 3, 20,
                         "3 acks and 3 refusals")
    assert set(alice.acks) == {"a-0", "a-1", "a-2"}
    assert sorted(e["client_id"] for e in limited(alice)) == ["a-3", "a-4", "a-5"]
    assert all(e["retry_after_ms"] > 0 for e in limited(alice))

    # A barrier from node 1 (another user, his own bucket): node 1 publishes in order, so
    # once the others have it, anything alice's sends put on the bus has come too.
    dave = Member(cluster.secret, chat, "dave")
    await dave.connect(n1.url)
    await dave.send("barrier", "barrier")
    for m in (bob, carol):
        await m.wait_for(lambda x: any(e.get("client_id") == "barrier" for e in x.events), 20,
                         "the barrier")
        from_alice = sorted(e["message"] for e in m.events if e["user_from"] == "alice")
        assert from_alice == ["a0", "a1", "a2"], f"{m.user} got {from_alice}"

    # per node: alice's bucket on node 2 is her own there
    alice2 = Member(cluster.secret, chat, "alice")
    await alice2.connect(n2.url)
    await alice2.send("from node 2", "a2-0")
    await alice2.wait_for(lambda m: "a2-0" in m.acks or limited(m), 20, "an answer")
    assert "a2-0" in alice2.acks, alice2.others

    history = cluster.node(3).history(chat)
    assert sorted(m["message"] for m in history) == ["a0", "a1", "a2", "barrier", "from node 2"]
    for m in (alice, alice2, bob, carol, dave):
        await m.close()


def test_refused_sends_reach_no_node_and_the_bucket_is_per_node(cluster):
    for n in cluster.nodes[:2]:
        n.sigterm()
        assert n.wait() == 0
        n.extra_args = list(SLOW)
        n.start()
    asyncio.run(scenario(cluster))
