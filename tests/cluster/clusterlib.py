"""The pieces of a real cluster for the tests: redis-server, chatd nodes, tokens, a tiny Redis
client and an asyncio WebSocket chat member.

The one idea: nothing here trusts the C code. Tokens are signed with hmac, Redis is spoken
to in RESP over a socket, and a Member keeps every event it ever received (across
reconnects) so the tests can check exactly-once and ordering on the raw record.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

REPO = Path(__file__).resolve().parents[2]
# CLUSTER_CHATD: another build of chatd to test (e.g. build/asan/chatd)
CHATD = Path(os.environ.get("CLUSTER_CHATD") or REPO / "build" / "chatd")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


# ---- tokens (HS256, independent of chatctl) -----------------------------------------------------


def b64url(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def mint_token(secret, user, ttl=3600, chats=None):
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT"}
    payload = {"sub": user, "iat": now, "exp": now + ttl}
    if chats is not None:
        payload["chats"] = list(chats)
    signing = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(payload, separators=(",", ":")).encode())
    )
    sig = hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest()
    return signing + "." + b64url(sig)


# ---- processes --------------------------------------------------------------------------------


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port(block=1):
    """A port (or the first of `block` consecutive ones) that is free now, below the
    kernel's ephemeral range: a fixed port chosen now and listened on later must not be
    taken meanwhile by some outgoing connection's local port (or by redis-server's
    restart coming back to it)."""
    low = max(10000, _ephemeral_low() - 1000)
    for _ in range(500):
        base = random.randrange(10000, low - block)
        if all(port_free(p) for p in range(base, base + block)):
            return base
    raise AssertionError("no free port below the ephemeral range")


def clean_env(extra=None):
    """No CHAT_* from the caller's environment: the flags alone configure the nodes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update(extra or {})
    return env


