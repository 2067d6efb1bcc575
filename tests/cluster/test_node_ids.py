"""Node ids: the node id is part of every message id, and the per-origin duplicate marks trust
it, so two live nodes with one node id would drop each other's messages. With a Redis bus a
node leases its id in Redis before it listens: left out, a free one is picked; given, it is
refused while a live node holds it; released on a clean stop; taken over from a node that
was killed (its Redis connection is gone).

These tests start their own nodes (not the 1-2-3 cluster fixture): some have no --node-id."""

import asyncio
import secrets
import subprocess

import pytest
import requests

from clusterlib import (CHATD, Member, Node, Redis, START_TIMEOUT, clean_env, free_port,
                        origin_node, tail, wait_until)


class AutoNode(Node):
    """A chatd of the cluster with --node-id left out, or set to node_id."""

    def __init__(self, idx, tmp, redis, store, secret, node_id=None, wait=True):
        self.node_id_arg = node_id
        self.wait_up = wait
        super().__init__(idx, tmp, redis, store, secret)

    def start(self):
        if self.wait_up:
            return super().start()
        out = open(self.log, "ab")  # started, not waited for
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, env=clean_env())
        out.close()
        self.killed = False

    def argv(self):
        argv = super().argv()
        i = argv.index("--node-id")
        del argv[i:i + 2]
        if self.node_id_arg is not None:
            argv += ["--node-id", str(self.node_id_arg)]
        return argv

    def node_id(self):
        """The node id this node reports in /api/nodes."""
        for x in self.nodes():
            if x["url"] == self.url:
                return x["node_id"]
        raise AssertionError(f"{self.url} is not in its own /api/nodes")


