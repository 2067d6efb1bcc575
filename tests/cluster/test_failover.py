"""kill -9 a node while every member sends: the dead node's members ask a surviving node's
/api/connect where to go, reconnect there with ?since= the newest id they saw from each origin node, resend what
was never acknowledged (same client_id: idempotent), and in the end every member holds
every acknowledged message exactly once, over its old and new connection together.

A client must still be ready for /api/connect to name the dead node (until Redis has seen the
dead process's connections close; test_discovery checks that this comes before its registry
entry expires): it tries again, as a real client would."""

import asyncio

from websockets.exceptions import ConnectionClosed, InvalidHandshake

from clusterlib import Member, describe_duplicates, duplicates, wait_all

CHAT = "failover"
PER_NODE = 2
SENDS = 40
RECONNECT_DEADLINE = 30.0


async def reconnect(cluster, m, survivors):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECONNECT_DEADLINE
    attempt = 0
    while True:
        via = survivors[attempt % len(survivors)]
        attempt += 1
        info = await asyncio.to_thread(via.connect_info, CHAT)
        assert info["chat_id"] == CHAT and info["ws_url"] == f"{info['url']}/ws/chat/{CHAT}", info
        try:
            # one cursor per origin node: a single newest id could skip a message another
            # node had in flight when ours died (ids of different nodes interleave)
            await m.connect(full_url=info["ws_url"], since=m.cursors())
            m.node = cluster.node_by_url(info["url"])
            return
        except (OSError, InvalidHandshake, asyncio.TimeoutError):
            if loop.time() > deadline:
                raise AssertionError(f"{m.user} could not reconnect within {RECONNECT_DEADLINE}s")
            await asyncio.sleep(0.2)


async def scenario(cluster):
    victim = cluster.node(2)
    survivors = [cluster.node(1), cluster.node(3)]
    members = []
    for node in cluster.nodes:
        for k in range(PER_NODE):
            m = Member(cluster.secret, CHAT, f"n{node.idx}-u{k}")
            await m.connect(node.url)
            m.node = node
            members.append(m)
    on_victim = [m for m in members if m.node is victim]

    async def ensure_connected(m, sent):
        if not m.closed.is_set():
            return
        assert m.node is victim, f"{m.user} on a surviving node lost its connection"
        await reconnect(cluster, m, survivors)
        for s in range(sent):
            if f"{m.user}-{s}" not in m.acks:
                await m.send(f"{m.user} seq={s} (again)", f"{m.user}-{s}")

    async def sender(m):
        for seq in range(SENDS):
            await ensure_connected(m, seq)
            try:
                await m.send(f"{m.user} seq={seq}", f"{m.user}-{seq}")
            except ConnectionClosed:
                pass  # resent after the reconnect, as never acknowledged
            await asyncio.sleep(0.02)
        while len(m.acks) < SENDS:
            await ensure_connected(m, SENDS)
            await m.wait_for(lambda x: len(x.acks) == SENDS or x.closed.is_set(), 30,
                             "every ack")

    async def killer():
        # well into the sending, with every member of the victim having seen messages
        for m in on_victim:
            await m.wait_for(lambda x: len(x.acks) >= 10, 20, "10 acks before the kill")
        await asyncio.to_thread(victim.kill9)

    await asyncio.gather(killer(), *(sender(m) for m in members))

    for m in on_victim:
        assert m.connections == 2 and m.node in survivors, (m.user, m.connections, m.url)
    expected = {i for m in members for i in m.acks.values()}
    assert len(expected) == SENDS * len(members), "two client_ids acknowledged with one id"
    await wait_all(members, expected, 30)

    barrier = members[0]
    await barrier.send("barrier", "barrier")
    await barrier.wait_for(lambda x: "barrier" in x.acks, 10, "barrier ack")
    expected.add(barrier.acks["barrier"])
    await wait_all(members, expected, 15)

    for m in members:
        ids = m.ids()
        assert not duplicates(ids), describe_duplicates(m)
        assert set(ids) == expected, f"{m.user} got {len(set(ids) - expected)} unexpected"
    stored = await asyncio.to_thread(survivors[0].history, CHAT)
    assert sorted(x["message_id"] for x in stored) == sorted(expected)

    for m in members:
        await m.close()


def test_kill9_node_clients_resume_elsewhere(cluster):
    asyncio.run(scenario(cluster))
