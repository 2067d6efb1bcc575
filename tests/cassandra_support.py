"""One real Cassandra per test session, and a fresh, migrated keyspace per test, fast.

Used by the functional suite when CHAT_TEST_STORE=cassandra, and by tests/cassandra/:

    ensure_cassandra() -> port     start (or reuse) the session's node via scripts/cassandra
    new_store_url() -> url         "cassandra://127.0.0.1:PORT/ks_..." , empty and migrated
    drop_store(url)                give the keyspace back (it is emptied and reused)

The one idea: schema changes are the slow part of Cassandra (about 0.35 s to create a
keyspace and its tables, as much again to drop it; a table holds about a megabyte of
heap, so a session cannot keep hundreds), while TRUNCATE of four small tables is a few tens
of milliseconds. So keyspaces are created by `chatctl migrate` (the same code as `make
create-models`) a few at a time in a background thread, and recycled: drop_store truncates
the tables in the background and puts the keyspace back in the pool. A test waits only when
the pool is empty.

Environment: CHAT_TEST_CASSANDRA_PORT (default 19042) and CHAT_TEST_CASSANDRA_DIR (default
/tmp/scalable-chat-cassandra-PORT) choose the node. A node already running there (for
example started once by the Makefile for every suite) is used and left running; otherwise
the directory is emptied, a node started, and when the Python process exits it is stopped
and its directory removed. CHATCTL_BIN, else the chatctl next to
CHATD_BIN, else build/chatctl, creates the keyspaces.
"""

import atexit
import os
import queue
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "cassandra"
TABLES = ("messages_by_chat", "chat_buckets", "message_client_ids", "read_positions")
# the Kafka outbox's tables: emptied only in keyspaces handed out for a chatd with --kafka
OUTBOX_TABLES = ("outbox", "outbox_done", "outbox_lease", "outbox_depth")
POOL_TARGET = 3  # keyspaces kept ready ahead of the tests

_lock = threading.Lock()
_state = {"port": None, "started_here": False, "dir": None}
_pool = None


# ---- the node ---------------------------------------------------------------------------


def cassandra_port():
    return int(os.environ.get("CHAT_TEST_CASSANDRA_PORT", "19042"))


def cassandra_dir(port=None):
    port = port or cassandra_port()
    return os.environ.get("CHAT_TEST_CASSANDRA_DIR", f"/tmp/scalable-chat-cassandra-{port}")


