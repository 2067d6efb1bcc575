"""Fixtures for the cluster suite: a real redis-server on a free loopback port and three real
chatd nodes (node ids 1-3, --bus redis://...) sharing one SQLite file in the test's tmp dir.

The one idea: every test gets a fresh cluster, and teardown insists that every node the
test did not kill on purpose still runs and exits 0 on SIGTERM (a drain), so a crash or a
hang anywhere in a test is a failure, with the nodes' logs printed.
"""

import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clusterlib import Node, Redis, tail  # noqa: E402


class Cluster:
    def __init__(self, tmp):
        self.tmp = Path(tmp)
        self.secret = secrets.token_hex(24)
        self.store = f"sqlite:{self.tmp}/chat.db"
        self.redis = Redis(self.tmp)
        self.nodes = []
        try:
            for i in (1, 2, 3):
                self.nodes.append(Node(i, self.tmp, self.redis, self.store, self.secret))
        except BaseException:
            self.kill_all()
            raise

    def node(self, i):
        """Node by its node id (1..3)."""
        return self.nodes[i - 1]

    def node_by_url(self, url):
        for n in self.nodes:
            if url == n.url or url.startswith(n.url + "/"):
                return n
        raise AssertionError(f"{url} is no node of this cluster")

    def logs(self):
        parts = [f"---- chatd{n.idx} ----\n{tail(n.log)}" for n in self.nodes]
        parts.append(f"---- redis ----\n{tail(self.redis.log, 20)}")
        return "\n".join(parts)

    def kill_all(self):
        for n in self.nodes:
            if n.alive:
                n.proc.kill()
                n.proc.wait(5)
        self.redis.stop()

    def shutdown(self):
        """SIGTERM every node that should still run; returns the problems found."""
        problems = []
        for n in self.nodes:
            n.session.close()
        for n in self.nodes:
            if n.killed:
                continue
            if not n.alive:
                if n.proc.returncode != 0:
                    problems.append(f"chatd{n.idx} exited with {n.proc.returncode}")
                continue
            n.sigterm()
        for n in self.nodes:
            if n.killed or n.proc.returncode is not None:
                continue
            try:
                rc = n.wait()
            except AssertionError as e:
                problems.append(str(e))
                continue
            if rc != 0:
                problems.append(f"chatd{n.idx} exited with {rc} after SIGTERM")
        self.redis.stop()
        return problems


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def cluster(tmp_path, request):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        problems = c.shutdown()
        failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
        if failed or problems:
            print(c.logs())
        if problems:
            pytest.fail("cluster teardown: " + "; ".join(problems))