def wait_until(pred, timeout, what, interval=0.05):
    """Poll pred() until it is truthy; a safety net, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def tail(path, n=60):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class Redis:
    """redis-server on a fixed loopback port, no persistence. kill9() + start() = a restart
    on the same port (what the nodes must survive)."""

    def __init__(self, tmp):
        self.dir = Path(tmp) / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = None
        self.log = self.dir / "redis.log"
        self.start()

    def start(self):
        assert self.proc is None or self.proc.poll() is not None
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
        out.close()

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited:\n{tail(self.log)}")
            try:
                return self.cmd("PING") == "PONG"
            except OSError:
                return False

        wait_until(up, START_TIMEOUT, "redis-server to answer PING")

    def kill9(self):
        self.proc.kill()
        self.proc.wait(5)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def cmd(self, *args):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            parts = [f"*{len(args)}\r\n".encode()]
            for a in args:
                b = str(a).encode()
                parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
            s.sendall(b"".join(parts))
            return _resp_read(s.makefile("rb"))

    def numsub(self, channel):
        reply = self.cmd("PUBSUB", "NUMSUB", channel)
        return int(reply[1])


def _resp_read(f):
    line = f.readline()
    if not line:
        raise OSError("redis closed the connection")
    kind, rest = line[:1], line[1:].rstrip(b"\r\n")
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2].decode()
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_resp_read(f) for _ in range(n)]
    raise OSError(f"bad RESP reply {line!r}")


class Node:
    """One chatd of the cluster: node id, fixed port, --public-url, the Redis bus, the shared
    SQLite store. Its combined output goes to a log file in the test's tmp dir."""

    def __init__(self, idx, tmp, redis, store, secret, extra_args=()):
        self.idx = idx
        self.extra_args = list(extra_args)  # more chatd flags, e.g. --replay-limit
        self.redis = redis
        self.store = store
        self.secret = secret
        self.port = free_port()
        self.log = Path(tmp) / f"chatd{idx}.log"
        self.proc = None
        self.killed = False
        self.session = requests.Session()
        self.session.trust_env = False
        # No idle keep-alive connection left behind: a drain would wait out its grace period
        # for it (and closing the session does not close pooled sockets at once with every
        # urllib3 version).
        self.session.headers["Connection"] = "close"
        self.start()

    @property
    def url(self):
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self):
        return f"http://127.0.0.1:{self.port}"

    def argv(self):
        return [
            str(CHATD), "--host", "127.0.0.1", "--port", str(self.port),
            "--public-url", self.url, "--node-id", str(self.idx),
            "--store", self.store, "--bus", f"redis://127.0.0.1:{self.redis.port}",
            "--jwt-secret", self.secret,
        ] + self.extra_args

    def start(self):
        if not CHATD.exists():
            raise AssertionError(f"{CHATD} does not exist: run `make` first")
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, env=clean_env())
        out.close()
        self.killed = False

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"chatd{self.idx} exited with {self.proc.returncode}:\n{tail(self.log)}")
            try:
                return self.session.get(self.http + "/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(up, START_TIMEOUT, f"chatd{self.idx} /healthz")

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        self.proc.kill()
        self.proc.wait(5)
        self.killed = True

    def sigterm(self):
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout=STOP_TIMEOUT):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(
                f"chatd{self.idx} did not exit within {timeout}s:\n{tail(self.log)}")

    def get(self, path, user="tester", **kw):
        headers = {"Authorization": f"Bearer {mint_token(self.secret, user)}"}
        return self.session.get(self.http + path, headers=headers, timeout=10, **kw)

    def post(self, path, body, user="tester"):
        headers = {"Authorization": f"Bearer {mint_token(self.secret, user)}"}
        return self.session.post(self.http + path, json=body, headers=headers, timeout=10)

    def nodes(self):
        r = self.get("/api/nodes")
        assert r.status_code == 200, (r.status_code, r.text)
        return r.json()["nodes"]

    def node_urls(self):
        """The URLs in /api/nodes, or None while the registry cannot be read (503: the bus
        is reconnecting)."""
        r = self.get("/api/nodes")
        if r.status_code == 503:
            return None
        assert r.status_code == 200, (r.status_code, r.text)
        return sorted(x["url"] for x in r.json()["nodes"])

    def connect_info(self, chat, user="tester"):
        r = self.get("/api/connect", user=user, params={"chat_id": chat})
        assert r.status_code == 200, (r.status_code, r.text)
        return r.json()

    def history(self, chat):
        """Every message of the chat in the store, oldest first."""
        out, before = [], None
        for _ in range(1000):
            params = {"limit": 200}
            if before is not None:
                params["before"] = before
            r = self.get(f"/api/chats/{chat}/messages", params=params)
            assert r.status_code == 200, (r.status_code, r.text)
            page = r.json()
            out.extend(page["messages"])
            before = page["next_before"]
            if before is None:
                return list(reversed(out))
        raise AssertionError("history paging does not end")


def origin_node(message_id):
    """The node id inside a message id (ms << 22 | node << 12 | sequence)."""
    return (int(message_id) >> 12) & 1023


# ---- members ----------------------------------------------------------------------------------