def script(*args, check=True, timeout=600):
    """Run scripts/cassandra; returns the CompletedProcess (stdout+stderr merged)."""
    p = subprocess.run(
        ["bash", str(SCRIPT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise RuntimeError(
            f"scripts/cassandra {' '.join(args)} failed ({p.returncode}):\n{p.stdout}")
    return p


def ensure_cassandra():
    """The session's Cassandra port; starts the node on first use. Idempotent."""
    with _lock:
        if _state["port"]:
            return _state["port"]
        port = cassandra_port()
        d = cassandra_dir(port)
        running = script("status", "--port", str(port), "--dir", d, check=False).returncode == 0
        if not running:
            # a node of ours that is not running: start from nothing, not from the keyspaces
            # a crashed session left behind (each table holds heap)
            shutil.rmtree(d, ignore_errors=True)
        t0 = time.monotonic()
        out = script("start", "--port", str(port), "--dir", d).stdout
        if not running:
            _state["started_here"] = True
            atexit.register(_stop_node, port, d)
            print(f"cassandra_support: started Cassandra on port {port} in "
                  f"{time.monotonic() - t0:.1f}s ({out.strip().splitlines()[-1]})")
        _state["port"] = port
        _state["dir"] = d
        return port


def _stop_node(port, d):
    if _pool:
        _pool.stop(drop=False)  # the node and its data go away with the session
    script("stop", "--port", str(port), "--dir", d, check=False)
    shutil.rmtree(d, ignore_errors=True)


# ---- a minimal CQL client (native protocol v4) for TRUNCATE and DROP ----------------------
# Independent of our C client on purpose, and small: OPTIONS is not needed, STARTUP, then
# QUERY at consistency ONE, reading one answer at a time.


class MiniCQL:
    def __init__(self, port, host="127.0.0.1", user=None, password=None, timeout=60):
        self.s = socket.create_connection((host, port), timeout=timeout)
        body = struct.pack(">H", 1) + _string("CQL_VERSION") + _string("3.0.0")
        op, payload = self._call(0x01, body)
        if op == 0x03:  # AUTHENTICATE
            token = b"\0" + (user or "").encode() + b"\0" + (password or "").encode()
            op, payload = self._call(0x0F, struct.pack(">i", len(token)) + token)
            if op != 0x10:
                raise RuntimeError(f"authentication failed: {_error_text(op, payload)}")
        elif op != 0x02:
            raise RuntimeError(f"STARTUP: {_error_text(op, payload)}")

    def _call(self, opcode, body):
        self.s.sendall(struct.pack(">BBhBI", 4, 0, 0, opcode, len(body)) + body)
        hdr = self._read(9)
        _, _, _, op, n = struct.unpack(">BBhBI", hdr)
        return op, self._read(n)

    def _read(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise RuntimeError("connection closed by Cassandra")
            buf += chunk
        return buf

    def query(self, q, consistency=0x0001):
        qb = q.encode()
        body = struct.pack(">i", len(qb)) + qb + struct.pack(">HB", consistency, 0)
        op, payload = self._call(0x07, body)
        if op != 0x08:
            raise RuntimeError(f"{q}: {_error_text(op, payload)}")
        return payload

    def close(self):
        self.s.close()


def _string(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def _error_text(op, payload):
    if op == 0x00 and len(payload) >= 6:
        code, n = struct.unpack(">iH", payload[:6])
        return f"error 0x{code:04x}: {payload[6:6 + n].decode('utf-8', 'replace')}"
    return f"unexpected opcode 0x{op:02x}"


# ---- the keyspace pool ---------------------------------------------------------------------


def chatctl_bin():
    if os.environ.get("CHATCTL_BIN"):
        return os.environ["CHATCTL_BIN"]
    if os.environ.get("CHATD_BIN"):
        p = Path(os.environ["CHATD_BIN"]).parent / "chatctl"
        if p.exists():
            return str(p)
    return str(REPO / "build" / "chatctl")


def migrate(url, extra_env=None):
    """chatctl migrate --store url; returns the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update(extra_env or {})
    return subprocess.run(
        [chatctl_bin(), "migrate", "--store", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=120,
    )


class KeyspacePool:
    """Keyspaces ready for tests; a thread creates and recycles them."""

    def __init__(self, port):
        self.port = port
        self.ready = queue.Queue()
        self.dirty = queue.Queue()
        self.created = []
        self.outbox_used = set()
        self.n_created = 0
        self.error = None
        self.waits = []  # seconds each new_store_url() waited
        self.stopping = False
        self.wake = threading.Event()
        self.cql = None
        self.t = threading.Thread(target=self._run, name="keyspace-pool", daemon=True)
        self.t.start()

    def url(self, ks):
        return f"cassandra://127.0.0.1:{self.port}/{ks}"

    def _run(self):
        try:
            self.cql = MiniCQL(self.port)
            while not self.stopping:
                if not self.dirty.empty():
                    self._recycle(self.dirty.get())
                elif self.ready.qsize() < POOL_TARGET:
                    self._create()
                else:
                    self.wake.wait(0.5)
                    self.wake.clear()
        except Exception as e:  # reported to the next caller of take()
            self.error = e
            self.ready.put(None)

    def _create(self):
        self.n_created += 1
        ks = f"ct_{os.getpid()}_{self.n_created}"
        p = migrate(self.url(ks))
        if p.returncode != 0:
            raise RuntimeError(f"chatctl migrate failed for {ks}:\n{p.stdout}")
        self.created.append(ks)
        self.ready.put(ks)

    def _recycle(self, ks):
        extra = OUTBOX_TABLES if ks in self.outbox_used else ()
        self.outbox_used.discard(ks)
        for t in TABLES + extra:
            self.cql.query(f"TRUNCATE {ks}.{t}", consistency=0x0005)  # ALL: every replica
        self.ready.put(ks)

    def take(self, timeout=120):
        t0 = time.monotonic()
        self.wake.set()
        try:
            ks = self.ready.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"no keyspace ready within {timeout}s") from None
        if ks is None:
            raise RuntimeError(f"keyspace pool failed: {self.error}")
        self.waits.append(time.monotonic() - t0)
        self.wake.set()
        return ks

    def give_back(self, ks):
        self.dirty.put(ks)
        self.wake.set()

    def stop(self, drop=True):
        """Stop the thread; drop every keyspace this pool created (for a node that outlives
        the session)."""
        self.stopping = True
        self.wake.set()
        self.t.join(timeout=60)
        try:
            if not drop:
                raise StopIteration
            c = MiniCQL(self.port, timeout=120)
            for ks in self.created:
                c.query(f"DROP KEYSPACE IF EXISTS {ks}")
            c.close()
        except StopIteration:
            pass
        except Exception as e:
            print(f"cassandra_support: dropping the test keyspaces failed: {e}")
        if self.waits:
            w = sorted(self.waits)
            print(f"cassandra_support: {len(w)} keyspaces handed out, {self.n_created} created; "
                  f"wait p50 {w[len(w) // 2] * 1000:.0f} ms, max {w[-1] * 1000:.0f} ms")


def _get_pool():
    global _pool
    port = ensure_cassandra()
    with _lock:
        if _pool is None:
            _pool = KeyspacePool(port)
            if not _state["started_here"]:
                atexit.register(_pool.stop)
        return _pool


def new_store_url(outbox=False):
    """A fresh, empty, migrated keyspace on the session's node, as a store URL. outbox: for a
    chatd with --kafka (its outbox tables are emptied too before the keyspace is reused)."""
    pool = _get_pool()
    ks = pool.take()
    if outbox:
        pool.outbox_used.add(ks)
    return pool.url(ks)


def drop_store(url):
    """Return a keyspace from new_store_url(); its tables are emptied before it is reused.
    The chatd that used it must have exited."""
    ks = url.rsplit("/", 1)[-1].split("?", 1)[0]
    _get_pool().give_back(ks)


def pool_stats():
    """(handed out, created, waits in seconds) so far."""
    p = _pool
    return (len(p.waits), p.n_created, list(p.waits)) if p else (0, 0, [])