class Bed:
    """Redis, a shared store, and whichever nodes a test starts."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.secret = secrets.token_hex(24)
        self.store = f"sqlite:{tmp}/chat.db"
        self.redis = Redis(tmp)
        self.nodes = []

    def start(self, node_id=None, wait=True):
        n = AutoNode(len(self.nodes) + 1, self.tmp, self.redis, self.store, self.secret, node_id,
                     wait)
        self.nodes.append(n)
        return n

    def run_refused(self, node_id):
        """Start a chatd that must refuse to start; its exit status and output."""
        argv = [str(CHATD), "--host", "127.0.0.1", "--port", str(free_port()),
                "--store", self.store, "--bus", f"redis://127.0.0.1:{self.redis.port}",
                "--jwt-secret", self.secret, "--node-id", str(node_id)]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT,
                           env=clean_env())
        return p.returncode, p.stdout + p.stderr

    def logs(self):
        return "\n".join(f"---- chatd{n.idx} ----\n{tail(n.log)}" for n in self.nodes)

    def stop(self):
        problems = []
        for n in self.nodes:
            n.session.close()
            if n.alive:
                n.sigterm()
        for n in self.nodes:
            if n.proc.returncode is None:
                rc = n.wait()
                if rc != 0:
                    problems.append(f"chatd{n.idx} exited with {rc} after SIGTERM")
        self.redis.stop()
        return problems


@pytest.fixture
def bed(tmp_path, request):
    b = Bed(tmp_path)
    try:
        yield b
    finally:
        problems = b.stop()
        if problems or getattr(request.node, "rep_call", None) is None or \
                request.node.rep_call.failed:
            print(b.logs())
        if problems:
            pytest.fail("teardown: " + "; ".join(problems))


def lease_holder(redis, node_id):
    return redis.cmd("GET", f"chat:nodeid:{node_id}")


def test_nodes_without_node_id_lose_nothing(bed):
    """The default a user gets by forgetting --node-id: two nodes, six members (three on
    each) of one chat, each sends one message at the same moment; every member receives all
    six, with six distinct ids from two distinct origin nodes."""
    a, b = bed.start(), bed.start()

    async def scenario():
        members = []
        for node in (a, b):
            for k in range(3):
                m = Member(bed.secret, "ids", f"n{node.idx}-u{k}")
                await m.connect(node.url)
                members.append(m)
        # both nodes subscribed to the chat on the bus before anyone sends
        await asyncio.to_thread(wait_until, lambda: bed.redis.numsub("chat:ids") == 2, 10,
                                "both nodes to subscribe to the chat")
        await asyncio.gather(*(m.send(f"hello from {m.user}", f"{m.user}-0") for m in members))
        for m in members:
            await m.wait_for(lambda x: len(x.acks) == 1, 10, "its own message back")
        sent = {m.acks[f"{m.user}-0"] for m in members}
        assert len(sent) == 6, f"six messages got {len(sent)} distinct ids: {sorted(sent)}"
        for m in members:
            try:
                await m.wait_for(lambda x: sent <= set(x.ids()), 10, "all six messages")
            except AssertionError:
                missing = sorted(sent - set(m.ids()))
                raise AssertionError(f"{m.user} missed {missing} (origin nodes "
                                     f"{[origin_node(i) for i in missing]})") from None
            assert sorted(m.ids()) == sorted(sent), f"{m.user}: {m.ids()}"
        for m in members:
            await m.close()
        return sent

    sent = asyncio.run(scenario())
    assert a.node_id() != b.node_id(), "two nodes got one node id"
    assert {origin_node(i) for i in sent} == {a.node_id(), b.node_id()}


def test_auto_ids_differ_and_are_leased(bed):
    nodes = [bed.start() for _ in range(3)]
    ids = [n.node_id() for n in nodes]
    assert len(set(ids)) == 3, ids
    listed = {x["url"]: x for x in nodes[0].nodes()}
    for n, nid in zip(nodes, ids):
        assert 0 <= nid <= 1023
        # the lease's value is the holder's instance id, as listed by /api/nodes
        assert lease_holder(bed.redis, nid) == listed[n.url]["id"]


def test_explicit_id_held_by_a_live_node_is_refused(bed):
    first = bed.start(node_id=5)
    assert first.node_id() == 5
    holder = lease_holder(bed.redis, 5)
    rc, out = bed.run_refused(5)
    assert rc != 0, out
    assert "node id 5 is held by the live node" in out and holder in out, out
    assert "--node-id" in out, "the message says what to do"
    # the refused node changed nothing: the first still holds it and serves
    assert lease_holder(bed.redis, 5) == holder
    assert first.alive and first.node_id() == 5


def test_node_id_released_on_clean_stop(bed):
    first = bed.start(node_id=6)
    first.sigterm()
    assert first.wait() == 0
    assert lease_holder(bed.redis, 6) is None, "a clean stop releases the node id at once"
    second = bed.start(node_id=6)
    assert second.node_id() == 6


def test_node_id_of_a_killed_node_is_taken_over(bed):
    """kill -9 leaves the lease in Redis until its TTL, but the process's Redis connections
    are gone: a node restarted with the same --node-id takes it at once."""
    first = bed.start(node_id=7)
    old = lease_holder(bed.redis, 7)
    first.kill9()
    assert lease_holder(bed.redis, 7) == old, "the lease outlives the process"
    second = bed.start(node_id=7)
    assert second.node_id() == 7
    assert lease_holder(bed.redis, 7) not in (None, old)


def test_lost_lease_drains_and_exits(bed):
    """Another node holds our id now (as when Redis was unreachable for longer than the
    lease's TTL): the node drains (1012) and exits non-zero rather than mint colliding ids."""
    node = bed.start(node_id=8)

    async def scenario():
        m = Member(bed.secret, "lost", "u")
        await m.connect(node.url)
        bed.redis.cmd("SET", "chat:nodeid:8", "0123456789abcdef0123456789abcdef")
        await m.wait_for(lambda x: x.closed.is_set(), 10, "the drain")
        assert m.close_code == 1012, m.close_code

    asyncio.run(scenario())
    rc = node.wait()
    assert rc == 1, f"exit status {rc}"
    assert "node_id_lease_lost node_id=8" in tail(node.log)


def test_waits_for_redis_at_start(bed):
    """Redis down at start: the node does not listen (it has no node id) until Redis
    answers, then takes one and serves."""
    bed.redis.stop()
    n = bed.start(wait=False)
    wait_until(lambda: "node_id_lease want=auto: waiting for the bus" in tail(n.log), 10,
               "the node to wait for Redis")
    assert n.alive
    assert "listening" not in tail(n.log)
    with pytest.raises(requests.ConnectionError):
        n.session.get(n.http + "/healthz", timeout=1)
    bed.redis.start()  # the same port
    wait_until(lambda: "listening" in tail(n.log), 15, "the node to listen")
    assert n.session.get(n.http + "/healthz", timeout=5).status_code == 200
    assert 0 <= n.node_id() <= 1023