class Member:
    """One user in one chat, over one or more successive WebSocket connections.

    events: every message:message event received, in arrival order, over all connections;
    acks: client_id -> message_id of this member's own messages (its copy is the ack)."""

    def __init__(self, secret, chat, user):
        self.secret = secret
        self.chat = chat
        self.user = user
        self.ws = None
        self.url = None
        self.events = []
        self.others = []  # anything that is not a message:message event
        self.acks = {}
        self.close_code = None
        self.closed = asyncio.Event()
        self.changed = asyncio.Event()
        self.reader = None
        self.connections = 0
        self.since = None
        self.sinces = {}  # connection number -> the since= it was opened with

    # ---- connection ----
    def ws_url(self, base, since=None):
        url = f"{base}/ws/chat/{self.chat}?token={mint_token(self.secret, self.user)}"
        if since is not None:
            url += f"&since={since}"
        return url

    async def connect(self, base=None, full_url=None, since=None, compression=None):
        """base: ws://host:port of a node; full_url: a ws_url from /api/connect;
        compression="deflate" offers permessage-deflate."""
        if full_url is not None:
            sep = "&" if "?" in full_url else "?"
            url = f"{full_url}{sep}token={mint_token(self.secret, self.user)}"
            if since is not None:
                url += f"&since={since}"
        else:
            url = self.ws_url(base, since)
        self.ws = await connect(url, open_timeout=10, ping_interval=None, compression=compression,
                                proxy=None, max_size=None, close_timeout=5)
        self.url = url
        self.since = since
        self.connections += 1
        self.sinces[self.connections] = since
        self.close_code = None
        self.closed = asyncio.Event()
        self.reader = asyncio.create_task(self._read(self.ws, self.closed))

    async def _read(self, ws, closed):
        try:
            async for raw in ws:
                ev = json.loads(raw)
                if ev.get("event") == "message:message":
                    ev["_conn"] = self.connections  # which connection brought it
                    self.events.append(ev)
                    if ev.get("user_from") == self.user and ev.get("client_id"):
                        self.acks.setdefault(ev["client_id"], ev["message_id"])
                else:
                    self.others.append(ev)
                self.changed.set()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = ws.close_code
            closed.set()
            self.changed.set()

    async def close(self):
        if self.ws is not None:
            await self.ws.close()
            if self.reader:
                await self.reader

    async def send(self, text, client_id):
        await self.ws.send(json.dumps({"event": "message:message", "message": text,
                                       "client_id": client_id}))

    # ---- what it saw ----
    def ids(self):
        return [e["message_id"] for e in self.events]

    def max_id(self):
        return max((int(i) for i in self.ids()), default=None)

    def cursors(self):
        """since= in its list form: the newest id seen from each origin node (bits 12..21 of
        a message id). Each node delivers its own messages in id order, so this names
        exactly what was seen, even though messages of different nodes interleave."""
        newest = {}
        for i in self.ids():
            node = (int(i) >> 12) & 1023
            newest[node] = max(newest.get(node, 0), int(i))
        return ",".join(str(v) for v in sorted(newest.values())) or None

    async def wait_for(self, pred, timeout, what):
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if pred(self):
                return
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(
                    f"{self.user}@{self.chat}: timed out after {timeout}s waiting for {what} "
                    f"(has {len(self.events)} events, close code {self.close_code})")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass

    async def wait_ids(self, ids, timeout=30):
        want = set(ids)
        try:
            await self.wait_for(lambda m: want <= set(m.ids()), timeout,
                                f"{len(want)} messages")
        except AssertionError as e:
            missing = sorted(want - set(self.ids()), key=int)
            lines = [str(e), f"  {len(missing)} missing; connections={self.connections} "
                             f"last since={self.since}"]
            for i in missing[:6]:
                first = None if self.since is None else int(str(self.since).split(",")[0])
                rel = "" if first is None else (
                    " (below since)" if int(i) <= first else " (above since)")
                lines.append(f"  missing {i} (node {origin_node(i)}){rel}")
            raise AssertionError("\n".join(lines)) from None


async def wait_all(members, ids, timeout=30):
    await asyncio.gather(*(m.wait_ids(ids, timeout) for m in members))


def describe_duplicates(m):
    """For an assertion message: each duplicated id, its origin node, and which connection
    (1 = first, 2 = after a reconnect with since=) brought each copy."""
    dup = set(duplicates(m.ids()))
    lines = [f"{m.user}: {len(dup)} duplicated ids"]
    for i in sorted(dup, key=int)[:6]:
        conns = [ev["_conn"] for ev in m.events if ev["message_id"] == i]
        sinces = {c: m.sinces.get(c) for c in conns}
        lines.append(f"  {i} (node {origin_node(i)}) via connections {conns} "
                     f"opened with since={sinces}")
    return "\n".join(lines)


def duplicates(ids):
    seen, dup = set(), []
    for i in ids:
        if i in seen:
            dup.append(i)
        seen.add(i)
    return dup
