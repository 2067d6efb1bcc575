"""The fault soak: three chatd nodes on a real redis-server and one shared store, 24 clients
in 4 chats sending at a steady rate, while a node is killed (-9) or drained (SIGTERM) and
restarted, or Redis is restarted, every ~6 s. Then a quiet period, and the record of every
client is checked: nothing acknowledged lost, nothing stored twice, no gap, no repeat.

The clients do what the README tells a client to do, nothing more: every message carries a
unique client_id and is resent with the same client_id after a reconnect until its echo
(the acknowledgement) arrives; a lost connection is replaced through
`GET /api/connect?chat_id=` with one cursor per origin node (`since=ID1,ID2,...`, the newest
id seen from each node, node = bits 12-21 of the id); an `error` event `replay_too_large`
is answered by paging `GET /api/chats/{id}/messages` over exactly the range the replay
would have covered, while the live events go on.

The one idea: the clients keep the raw record (every WebSocket delivery, on which
connection, opened with which cursors; every fault; every reconnect) and the checks are
made on that record against the store's history, so that a failure prints what the people
fixing it need: which message, which client, which connections and faults around it.

Durations: `make test` runs a short soak (SOAK_SECONDS=36 of faults; SOAK_RATES=6,6,18,18
msg/s in the four chats; SQLite; --replay-limit 150, so that resumes in the busy chats can
take the REST fallback while those in the calm ones are replayed); `make soak` a long one
(SOAK_SECONDS=90, 40 msg/s in every chat, Cassandra, chatd's default --replay-limit). The
fault order comes from a seeded RNG (SOAK_SEED), the kinds from SOAK_FAULTS (default
kill9,drain,redis); every wait is bounded.
"""

import asyncio
import collections
import concurrent.futures
import json
import os
import random
import secrets
import sys
import time
from pathlib import Path

import pytest
import requests
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from clusterlib import Node, Redis, mint_token, origin_node, tail

FAULT_SECONDS = float(os.environ.get("SOAK_SECONDS", "36"))
# messages per second in each of the 4 chats: two calm chats, whose resumes fit in the
# replay, and two busy ones, whose resumes can exceed --replay-limit (the REST fallback)
RATES = [float(x) for x in os.environ.get("SOAK_RATES", "6,6,18,18").split(",")]
STORE = os.environ.get("SOAK_STORE", "sqlite")  # sqlite | cassandra
SEED = int(os.environ.get("SOAK_SEED", "12"))
REPLAY_LIMIT = os.environ.get("SOAK_REPLAY_LIMIT", "150")  # "" = chatd's default
# the kinds of fault to draw from (one of them, to chase one failure)
FAULTS = os.environ.get("SOAK_FAULTS", "kill9,drain,redis").split(",")
CHATS = len(RATES)
PER_CHAT = 6
FAULT_EVERY = 6.0
DOWN_SECONDS = 1.0  # between a kill -9 (of a node or Redis) and its restart
REPLAY_MARGIN_MS = 10000  # README: unnamed origins are replayed from 10 s before the oldest cursor
RECONNECT_DEADLINE = 60.0
QUIET_DEADLINE = 60.0  # for every client to be connected, acknowledged and filled after the faults
CONVERGE_DEADLINE = 30.0
PAGE = 200
ID_EPOCH_MS = 1577836800000


def id_ms(i):
    return (int(i) >> 22) + ID_EPOCH_MS


# ---- the cluster ------------------------------------------------------------------------


class SoakCluster:
    """Redis, the shared store, nodes 1-3. Teardown drains every node and insists on exit 0."""

    def __init__(self, tmp):
        self.tmp = Path(tmp)
        self.secret = secrets.token_hex(24)
        self.owned_store = None
        if STORE == "cassandra":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            import cassandra_support  # noqa: E402

            self.store = self.owned_store = cassandra_support.new_store_url()
        else:
            self.store = f"sqlite:{self.tmp}/chat.db"
        extra = ["--replay-limit", REPLAY_LIMIT] if REPLAY_LIMIT else []
        self.redis = Redis(self.tmp)
        self.nodes = []
        try:
            for i in (1, 2, 3):
                self.nodes.append(Node(i, self.tmp, self.redis, self.store, self.secret, extra))
        except BaseException:
            self.kill_all()
            raise

    def logs(self, n=40):
        parts = [f"---- chatd{x.idx} ----\n{tail(x.log, n)}" for x in self.nodes]
        parts.append(f"---- redis ----\n{tail(self.redis.log, 10)}")
        return "\n".join(parts)

    def kill_all(self):
        for x in self.nodes:
            if x.alive:
                x.proc.kill()
                x.proc.wait(5)
        self.redis.stop()

    def shutdown(self):
        problems = []
        for x in self.nodes:
            x.session.close()
            if x.alive:
                x.sigterm()
        for x in self.nodes:
            if x.proc.returncode is not None and not x.alive:
                continue
            try:
                rc = x.wait()
            except AssertionError as e:
                problems.append(str(e))
                continue
            if rc != 0:
                problems.append(f"chatd{x.idx} exited with {rc} after SIGTERM")
        self.redis.stop()
        if self.owned_store:
            import cassandra_support  # noqa: E402

            cassandra_support.drop_store(self.owned_store)
        return problems


