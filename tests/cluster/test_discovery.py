"""Discovery: /api/nodes lists the live nodes, /api/connect spreads new clients over them by
load, and a drained node (SIGTERM) closes its clients with 1012, leaves the registry and
gets no new clients."""

import asyncio
import collections

from clusterlib import Member, wait_until

NEW_CLIENTS = 30


def wait_registered(cluster, asked, nodes, timeout=10):
    """Until asked's /api/nodes lists exactly these nodes (a node registers with its first
    heartbeat on the bus, up to a second after it listens)."""
    want = sorted(n.url for n in nodes)
    wait_until(lambda: sorted(x["url"] for x in asked.nodes()) == want, timeout,
               f"chatd{asked.idx}'s /api/nodes to list {want}")


async def open_through_connect(cluster, n, prefix, ask):
    """Open n members one after the other, each where /api/connect says; the question goes
    to the nodes of ask in turn (any node answers for the whole cluster)."""
    members = []
    for k in range(n):
        via = ask[k % len(ask)]
        chat = f"{prefix}-{k % 4}"
        info = await asyncio.to_thread(via.connect_info, chat)
        assert info["chat_id"] == chat and info["ws_url"] == f"{info['url']}/ws/chat/{chat}"
        m = Member(cluster.secret, chat, f"{prefix}-u{k}")
        await m.connect(full_url=info["ws_url"])
        m.node = cluster.node_by_url(info["url"])
        members.append(m)
    return members


def test_nodes_lists_the_cluster(cluster):
    for asked in cluster.nodes:
        wait_registered(cluster, asked, cluster.nodes)
        nodes = asked.nodes()
        assert sorted(x["url"] for x in nodes) == sorted(n.url for n in cluster.nodes)
        assert len({x["id"] for x in nodes}) == 3
        for x in nodes:
            assert x["draining"] is False and x["connections"] == 0, x
            assert set(x) >= {"id", "url", "connections", "started_at", "seen_at", "draining",
                              "node_id"}
            # the node id each was started with (--node-id 1..3), as leased
            assert x["node_id"] == cluster.node_by_url(x["url"]).idx, x
    r = cluster.node(1).session.get(cluster.node(1).http + "/api/nodes", timeout=5)
    assert r.status_code == 401, "the node list needs a token"


def test_connect_spreads_new_clients(cluster):
    # a cluster that has been up for a while: every node registered
    wait_registered(cluster, cluster.node(1), cluster.nodes)

    async def scenario():
        # whom the client asks does not matter: node 1 answers for the cluster
        members = await open_through_connect(cluster, NEW_CLIENTS, "spread", [cluster.node(1)])
        counts = collections.Counter(m.node.idx for m in members)
        # roughly balanced: every node gets a fair share, none more than half
        assert set(counts) == {1, 2, 3}, f"clients per node: {dict(counts)}"
        assert min(counts.values()) >= NEW_CLIENTS // 6, f"clients per node: {dict(counts)}"
        assert max(counts.values()) <= NEW_CLIENTS // 2, f"clients per node: {dict(counts)}"
        # and the registry's counts catch up with what is open (heartbeat: every second)
        want = {n.url: counts[n.idx] for n in cluster.nodes}
        await asyncio.to_thread(
            wait_until,
            lambda: {x["url"]: x["connections"] for x in cluster.node(1).nodes()} == want,
            10, f"/api/nodes connection counts {want}")
        for m in members:
            await m.close()

    asyncio.run(scenario())


def test_drained_node_gets_no_clients(cluster):
    n1, n2, n3 = cluster.nodes
    wait_registered(cluster, n1, cluster.nodes)

    async def scenario():
        on_n3 = []
        for k in range(3):
            m = Member(cluster.secret, "drain", f"n3-u{k}")
            await m.connect(n3.url)
            on_n3.append(m)
        elsewhere = Member(cluster.secret, "drain", "n1-u0")
        await elsewhere.connect(n1.url)

        n3.sigterm()
        for m in on_n3:
            await m.wait_for(lambda x: x.closed.is_set(), 10, "the drain's close")
            assert m.close_code == 1012, f"{m.user} closed with {m.close_code}, not 1012"
        assert await asyncio.to_thread(n3.wait) == 0, "a drained node exits 0"
        assert not elsewhere.closed.is_set()

        for asked in (n1, n2):
            await asyncio.to_thread(wait_registered, cluster, asked, [n1, n2], 5)

        members = await open_through_connect(cluster, 12, "after", [n1, n2])
        counts = collections.Counter(m.node.idx for m in members)
        # (how they spread over the two others is test_connect_spreads_new_clients's matter)
        assert 3 not in counts, f"the drained node got clients: {dict(counts)}"
        for m in members + [elsewhere]:
            await m.close()

    asyncio.run(scenario())


def test_chatctl_nodes_prints_the_registry(cluster):
    """`chatctl nodes` reads the same registry as /api/nodes and prints it as a table."""
    import subprocess

    from clusterlib import REPO

    asked = cluster.nodes[0]
    wait_registered(cluster, asked, cluster.nodes)
    listed = asked.nodes()
    want = {x["id"]: x["url"] for x in listed}
    node_ids = {x["id"]: str(x["node_id"]) for x in listed}
    out = subprocess.run(
        [str(REPO / "build" / "chatctl"), "nodes", "--bus",
         f"redis://127.0.0.1:{cluster.redis.port}"],
        capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["ID", "URL", "CONNECTIONS", "NODE_ID"], lines[0]
    rows = {r.split()[0]: r.split() for r in lines[1:]}
    assert set(rows) == set(want), (rows, want)
    for node_id, url in want.items():
        assert rows[node_id][1] == url and rows[node_id][-1] == "live", rows[node_id]
        assert rows[node_id][3] == node_ids[node_id], rows[node_id]


def test_killed_node_is_dropped_before_its_entry_expires(cluster):
    """kill -9: the node sends no goodbye, and its registry entry lives on for its TTL. But
    its Redis connections close with the process, and the others notice that: the dead node
    is gone from /api/nodes (and /api/connect) while its entry is still in Redis."""
    n1, n2, n3 = cluster.nodes
    wait_registered(cluster, n1, cluster.nodes)
    victim = {x["url"]: x["id"] for x in n1.nodes()}[n3.url]
    n3.kill9()

    def dropped():
        urls = n1.node_urls()
        if urls is not None and n3.url not in urls:
            # at this very moment: how long its heartbeat entry still had to live
            return ("dropped", cluster.redis.cmd("PTTL", f"chat:node:{victim}"))
        return None

    _, pttl = wait_until(dropped, 10, "the killed node to leave /api/nodes", interval=0.02)
    assert pttl > 0, f"dropped only once its entry expired (PTTL {pttl}): the crash went unseen"
    for k in range(20):
        info = n1.connect_info(f"after-kill-{k}")
        assert info["url"] != n3.url, "/api/connect offered the killed node"
