"""Three nodes, one Redis, one store: members of a chat spread over the nodes all receive
every message of their chat, exactly once, each sender's messages in the order sent, and
nothing from another chat."""

import asyncio

from clusterlib import Member, describe_duplicates, duplicates, wait_all

PER_NODE = 2  # members of each chat on each node
SENDS = 15  # messages per member


async def scenario(cluster):
    chats = ["fan-a", "fan-b"]
    members = {chat: [] for chat in chats}
    for chat in chats:
        for node in cluster.nodes:
            for k in range(PER_NODE):
                m = Member(cluster.secret, chat, f"{chat}-n{node.idx}-u{k}")
                await m.connect(node.url)
                m.node = node
                members[chat].append(m)
    everyone = [m for ms in members.values() for m in ms]

    async def sender(m):
        for seq in range(SENDS):
            await m.send(f"chat={m.chat} user={m.user} seq={seq}", f"{m.user}-{seq}")
            await asyncio.sleep(0.005)
        await m.wait_for(lambda x: len(x.acks) == SENDS, 20, "all acks")

    await asyncio.gather(*(sender(m) for m in everyone))

    expected = {}
    for chat in chats:
        expected[chat] = {i for m in members[chat] for i in m.acks.values()}
        assert len(expected[chat]) == SENDS * PER_NODE * 3, "an ack id was reused"
        await wait_all(members[chat], expected[chat])

    # A last message per chat from a member of node 1, once everything else has arrived:
    # whatever would still trickle in (a late duplicate, a stray from the other chat)
    # would be on the wire before it.
    for chat in chats:
        m = members[chat][0]
        await m.send(f"chat={chat} barrier", "barrier")
        await m.wait_for(lambda x: "barrier" in x.acks, 10, "barrier ack")
        expected[chat].add(m.acks["barrier"])
        await wait_all(members[chat], expected[chat])

    for m in everyone:
        ids = m.ids()
        assert not duplicates(ids), describe_duplicates(m)
        assert set(ids) == expected[m.chat], f"{m.user} got messages that are not its chat's"
        for ev in m.events:
            assert ev["chat_id"] == m.chat, ev
            assert ev["message"].startswith(f"chat={m.chat} "), ev
        # each sender's messages in the order it sent them
        by_sender = {}
        for ev in m.events:
            if ev["client_id"] == "barrier":
                continue
            by_sender.setdefault(ev["user_from"], []).append(ev)
        assert len(by_sender) == PER_NODE * 3
        for user, evs in by_sender.items():
            seqs = [int(ev["client_id"].rsplit("-", 1)[1]) for ev in evs]
            assert seqs == list(range(SENDS)), f"{m.user} saw {user}'s messages as {seqs}"
            ids = [int(ev["message_id"]) for ev in evs]
            assert ids == sorted(ids), f"{user}'s ids are not increasing at {m.user}"

    # the store holds each message once, and the ids name the node that took them
    for chat in chats:
        stored = cluster.node(2).history(chat)
        assert sorted(x["message_id"] for x in stored) == sorted(expected[chat])
        for m in members[chat]:
            for cid, mid in m.acks.items():
                assert (int(mid) >> 12) & 1023 == m.node.idx, (m.user, cid, mid)

    for m in everyone:
        await m.close()


def test_three_nodes_fan_out(cluster):
    asyncio.run(scenario(cluster))
