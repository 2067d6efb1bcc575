"""permessage-deflate across three nodes over Redis: an event published on one node reaches
members of the others compressed (each node compresses it once, for its own compressing
members) and plain to those that did not negotiate it, through the websockets client."""

import asyncio
import re

from clusterlib import Member, wait_all

TEXT = "a message long enough to be compressed on every node " * 6


def metric(node, name):
    m = re.search(rf"^{name} (\S+)$", node.get("/metrics").text, re.M)
    return float(m.group(1)) if m else None


async def scenario(cluster):
    members = []
    for node in cluster.nodes:
        for k, comp in enumerate(("deflate", "deflate", None)):
            m = Member(cluster.secret, "zip", f"n{node.idx}-u{k}")
            await m.connect(node.url, compression=comp)
            ext = m.ws.response.headers.get("Sec-WebSocket-Extensions")
            assert (ext is not None) == (comp is not None), ext
            members.append(m)
    before = {n.idx: metric(n, "chat_deflate_frames_total") for n in cluster.nodes}
    sender = members[0]
    for i in range(3):
        await sender.send(f"{TEXT}{i}", f"z{i}")
    await sender.wait_for(lambda x: len(x.acks) == 3, 20, "acks")
    await wait_all(members, set(sender.acks.values()))
    for m in members:
        assert sorted(e["message"] for e in m.events) == [f"{TEXT}{i}" for i in range(3)]
    for n in cluster.nodes:
        # once per event on each node, however many of its members compress
        assert metric(n, "chat_deflate_frames_total") - before[n.idx] == 3, n.idx
        assert metric(n, "chat_websocket_deflate_total") == 2
    for m in members:
        await m.close()


def test_deflate_across_nodes(cluster):
    asyncio.run(scenario(cluster))
