"""Fixtures for the Cassandra suite: the session's real Cassandra 5.0 (scripts/cassandra),
a fresh migrated keyspace per test, the real build/chatd on it, and the DataStax Python
driver (cassandra-driver) as an independent reader and writer.

The one idea: chatd is checked against a client that shares none of its code. Whatever
chatd writes, the DataStax driver must read back exactly; whatever the driver writes in
the documented schema, chatd must serve.

CHATD_BIN / CHATCTL_BIN choose other builds (default build/chatd, build/chatctl).
"""

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "functional"))

import cassandra_support as cs  # noqa: E402
from helpers import Client, mint_token  # noqa: E402

REPO = HERE.parents[1]
CHATD = Path(os.environ.get("CHATD_BIN", REPO / "build" / "chatd")).resolve()
LISTEN_RE = re.compile(r"listening.*\bport=(\d+)")
BUCKET_MS = 10 * 86400 * 1000
EPOCH_MS = 1577836800000

warnings.filterwarnings("ignore", category=DeprecationWarning)


def snowflake(ms, seq=0, node=7):
    """A message id at Unix time ms, as chatd makes them (41 bits ms, 10 node, 12 seq)."""
    return ((ms - EPOCH_MS) << 22) | (node << 12) | seq


def id_ms(message_id):
    return (int(message_id) >> 22) + EPOCH_MS


def bucket_of(message_id):
    return id_ms(message_id) // BUCKET_MS


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update(extra or {})
    return env


class Chatd:
    """One real chatd on a store URL, its output drained by a thread."""

    def __init__(self, store, secret=None, args=(), expect_start=True):
        if not CHATD.exists():
            pytest.fail(f"{CHATD} does not exist: run `make` first")
        self.store = store
        self.secret = secret or secrets.token_hex(16)
        self.argv = [str(CHATD), "--port", "0", "--host", "127.0.0.1", "--store", store,
                     "--jwt-secret", self.secret, *args]
        self.p = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, env=clean_env(), cwd=str(REPO))
        self.out = []
        self.lock = threading.Lock()
        self.t = threading.Thread(target=self._drain, daemon=True)
        self.t.start()
        self.port = None
        self.clients = []
        self.http = requests.Session()
        self.http.trust_env = False
        if expect_start:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                m = LISTEN_RE.search(self.log)
                if m:
                    self.port = int(m.group(1))
                    break
                if self.p.poll() is not None:
                    break
                time.sleep(0.02)
            if not self.port:
                self.kill()
                pytest.fail(f"chatd did not start on {store}\n--- log ---\n{self.log}")

    def _drain(self):
        for line in iter(self.p.stdout.readline, b""):
            with self.lock:
                self.out.append(line.decode("utf-8", "replace"))

    @property
    def log(self):
        with self.lock:
            return "".join(self.out)

    def wait_exit(self, timeout=15):
        rc = self.p.wait(timeout=timeout)
        self.t.join(2)
        return rc

    def token(self, user):
        return mint_token(self.secret, user)

    def client(self, chat, user):
        c = Client(f"ws://127.0.0.1:{self.port}/ws/chat/{chat}?token={self.token(user)}", user=user)
        self.clients.append(c)
        return c

    def get(self, path, user="reader", **kw):
        return self.http.get(f"http://127.0.0.1:{self.port}{path}",
                             headers={"Authorization": f"Bearer {self.token(user)}"},
                             timeout=20, **kw)

    def post(self, path, user, body):
        return self.http.post(f"http://127.0.0.1:{self.port}{path}", json=body,
                              headers={"Authorization": f"Bearer {self.token(user)}"}, timeout=20)

    def history(self, chat, **params):
        r = self.get(f"/api/chats/{chat}/messages", params=params)
        assert r.status_code == 200, (r.status_code, r.text)
        return r.json()

    def all_history(self, chat, limit=200):
        out, before = [], None
        for _ in range(1000):
            params = {"limit": limit}
            if before is not None:
                params["before"] = before
            page = self.history(chat, **params)
            out.extend(page["messages"])
            before = page["next_before"]
            if before is None:
                return out
        raise AssertionError("history paging does not end")

    def stop(self):
        for c in self.clients:
            c.close()
        self.clients = []
        self.http.close()
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.wait_exit(15)
        except subprocess.TimeoutExpired:
            self.kill()
            return "hung"

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)


@pytest.fixture(scope="session")
def cassandra_port():
    return cs.ensure_cassandra()


@pytest.fixture
def store_url(cassandra_port):
    url = cs.new_store_url()
    yield url
    cs.drop_store(url)


@pytest.fixture
def chatd_factory():
    """chatd_factory(store, **kw) -> a running Chatd; each must exit 0 on SIGTERM."""
    servers = []

    def start(store, **kw):
        s = Chatd(store, **kw)
        servers.append(s)
        return s

    yield start
    bad = []
    for s in servers:
        if s.p.poll() is None or s.port:
            rc = s.stop()
            if rc not in (0, None) and s.port:
                bad.append(f"chatd exited with {rc}\n--- log ---\n{s.log[-8000:]}")
    if bad:
        pytest.fail("\n".join(bad))


@pytest.fixture
def driver_session(cassandra_port):
    """A DataStax Python driver session on the session's node."""
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import RoundRobinPolicy

    profile = ExecutionProfile(load_balancing_policy=RoundRobinPolicy(), request_timeout=30)
    cluster = Cluster(["127.0.0.1"], port=cassandra_port, protocol_version=4,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    session = cluster.connect()
    yield session
    cluster.shutdown()


def keyspace_of(url):
    return url.rsplit("/", 1)[-1].split("?", 1)[0]


class PrivateNode:
    """A Cassandra of its own (another port and directory), for tests that stop it or need
    PasswordAuthenticator. Started with --auth: the superuser is cassandra/cassandra."""

    def __init__(self):
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.dir = f"/tmp/scalable-chat-cassandra-private-{os.getpid()}"
        self.start()

    def start(self):
        t0 = time.monotonic()
        cs.script("start", "--port", str(self.port), "--dir", self.dir, "--auth")
        self.start_seconds = time.monotonic() - t0

    def stop(self):
        cs.script("stop", "--port", str(self.port), "--dir", self.dir)

    def url(self, ks, user="cassandra", password="cassandra", query=""):
        cred = f"{user}:{password}@" if user is not None else ""
        return f"cassandra://{cred}127.0.0.1:{self.port}/{ks}{query}"


@pytest.fixture(scope="session")
def private_node():
    node = PrivateNode()
    yield node
    node.stop()
    subprocess.run(["rm", "-rf", node.dir], check=False)