@pytest.fixture
def soak_cluster(tmp_path, request):
    c = SoakCluster(tmp_path)
    try:
        yield c
    finally:
        problems = c.shutdown()
        rep = getattr(request.node, "rep_call", None)  # set by conftest.py's hook
        if (rep is not None and rep.failed) or problems:
            print(c.logs())
        if problems:
            pytest.fail("cluster teardown: " + "; ".join(problems))


def http_get(base, path, secret, user, params=None, timeout=5):
    """One GET on its own connection (none left in a pool for a drain to wait out)."""
    with requests.Session() as s:
        s.trust_env = False
        return s.get(base + path, params=params, timeout=timeout,
                     headers={"Authorization": f"Bearer {mint_token(secret, user)}",
                              "Connection": "close"})


# ---- the record -------------------------------------------------------------------------


class Soak:
    """What every party shares: the clock, the cluster, the fault timeline."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.t0 = time.time()
        self.faults = []  # (t, text)
        self.problems = []  # things that are wrong whatever the record says (e.g. a bad exit)

    def now(self):
        return time.time() - self.t0

    def rel_ms(self, ms):
        return ms / 1000.0 - self.t0

    def fault(self, text):
        self.faults.append((self.now(), text))


class Client:
    """One user in one chat, over successive WebSocket connections."""

    def __init__(self, soak, chat, user, rng):
        self.soak = soak
        self.cluster = soak.cluster
        self.chat = chat
        self.user = user
        self.rng = rng
        self.ws = None
        self.conn_no = 0
        self.conn_since = {}  # connection number -> the since= it was opened with
        self.conn_node = {}  # connection number -> node id it went to
        self.conn_open_t = {}
        self.deliveries = []  # (message_id, connection number, t, index within connection)
        self.copies = collections.Counter()
        self.first = {}  # message_id -> event, first WebSocket delivery
        self.rest_filled = {}  # message_id -> message, from the REST fallback
        self.acks = {}  # client_id -> message_id
        self.ack_conflicts = []  # (client_id, id1, id2)
        self.pending = {}  # client_id -> text, in send order: not yet acknowledged
        self.sent_on = {}  # client_id -> connection it was last sent on
        self.resent = collections.Counter()  # client_id -> times sent again after the first
        self.sends = collections.defaultdict(list)  # client_id -> [(connection, t)]
        self.sent = []  # every client_id, in order
        self.seq = 0
        self.timeline = []  # (t, text)
        self.stats = collections.Counter()
        self.unexpected = []  # events a client does not expect (bad errors)
        self.fills = []
        self.fill_sizes = []  # per REST fill: how many messages were after the cursors
        self.tasks = set()
        self.done = False
        self.closed = asyncio.Event()
        self.closed.set()

    def spawn(self, coro):
        """A task kept referenced until it ends (the loop holds tasks only weakly)."""
        t = asyncio.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        return t

    def note(self, text):
        self.timeline.append((self.soak.now(), text))

    # ---- what it has seen ----
    def seen(self):
        return set(self.first) | set(self.rest_filled)

    def cursors(self):
        newest = {}
        for i in self.seen():
            n = origin_node(i)
            newest[n] = max(newest.get(n, 0), int(i))
        return ",".join(str(v) for v in sorted(newest.values())) or None

    @property
    def connected(self):
        return self.ws is not None and not self.closed.is_set()

    # ---- connecting ----
    async def connect_somewhere(self):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECONNECT_DEADLINE
        attempt = 0
        delay = 0.1
        while True:
            asked = self.rng.choice(self.cluster.nodes)
            attempt += 1
            try:
                r = await asyncio.to_thread(http_get, asked.http, "/api/connect",
                                            self.cluster.secret, self.user,
                                            {"chat_id": self.chat})
                if r.status_code != 200:
                    raise OSError(f"/api/connect on chatd{asked.idx}: {r.status_code}")
                info = r.json()
                since = self.cursors()
                url = f"{info['ws_url']}?token={mint_token(self.cluster.secret, self.user)}"
                if since:
                    url += f"&since={since}"
                ws = await connect(url, open_timeout=5, ping_interval=None, compression=None,
                                   proxy=None, max_size=None, close_timeout=2)
            except (OSError, InvalidHandshake, asyncio.TimeoutError, requests.RequestException,
                    ValueError, KeyError) as e:
                self.stats["connect_failures"] += 1
                if loop.time() > deadline:
                    raise AssertionError(f"{self.user}@{self.chat} could not connect within "
                                         f"{RECONNECT_DEADLINE}s; last error {e!r}")
                await asyncio.sleep(delay * self.rng.uniform(0.5, 1.5))
                delay = min(delay * 2, 1.0)
                continue
            self.conn_no += 1
            self.ws = ws
            self.closed = asyncio.Event()
            node = next((n.idx for n in self.cluster.nodes if n.url == info.get("url")),
                        info.get("url"))
            self.conn_since[self.conn_no] = since
            self.conn_node[self.conn_no] = node
            self.conn_open_t[self.conn_no] = self.soak.now()
            self.note(f"conn#{self.conn_no} open on node {node} since={since}")
            self.spawn(self.read(ws, self.conn_no, self.closed))
            return

    async def read(self, ws, conn, closed):
        index = 0
        try:
            async for raw in ws:
                ev = json.loads(raw)
                kind = ev.get("event")
                if kind == "message:message":
                    i = ev["message_id"]
                    self.deliveries.append((i, conn, self.soak.now(), index))
                    index += 1
                    self.copies[i] += 1
                    self.first.setdefault(i, ev)
                    cid = ev.get("client_id")
                    if ev.get("user_from") == self.user and cid:
                        old = self.acks.setdefault(cid, i)
                        if old != i:
                            self.ack_conflicts.append((cid, old, i))
                        self.pending.pop(cid, None)
                elif kind == "error" and ev.get("code") == "replay_too_large":
                    self.stats["replay_too_large"] += 1
                    self.note(f"conn#{conn} replay_too_large (since={self.conn_since[conn]})")
                    self.fills.append(self.spawn(self.fill(conn, self.conn_since[conn])))
                elif kind == "error" and ev.get("code") == "store_unavailable" \
                        and ev.get("client_id") in self.pending:
                    # not stored, not delivered: send it again on this connection (counted
                    # as a resend: its echo may be a duplicate's if the store did take it)
                    self.stats["store_unavailable"] += 1
                    self.sent_on[ev["client_id"]] = None
                    self.spawn(self.resend_later(conn))
                elif kind != "pong":
                    self.unexpected.append((self.soak.now(), conn, ev))
        except ConnectionClosed:
            pass
        finally:
            self.note(f"conn#{conn} closed code={ws.close_code}")
            closed.set()

    async def resend_later(self, conn):
        await asyncio.sleep(0.5)
        if self.conn_no == conn and self.connected:
            await self.send_pending()

    async def send_one(self, cid):
        conn = self.conn_no
        if cid in self.sent_on:
            if self.sent_on[cid] == conn:
                return
            self.resent[cid] += 1
            self.stats["resends"] += 1
        self.sent_on[cid] = conn
        self.sends[cid].append((conn, self.soak.now()))
        try:
            await self.ws.send(json.dumps({"event": "message:message",
                                           "message": self.pending[cid], "client_id": cid}))
        except (ConnectionClosed, KeyError):
            pass  # sent again after the reconnect if never acknowledged

    async def send_pending(self):
        for cid in list(self.pending):
            if not self.connected:
                return
            if cid in self.pending:
                await self.send_one(cid)

    async def run(self):
        """Keep a connection open until done; after every (re)connect, resend what was never
        acknowledged."""
        while not self.done:
            await self.connect_somewhere()
            await self.send_pending()
            await self.closed.wait()
            if not self.done:
                self.stats["reconnects"] += 1

    def new_message(self, text=None):
        cid = f"{self.user}-{self.seq}"
        self.seq += 1
        self.pending[cid] = text or f"{self.user} says {cid}"
        self.sent.append(cid)
        return cid

    async def say(self, text=None):
        cid = self.new_message(text)
        if self.connected:
            await self.send_one(cid)
        return cid

    async def sender(self, rate, until):
        loop = asyncio.get_running_loop()
        interval = 1.0 / rate
        nxt = loop.time() + self.rng.uniform(0, interval)
        while True:
            await asyncio.sleep(max(0.0, nxt - loop.time()))
            if loop.time() >= until:
                return
            nxt += interval
            await self.say()

    # ---- the REST fallback ----
    async def fill(self, conn, since):
        """After replay_too_large: page the history back over what the replay would have
        sent (per origin, everything after its cursor; origins not named, everything from
        10 s before the oldest cursor)."""
        cursors = [int(x) for x in since.split(",")]
        by_origin = {origin_node(c): c for c in cursors}
        low = min(cursors)
        if len(cursors) > 1:
            low = max(0, low - (REPLAY_MARGIN_MS << 22))

        def after_cursor(i):
            if len(cursors) == 1:
                return i > cursors[0]
            return i > by_origin.get(origin_node(i), low)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECONNECT_DEADLINE
        got, before, pages = [], None, 0
        while True:
            params = {"limit": PAGE}
            if before is not None:
                params["before"] = before
            asked = self.rng.choice(self.cluster.nodes)
            try:
                r = await asyncio.to_thread(http_get, asked.http,
                                            f"/api/chats/{self.chat}/messages",
                                            self.cluster.secret, self.user, params)
                if r.status_code != 200:
                    raise OSError(f"history on chatd{asked.idx}: {r.status_code}")
                page = r.json()
            except (OSError, requests.RequestException, ValueError) as e:
                if loop.time() > deadline:
                    self.unexpected.append((self.soak.now(), conn, f"REST fill gave up: {e!r}"))
                    return
                await asyncio.sleep(0.3)
                continue
            pages += 1
            msgs = page["messages"]
            got.extend(m for m in msgs if after_cursor(int(m["message_id"])))
            before = page["next_before"]
            if before is None or not msgs or min(int(m["message_id"]) for m in msgs) <= low:
                break
        new = 0
        for m in got:
            if m["message_id"] not in self.first and m["message_id"] not in self.rest_filled:
                new += 1
            self.rest_filled.setdefault(m["message_id"], m)
        self.fill_sizes.append(len(got))
        self.stats["rest_pages"] += pages
        self.stats["rest_filled"] += new
        self.note(f"conn#{conn} REST fill: {pages} pages, {len(got)} in range, {new} not seen")

    async def close(self):
        self.done = True
        if self.ws is not None:
            await self.ws.close()
        await asyncio.wait_for(self.closed.wait(), 10)
        for f in self.fills:
            if not f.done():
                f.cancel()


# ---- faults -----------------------------------------------------------------------------


async def inject_faults(soak, rng, until):
    """One fault every FAULT_EVERY seconds until `until`; each fault is repaired (the node or
    Redis restarted) before the next one starts."""
    cluster = soak.cluster
    loop = asyncio.get_running_loop()
    k = 0
    while True:
        k += 1
        at = soak.started + k * FAULT_EVERY
        if at >= until:
            return
        await asyncio.sleep(max(0.0, at - loop.time()))
        kind = rng.choice(FAULTS)
        if kind == "redis":
            soak.fault("redis kill -9")
            await asyncio.to_thread(cluster.redis.kill9)
            await asyncio.sleep(DOWN_SECONDS)
            await asyncio.to_thread(cluster.redis.start)
            soak.fault("redis restarted")
        elif kind == "kill9":
            node = rng.choice(cluster.nodes)
            soak.fault(f"chatd{node.idx} kill -9")
            await asyncio.to_thread(node.kill9)
            await asyncio.sleep(DOWN_SECONDS)
            await asyncio.to_thread(node.start)
            soak.fault(f"chatd{node.idx} restarted")
        else:
            node = rng.choice(cluster.nodes)
            soak.fault(f"chatd{node.idx} SIGTERM (drain)")
            node.sigterm()
            try:
                rc = await asyncio.to_thread(node.wait)
            except AssertionError as e:
                soak.problems.append(f"drain of chatd{node.idx}: {e}")
                rc = None
            soak.fault(f"chatd{node.idx} exited {rc}")
            if rc not in (0, None):
                soak.problems.append(f"chatd{node.idx} exited with {rc} after SIGTERM")
            await asyncio.to_thread(node.start)
            soak.fault(f"chatd{node.idx} restarted")


# ---- the checks -------------------------------------------------------------------------


def near(entries, t, before=3.0, after=3.0):
    return [f"    {x:7.2f}s {text}" for x, text in entries if t - before <= x <= t + after]


def logs_near(soak, ms, before=2000, after=1000, limit=12):
    """The nodes' log lines from `before` ms before wall-clock time ms to `after` ms after it
    (log lines start with an RFC 3339 UTC time)."""
    lo = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((ms - before) / 1000)) + \
        f".{int(ms - before) % 1000:03d}"
    hi = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((ms + after) / 1000)) + \
        f".{int(ms + after) % 1000:03d}"
    out = []
    for n in soak.cluster.nodes:
        try:
            lines = n.log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        near_lines = [x for x in lines if lo <= x[:23] <= hi]
        out.extend(f"    chatd{n.idx}: {x}" for x in near_lines[:limit])
    return out


def conn_at(c, t):
    """The connection client c had open at time t (None if none)."""
    best = None
    for n, opened in c.conn_open_t.items():
        if opened <= t:
            best = n
    return best


def who_got(soak, clients, m, chat):
    """For a diagnostic: how each member of the chat got message m, and how its sender sent
    it."""
    i = m["message_id"]
    out = []
    for c in clients:
        if c.chat != chat:
            continue
        copies = [f"conn#{conn} (node {c.conn_node.get(conn)}, since="
                  f"{c.conn_since.get(conn)}) event #{idx} at {t:.2f}s"
                  for x, conn, t, idx in c.deliveries if x == i]
        how = "; ".join(copies) or ("REST fill" if i in c.rest_filled else "NEVER")
        out.append(f"    {c.user}: {how}")
        if c.user == m["user_from"]:
            cid = m.get("client_id")
            out.append(f"      its sender sent {cid} on " + ", ".join(
                f"conn#{conn} at {t:.2f}s" for conn, t in c.sends.get(cid, [])))
    return out


def check(soak, clients, stored):
    """Every failure, as text lines (empty: all is well)."""
    out = []
    all_stored = {}
    for chat, msgs in stored.items():
        for m in msgs:
            all_stored[m["message_id"]] = m

    # lost: acknowledged but not in the store
    for c in clients:
        for cid, i in c.acks.items():
            if i not in all_stored:
                out.append(f"LOST: {c.user} got the ack {i} for {cid}, not in the store")
        for cid, a, b in c.ack_conflicts:
            out.append(f"TWO IDS for one client_id: {c.user} {cid}: {a} and {b}")
        never = [cid for cid in c.sent if cid not in c.acks]
        if never:
            out.append(f"UNACKNOWLEDGED: {c.user} never got the ack of {len(never)} messages "
                       f"(first {never[:5]}, still pending: {len(c.pending)})")
        for t, conn, ev in c.unexpected:
            out.append(f"UNEXPECTED at {t:.2f}s on {c.user} conn#{conn}: {ev}")

    # stored twice: one (user, client_id), several rows
    for chat, msgs in stored.items():
        by_key = collections.defaultdict(list)
        for m in msgs:
            if m.get("client_id"):
                by_key[(m["user_from"], m["client_id"])].append(m["message_id"])
        for key, ids in by_key.items():
            if len(ids) > 1:
                out.append(f"STORED TWICE in {chat}: {key} as {ids}")

    for c in clients:
        want = {m["message_id"] for m in stored[c.chat]}
        seen = c.seen()
        # gaps: stored, never seen (neither delivered nor filled from REST)
        missing = sorted(want - seen, key=int)
        if missing:
            out.append(f"GAP: {c.user}@{c.chat} never got {len(missing)} stored messages "
                       f"(of {len(want)}; {len(c.first)} delivered, {len(c.rest_filled)} by REST)")
            for i in missing[:8]:
                t = soak.rel_ms(id_ms(i))
                conn = conn_at(c, t)
                nxt = conn + 1 if conn is not None and conn + 1 in c.conn_since else None
                out.append(f"  missing {i} from node {origin_node(i)} by "
                           f"{all_stored[i]['user_from']} stored at {t:.2f}s; {c.user} was "
                           f"on conn#{conn} (node {c.conn_node.get(conn)}), next conn#{nxt} "
                           f"since={c.conn_since.get(nxt)}")
                out.extend(who_got(soak, clients, all_stored[i], c.chat))
            t = soak.rel_ms(id_ms(missing[0]))
            out.append(f"  {c.user}'s timeline around {t:.2f}s:")
            out.extend(near(c.timeline, t, 6, 6))
            out.append("  faults around it:")
            out.extend(near(soak.faults, t, 8, 4))
            out.append(f"  the nodes' logs around {missing[0]} "
                       f"({time.strftime('%H:%M:%S', time.gmtime(id_ms(missing[0]) / 1000))}"
                       f".{id_ms(missing[0]) % 1000:03d}):")
            out.extend(logs_near(soak, id_ms(missing[0])))
        # phantoms: delivered but not stored (durable before delivery)
        extra = sorted(seen - want, key=int)
        if extra:
            out.append(f"NOT STORED: {c.user}@{c.chat} got {len(extra)} messages the history "
                       f"lacks: {extra[:5]}")
        # repeats: a WebSocket delivery of an id the client already had. The only copy a
        # client may get again is the echo of its own resend (the acknowledgement).
        for i, n in c.copies.items():
            ev = c.first[i]
            allowed = 1
            if ev.get("user_from") == c.user and ev.get("client_id"):
                allowed += c.resent[ev["client_id"]]
            if n > allowed:
                copies = [(conn, t, idx) for x, conn, t, idx in c.deliveries if x == i]
                out.append(f"REPEAT: {c.user}@{c.chat} got {i} (node {origin_node(i)}, by "
                           f"{ev.get('user_from')}, stored at {soak.rel_ms(id_ms(i)):.2f}s) "
                           f"{n} times (allowed {allowed})")
                for conn, t, idx in copies:
                    out.append(f"  copy on conn#{conn} (node {c.conn_node.get(conn)}, opened "
                               f"{c.conn_open_t.get(conn, 0):.2f}s since="
                               f"{c.conn_since.get(conn)}) at {t:.2f}s, event #{idx} of it")
                out.extend(who_got(soak, clients, dict(ev, message_id=i), c.chat))
                out.append(f"  {c.user}'s timeline around it:")
                out.extend(near(c.timeline, copies[-1][1], 6, 2))
                out.append("  faults around it:")
                out.extend(near(soak.faults, copies[-1][1], 8, 2))
                out.append("  the nodes' logs before the last copy:")
                out.extend(logs_near(soak, (soak.t0 + copies[-1][1]) * 1000, 3000, 200))
        # order: from each origin node, first deliveries in id order (the echo of a resend
        # of an old message of its own is an acknowledgement, not part of the stream)
        last, disorder = {}, 0
        for i, conn, t, idx in c.deliveries:
            ev = c.first[i]
            if ev.get("user_from") == c.user and c.resent[ev.get("client_id")]:
                continue
            o = origin_node(i)
            if int(i) < last.get(o, (0,))[0]:
                disorder += 1
                if disorder > 5:
                    continue
                out.append(f"ORDER: {c.user}@{c.chat} got {i} (node {o}) on conn#{conn} at "
                           f"{t:.2f}s (event #{idx}) after {last[o][0]} (conn#{last[o][1]}), "
                           f"{id_ms(last[o][0]) - id_ms(i)} ms newer")
        if disorder > 5:
            out.append(f"ORDER: {c.user}@{c.chat}: {disorder} out of order in all")
            if int(i) > last.get(o, (0,))[0]:
                last[o] = (int(i), conn)
    return out


# ---- the soak ---------------------------------------------------------------------------


async def soak_run(cluster, report):
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(32))
    soak = Soak(cluster)
    rng = random.Random(SEED)
    clients = []
    chats = [f"soak-{k}" for k in range(CHATS)]
    for chat in chats:
        for u in range(PER_CHAT):
            clients.append(Client(soak, chat, f"{chat}-u{u}", random.Random(rng.random())))
    by_chat = {chat: [c for c in clients if c.chat == chat] for chat in chats}
    runners = [asyncio.create_task(c.run()) for c in clients]

    async def until(pred, timeout, what):
        deadline = loop.time() + timeout
        while not pred():
            for r in runners:
                if r.done() and r.exception():
                    raise r.exception()
            if loop.time() > deadline:
                return what
            await asyncio.sleep(0.1)
        return None

    # every client connected and holding one message of its chat: a cursor to resume from
    late = await until(lambda: all(c.connected for c in clients), 20, "every client connected")
    assert late is None, late
    hello = {chat: await by_chat[chat][0].say("hello") for chat in chats}
    late = await until(lambda: all(c.first for c in clients), 20, "the hello messages")
    assert late is None, late

    soak.started = loop.time()
    end = soak.started + FAULT_SECONDS
    senders = [asyncio.create_task(c.sender(RATES[chats.index(c.chat)] / PER_CHAT, end))
               for c in clients]
    faults = asyncio.create_task(inject_faults(soak, rng, end))
    await asyncio.gather(faults, *senders)
    soak.fault("faults over")

    # quiet: every client connected, every message acknowledged, every REST fill done
    waiting = await until(
        lambda: all(c.connected and not c.pending and all(f.done() for f in c.fills)
                    for c in clients), QUIET_DEADLINE, "quiet")
    # a barrier per chat: once every member has it, everything before it had its chance
    barriers = {chat: await by_chat[chat][-1].say("barrier") for chat in chats}
    await until(lambda: all(by_chat[c.chat][-1].acks.get(barriers[c.chat]) in c.seen()
                            for c in clients), CONVERGE_DEADLINE, "the barriers")

    stored = {}
    for chat in chats:
        stored[chat] = await asyncio.to_thread(
            lambda ch=chat: cluster.nodes[0].history(ch))
    await until(lambda: all({m["message_id"] for m in stored[c.chat]} <= c.seen()
                            for c in clients), CONVERGE_DEADLINE, "every stored message")
    for c in clients:
        await c.close()
    for r in runners:
        if r.done() and r.exception():
            raise r.exception()
        r.cancel()

    failures = check(soak, clients, stored)
    if waiting:
        not_ready = [c.user for c in clients
                     if not (c.connected and not c.pending)]
        failures.insert(0, f"not quiet within {QUIET_DEADLINE}s: {not_ready[:8]}")
    failures = soak.problems + failures
    kinds = collections.Counter(f.split(":")[0] for f in failures if not f.startswith(" "))
    if kinds:
        failures.insert(0, "failure lines by kind: " + ", ".join(f"{k} {n}"
                                                               for k, n in kinds.items()))

    total = collections.Counter()
    for c in clients:
        total.update(c.stats)
    deliveries = sum(len(c.deliveries) for c in clients)
    report.append(
        f"soak: seed={SEED} store={STORE} {FAULT_SECONDS:.0f}s of faults, "
        f"{','.join(f'{r:g}' for r in RATES)} msg/s in the {CHATS} chats x {PER_CHAT} clients, "
        f"replay-limit {REPLAY_LIMIT or 'default'}")
    report.append(
        f"soak: stored {sum(len(v) for v in stored.values())} messages, "
        f"{deliveries} deliveries, {total['resends']} resends, {total['reconnects']} "
        f"reconnects ({total['connect_failures']} failed attempts), "
        f"{total['replay_too_large']} replay_too_large -> {total['rest_pages']} REST pages, "
        f"{total['rest_filled']} messages filled by REST, "
        f"{total['store_unavailable']} store_unavailable")
    sizes = sorted(x for c in clients for x in c.fill_sizes)
    if sizes:
        report.append(
            f"soak: after each replay_too_large, the messages after the cursors (what the "
            f"replay had to send, or a few more: read by the REST fill a little later): min "
            f"{sizes[0]}, median {sizes[len(sizes) // 2]}, max {sizes[-1]} (replay-limit "
            f"{REPLAY_LIMIT or 'default'})")
    report.append("soak: faults: " + "; ".join(f"{t:.1f}s {x}" for t, x in soak.faults))
    del hello
    return failures


def test_soak_faults_lose_nothing_repeat_nothing(soak_cluster, capsys):
    report = []
    failures = asyncio.run(soak_run(soak_cluster, report))
    with capsys.disabled():
        print("\n" + "\n".join(report))
        if failures:
            print("soak: FAILURES\n" + "\n".join(failures))
    assert not failures, f"{len(failures)} failure lines, first: {failures[0]}"
