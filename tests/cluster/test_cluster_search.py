"""scripts/cluster with the search pipeline (its default CLUSTER_SEARCH=opensearch; CLUSTER_STORE=sqlite),
run as a user runs it: start brings up Redis, Kafka, OpenSearch, three nodes, HAProxy and a
chat-indexer on free ports in a tmp dir; messages sent, edited and deleted over WebSocket
(through HAProxy and straight to the nodes) become searchable on every node; status says
every piece runs; stop leaves no process and no listening port behind.

The one idea: one cluster for the module (Kafka and OpenSearch cost seconds to start), and
nothing asked of the engine directly: what is searchable is what the REST search answers.
"""

import asyncio
import json
import os
import re
import socket
import subprocess
import threading
import time
import uuid

import pytest
import requests

from clusterlib import REPO, Member, clean_env, free_port, mint_token, wait_until

SCRIPT = REPO / "scripts" / "cluster"
PIECES = ("redis", "chatd1", "chatd2", "chatd3", "haproxy", "kafka", "opensearch", "indexer")
PORT_VARS = ("CLUSTER_PORT", "CLUSTER_STATS_PORT", "REDIS_PORT", "KAFKA_PORT",
             "OPENSEARCH_PORT", "INDEXER_METRICS_PORT")


def run(env, cmd, timeout=300):
    return subprocess.run([str(SCRIPT), cmd], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def logs(env):
    log_dir = os.path.join(env["CLUSTER_DIR"], "log")
    out = []
    for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        with open(os.path.join(log_dir, name), errors="replace") as f:
            out.append(f"---- {name} ----\n" + "".join(f.readlines()[-30:]))
    return "\n".join(out)


def status_pids(out):
    """{piece: pid} of every line of `status` that says running."""
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^(\S+)\s+running pid=(\d+)", out, re.M)}


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def listening(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def all_ports(env):
    base = int(env["NODE_PORT_BASE"])
    return [int(env[v]) for v in PORT_VARS] + [base + 1, base + 2, base + 3]


@pytest.fixture(scope="module")
def search_cluster(tmp_path_factory):
    env = clean_env({
        "CLUSTER_DIR": str(tmp_path_factory.mktemp("cluster-search") / "cluster"),
        "CLUSTER_STORE": "sqlite",  # CLUSTER_SEARCH left to its default: the pipeline
        # nodes on NODE_PORT_BASE+1..3
        "NODE_PORT_BASE": str(free_port(block=4)),
        **{v: str(free_port()) for v in PORT_VARS},
    })
    try:
        r = run(env, "start")
        assert r.returncode == 0, r.stdout + r.stderr + logs(env)
        with open(os.path.join(env["CLUSTER_DIR"], "jwt_secret")) as f:
            env["_secret"] = f.read().strip()
        yield env
    finally:
        run(env, "stop", timeout=180)


class Http:
    def __init__(self, env, port):
        self.base = f"http://127.0.0.1:{port}"
        self.secret = env["_secret"]
        self.s = requests.Session()
        self.s.trust_env = False

    def get(self, path, user="reader", **params):
        r = self.s.get(self.base + path, params=params, timeout=30,
                       headers={"Authorization": f"Bearer {mint_token(self.secret, user)}"})
        assert r.status_code == 200, (path, params, r.status_code, r.text)
        return r.json()

    def chat_search(self, chat, q):
        ans = self.get(f"/api/chats/{chat}/search", q=q)
        return [m["message_id"] for m in ans["messages"]]

    def search(self, q, chats):
        ans = self.get("/api/search", q=q, chats=chats)
        return [(m["chat_id"], m["message_id"]) for m in ans["messages"]]


async def send(member, text):
    cid = "c-" + uuid.uuid4().hex
    await member.send(text, cid)
    await member.wait_for(lambda m: cid in m.acks, 15, f"the ack of {text!r}")
    return member.acks[cid]


async def change(member, event, mid, **extra):
    await member.ws.send(json.dumps({"event": event, "message_id": mid, **extra}))
    await member.wait_for(lambda m: any(e.get("event") == event and e.get("message_id") == mid
                                        for e in m.others), 15, f"{event} of {mid}")


def test_sends_edits_deletes_searchable_on_every_node(search_cluster):
    env = search_cluster
    secret = env["_secret"]
    proxy = f"ws://127.0.0.1:{env['CLUSTER_PORT']}"
    base = int(env["NODE_PORT_BASE"])
    node = {i: f"ws://127.0.0.1:{base + i}" for i in (1, 2, 3)}
    tag = uuid.uuid4().hex[:6]  # words of this run only
    old, new, gone, last = f"walrus{tag}", f"narwhal{tag}", f"platypus{tag}", f"lemur{tag}"

    async def chat():
        alice = Member(secret, "harbour", "alice")
        await alice.connect(proxy)
        bob = Member(secret, "harbour", "bob")
        await bob.connect(node[2])
        carol = Member(secret, "lighthouse", "carol")
        await carol.connect(node[3])
        ids = {
            "edited": await send(alice, f"the {old} is on the pier"),
            "deleted": await send(bob, f"a {gone} in the harbour"),
            "kept": await send(bob, f"another {old} swims by"),
            "other": await send(carol, f"a {new} near the lighthouse"),
        }
        await change(alice, "message:edit", ids["edited"], message=f"the {new} is on the pier")
        await change(bob, "message:delete", ids["deleted"])
        # events of one chat reach the index in order: once the last is searchable, every
        # change before it has been applied
        ids["last"] = await send(alice, f"the {last} closes the day")
        for m in (alice, bob, carol):
            await m.close()
        return ids

    # each search on a node other than the sender's (alice came through HAProxy)
    n1, n3 = Http(env, base + 1), Http(env, base + 3)
    # A searcher asking all along, from before the first message: the month's first index
    # must not be searchable through the alias before its shard can answer (that window
    # answered 503 search_unavailable for ~130 ms).
    stop, statuses = threading.Event(), []

    def searcher():
        poll = Http(env, base + 2)
        while not stop.is_set():
            r = poll.s.get(poll.base + "/api/chats/harbour/search", params={"q": last}, timeout=30,
                           headers={"Authorization": f"Bearer {mint_token(secret, 'poller')}"})
            statuses.append((r.status_code, r.text[:200]))
            time.sleep(0.005)

    t = threading.Thread(target=searcher, daemon=True)
    t.start()
    try:
        ids = asyncio.run(chat())
        wait_until(lambda: n3.chat_search("harbour", last) == [ids["last"]], 60,
                   "the last message to be searchable", interval=0.2)
    finally:
        stop.set()
        t.join(30)
    bad = [st for st in statuses if st[0] != 200]
    assert not bad, f"{len(bad)} of {len(statuses)} searches failed, first {bad[0]}"
    assert n3.chat_search("harbour", new) == [ids["edited"]]
    assert n3.chat_search("harbour", old) == [ids["kept"]]
    assert n1.chat_search("harbour", gone) == []
    assert n1.chat_search("harbour", "harbour") == []  # only in the deleted message
    wait_until(lambda: n1.search(new, "harbour,lighthouse") ==
               [("lighthouse", ids["other"]), ("harbour", ids["edited"])], 60,
               "the lighthouse message to be searchable across chats", interval=0.2)
    assert n1.search(old, "harbour,lighthouse") == [("harbour", ids["kept"])]
    assert n1.search(gone, "harbour,lighthouse") == []


def test_status_metrics_and_stop(search_cluster):
    env = search_cluster
    st = run(env, "status")
    assert st.returncode == 0, st.stdout + st.stderr
    running = status_pids(st.stdout)
    assert set(running) == set(PIECES), st.stdout
    assert "3 node(s)" in st.stdout, st.stdout

    r = requests.get(f"http://127.0.0.1:{env['INDEXER_METRICS_PORT']}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert re.search(r"^chat_indexer_\w+", r.text, re.M), r.text[:2000]

    stop = run(env, "stop", timeout=180)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "still alive" not in stop.stdout + stop.stderr, "a piece needed SIGKILL:\n" + stop.stdout
    left = {p: pid for p, pid in running.items() if pid_alive(pid)}
    assert not left, f"stop left {left} running\n{stop.stdout}"
    busy = [p for p in all_ports(env) if listening(p)]
    assert not busy, f"ports still listening after stop: {busy}\n{stop.stdout}"
    st = run(env, "status")
    assert st.returncode == 3, st.stdout
