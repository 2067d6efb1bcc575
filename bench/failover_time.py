#!/usr/bin/env python3
"""Failover time: from `kill -9` of a chatd node to every one of its clients resumed on
another node. CLUSTER_CHATD=path measures another build (with --explicit-ids if it has no
node id leases).

Starts redis-server on a free loopback port and three chatd nodes (no --node-id: each leases
a free one) sharing one SQLite file in a temporary directory, with the cluster tests' own
helpers (tests/cluster/clusterlib.py). Then, per round: CLIENTS members connect to the victim
node (in CHATS chats), the victim is killed with SIGKILL, and each member does what the
README tells a client to do: ask a surviving node's /api/connect where to go (again after
0.1 s if the answer is refused), and reconnect there with since= its per-origin cursors. A
member has resumed when the new WebSocket is open (the server replays what it missed, then
goes live). A restarted victim (same port) serves the next round.

Prints, per round, when the last member resumed (ms after the kill), the median, and how
often /api/connect named the dead node (each such answer costs a client a failed connect).

    python3 bench/failover_time.py --clients 50 --rounds 5
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "cluster"))

from clusterlib import Member, Node, Redis  # noqa: E402


class AutoNode(Node):
    """A node of the cluster with --node-id left out (the default a user gets)."""

    def argv(self):
        argv = super().argv()
        i = argv.index("--node-id")
        del argv[i:i + 2]
        return argv


async def resume(m, survivors, t_kill, stats):
    await m.closed.wait()
    k = 0
    while True:
        via = survivors[k % len(survivors)]
        k += 1
        r = await asyncio.to_thread(via.get, "/api/connect", params={"chat_id": m.chat})
        if r.status_code != 200:
            await asyncio.sleep(0.1)
            continue
        info = r.json()
        if info["url"] == m.dead_url:
            stats["offered_dead"] += 1
        try:
            await m.connect(full_url=info["ws_url"], since=m.cursors())
        except Exception:  # refused, reset: ask again
            stats["failed_connects"] += 1
            await asyncio.sleep(0.1)
            continue
        return time.monotonic() - t_kill


async def one_round(victim, survivors, secret, clients, chats, rnd):
    members = []
    for k in range(clients):
        m = Member(secret, f"failover-{rnd}-{k % chats}", f"r{rnd}-u{k}")
        await m.connect(victim.url)
        m.dead_url = victim.url
        members.append(m)
    # a message per chat, so that every member has a cursor to resume from
    for c in range(chats):
        await members[c].send("before the kill", f"before-{rnd}-{c}")
    for m in members:
        await m.wait_for(lambda x: len(x.events) >= 1, 10, "the message before the kill")
    stats = {"offered_dead": 0, "failed_connects": 0}
    t_kill = time.monotonic()
    victim.proc.kill()
    times = await asyncio.gather(*(resume(m, survivors, t_kill, stats) for m in members))
    await asyncio.to_thread(victim.proc.wait, 5)
    victim.killed = True
    for m in members:
        await m.close()
    return max(times), statistics.median(times), stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=50, help="members on the victim node")
    ap.add_argument("--chats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--explicit-ids", action="store_true",
                    help="--node-id 1..3 (to measure a build without node id leases, named "
                         "by CLUSTER_CHATD)")
    args = ap.parse_args()
    import secrets

    tmp = Path(tempfile.mkdtemp(prefix="failover-"))
    secret = secrets.token_hex(24)
    redis = Redis(tmp)
    nodes = []
    try:
        for i in (1, 2, 3):
            cls = Node if args.explicit_ids else AutoNode
            nodes.append(cls(i, tmp, redis, f"sqlite:{tmp}/chat.db", secret))
        victim, survivors = nodes[1], [nodes[0], nodes[2]]
        print(f"| round | clients | last resumed (ms after kill -9) | median (ms) | "
              f"/api/connect answers naming the dead node | failed connects |")
        print("|---|---|---|---|---|---|")
        lasts = []
        for rnd in range(1, args.rounds + 1):
            # every node registered (a restarted victim has a new instance id)
            deadline = time.monotonic() + 10
            while len(survivors[0].nodes()) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            last, med, st = asyncio.run(one_round(victim, survivors, secret, args.clients,
                                                  args.chats, rnd))
            lasts.append(last)
            print(f"| {rnd} | {args.clients} | {last * 1000:.0f} | {med * 1000:.0f} | "
                  f"{st['offered_dead']} | {st['failed_connects']} |", flush=True)
            victim.start()
        print(f"\nworst round: {max(lasts) * 1000:.0f} ms; median of the rounds' last: "
              f"{statistics.median(lasts) * 1000:.0f} ms")
    finally:
        for n in nodes:
            if n.alive:
                n.sigterm()
                try:
                    n.wait()
                except AssertionError:
                    pass
        redis.stop()


if __name__ == "__main__":
    main()
