"""Resume with ?since=: a client that reconnects gets precisely what it missed (the stored
messages after its cursor, deletions as message:delete), then the live events, with no
gap and no duplicate between the two."""

import fcntl
import os
import threading
import time

import pytest

import json

from helpers import OP_CLOSE, OP_TEXT, Client, HttpConn


def connect_since(srv, chat, user, since):
    c = Client(srv.ws_url(chat, token=srv.token(user)) + f"&since={since}", user=user)
    srv.clients.append(c)
    return c


def test_since_replays_exactly_what_was_missed(server):
    alice = server.client("general", "alice")
    acks = [alice.say(f"m{i}") for i in range(5)]
    alice.send({"event": "message:delete", "message_id": acks[3]["message_id"]})
    alice.wait_for(lambda e: e["event"] == "message:delete")
    alice.send({"event": "message:edit", "message_id": acks[2]["message_id"], "message": "m2!"})
    alice.wait_for(lambda e: e["event"] == "message:edit")

    bob = connect_since(server, "general", "bob", acks[1]["message_id"])
    got = [bob.recv() for _ in range(3)]
    assert [e["message_id"] for e in got] == [a["message_id"] for a in acks[2:]]
    assert got[0]["event"] == "message:message" and got[0]["message"] == "m2!"
    assert "edited_at" in got[0]
    assert got[1]["event"] == "message:delete" and "message" not in got[1]
    assert got[2]["event"] == "message:message" and got[2]["message"] == "m4"
    bob.expect_quiet()
    # then live
    live = alice.say("after")
    assert bob.recv()["message_id"] == live["message_id"]


def test_since_latest_id_replays_nothing(server):
    alice = server.client("general", "alice")
    last = [alice.say(f"m{i}") for i in range(3)][-1]
    bob = connect_since(server, "general", "bob", last["message_id"])
    bob.expect_quiet()
    live = alice.say("new")
    assert bob.recv()["message_id"] == live["message_id"]


def test_since_list_of_cursors(server):
    # one cursor per origin node; on a single node every id has the same origin
    alice = server.client("general", "alice")
    acks = [alice.say(f"m{i}") for i in range(4)]
    bob = connect_since(server, "general", "bob",
                        f"{acks[0]['message_id']},{acks[1]['message_id']}")
    # the list form: per origin node, after its cursor (here the newest of the two ids
    # names node 0; the older one names the same node and the newer one wins)
    got = []
    while True:
        try:
            got.append(bob.recv(timeout=1.0))
        except TimeoutError:
            break
    ids = [e["message_id"] for e in got]
    assert len(ids) == len(set(ids)), "duplicate in the replay"
    assert acks[3]["message_id"] in ids and acks[2]["message_id"] in ids


def test_replay_limit_answers_an_error_and_goes_live(chatd):
    srv = chatd("--replay-limit", "3")
    alice = srv.client("general", "alice")
    first = alice.say("m0")
    for i in range(1, 6):
        alice.say(f"m{i}")
    bob = connect_since(srv, "general", "bob", first["message_id"])
    err = bob.recv()
    assert err["event"] == "error" and err["code"] == "replay_too_large", err
    live = alice.say("live")
    assert bob.recv()["message_id"] == live["message_id"]


@pytest.mark.parametrize("since", ["abc", "-1", "1,,2", "1,", ",".join(["1"] * 33)])
def test_bad_since_is_400(server, since):
    c = HttpConn(server.port)
    try:
        r = c.request("GET", f"/ws/chat/general?token={server.token('a')}&since={since}",
                      {"Upgrade": "websocket", "Connection": "Upgrade",
                       "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                       "Sec-WebSocket-Version": "13"})
    finally:
        c.close()
    assert r.status == 400, r
    assert json.loads(r.body)["error"] == "bad_request"


def test_resume_while_messages_keep_coming_no_gap_no_duplicate(server):
    """A sender keeps sending while a reader reconnects with since=: the reader ends up
    with every message after its cursor exactly once, in id order."""
    alice = server.client("general", "alice")
    reader = server.client("general", "reader")
    base = alice.say("start")
    assert reader.recv()["message_id"] == base["message_id"]
    reader.ws.close()

    sent = []
    stop = threading.Event()

    def send_loop():
        i = 0
        while not stop.is_set() and i < 400:
            sent.append(alice.say(f"s{i}")["message_id"])
            i += 1

    t = threading.Thread(target=send_loop)
    t.start()
    try:
        while len(sent) < 50:
            threading.Event().wait(0.01)
        again = connect_since(server, "general", "reader", base["message_id"])
        while len(sent) < 150:
            threading.Event().wait(0.01)
    finally:
        stop.set()
        t.join(60)
    got = []
    while len(got) < len(sent):
        got.append(again.recv(timeout=10)["message_id"])
    again.expect_quiet()
    assert got == sent, "replay + live must be every message once, in order"


def drain_events(client, n, timeout=20.0):
    """The next n events (each within timeout of the previous one)."""
    return [client.recv(timeout=timeout) for _ in range(n)]


def test_large_backlog_within_the_limit_arrives_whole(server):
    """A backlog far larger than the outbound limit (4 MiB here 12 MB) arrives whole: it is
    sent as the socket drains instead of being queued at once and cut as a slow consumer."""
    alice = server.client("general", "alice")
    text = "x" * 60000
    acks = [alice.say(f"{i:04d}{text}", timeout=20) for i in range(200)]
    bob = connect_since(server, "general", "bob", acks[0]["message_id"])
    got = drain_events(bob, 199)
    assert [e["message_id"] for e in got] == [a["message_id"] for a in acks[1:]]
    assert all(e["message"].startswith(f"{i + 1:04d}") for i, e in enumerate(got))
    live = alice.say("live after the backlog")
    ev = bob.recv(timeout=10)
    assert ev["message_id"] == live["message_id"], "the live message comes after the backlog"


def test_live_events_during_a_large_replay_follow_it_once(server):
    """Messages sent while a long backlog is still draining come after it, each once."""
    alice = server.client("general", "alice")
    text = "y" * 60000
    acks = [alice.say(f"{i:04d}{text}", timeout=20) for i in range(120)]
    bob = connect_since(server, "general", "bob", acks[0]["message_id"])
    first = bob.recv(timeout=10)  # the replay has started: later sends are live
    live = [alice.say(f"live{i}")["message_id"] for i in range(20)]
    rest = drain_events(bob, 119 + 20 - 1)
    ids = [first["message_id"]] + [e["message_id"] for e in rest]
    assert ids == [a["message_id"] for a in acks[1:]] + live
    bob.expect_quiet()


def node_id(node, ms_ago=0, seq=0):
    """A message id of node `node`, ms_ago milliseconds before now (Snowflake layout)."""
    ms = int(time.time() * 1000) - ms_ago - 1577836800000
    return (ms << 22) | (node << 12) | seq


def test_quiet_origin_cursor_does_not_inflate_the_replay(chatd):
    """Per-origin cursors: an old cursor of an origin that has been quiet must not make the
    resume read (and count) the whole busy chat since: only the ~50 missed are replayed."""
    srv = chatd("--replay-limit", "100")
    alice = srv.client("general", "alice")
    # thousands of older messages, sent pipelined and acknowledged
    n = 2000
    for i in range(n):
        alice.send({"event": "message:message", "message": f"m{i}", "client_id": f"b{i}"})
    acks = []
    while len(acks) < n:
        ev = alice.recv(timeout=20)
        assert ev["event"] == "message:message", ev
        acks.append(ev["message_id"])
    assert acks == sorted(acks, key=int)
    quiet = node_id(7, ms_ago=3600 * 1000)  # a node that has been quiet for an hour
    busy = acks[n - 51]  # the client missed the last 50
    bob = connect_since(srv, "general", "bob", f"{quiet},{busy}")
    got = drain_events(bob, 50)
    assert [e.get("message_id") for e in got] == acks[n - 50:], got[:1]
    bob.expect_quiet()
    live = alice.say("live")
    assert bob.recv()["message_id"] == live["message_id"]


def test_replay_limit_counts_only_what_is_sent(chatd):
    """Messages the cursors say the client has are read (the window) but not counted."""
    srv = chatd("--replay-limit", "10")
    alice = srv.client("general", "alice")
    acks = [alice.say(f"m{i}")["message_id"] for i in range(40)]
    # two cursors of the same origin: the newest wins, 5 missed
    bob = connect_since(srv, "general", "bob", f"{acks[0]},{acks[34]}")
    got = drain_events(bob, 5)
    assert [e.get("message_id") for e in got] == acks[35:]
    bob.expect_quiet()


def test_failed_replay_read_is_told_and_closes_so_the_client_resumes(chatd, tmp_path):
    """The store cannot be read when a client resumes (here another process holds SQLite's
    WAL read locks, as a long checkpoint or a stuck tool would): the client is told and the
    connection closes with 1011, so it resumes again, rather than going on live with a hole.
    Once the store reads again, the same resume gets everything. (SQLite whatever
    CHAT_TEST_STORE says: the fault is its.) The log line names the user as a quoted value:
    a user id cannot forge log fields."""
    server = chatd(store=f"sqlite:{tmp_path}/chat.db")
    bob_id = 'bob x="y" user=admin'
    alice = server.client("general", "alice")
    acks = [alice.say(f"m{i}")["message_id"] for i in range(5)]
    shm = tmp_path / "chat.db-shm"
    fd = os.open(shm, os.O_RDWR)
    try:
        # WAL_READ_LOCK(0..4): bytes 123..127 of the shared-memory file
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 123, os.SEEK_SET)
        bob = connect_since(server, "general", bob_id, acks[0])
        ev = bob.recv(timeout=20)
        assert ev["event"] == "error" and ev["code"] == "store_unavailable", ev
        code, _ = bob.expect_close(timeout=10)
        assert code == 1011
        failed = [ln for ln in server.log.splitlines() if "replay_read_failed" in ln]
        assert failed and all(' user="bob x=\\"y\\" user=admin" ' in ln for ln in failed), failed
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, 5, 123, os.SEEK_SET)
        os.close(fd)
    again = connect_since(server, "general", bob_id, acks[0])
    assert [e["message_id"] for e in drain_events(again, 4)] == acks[1:]
    live = alice.say("live")
    assert again.recv()["message_id"] == live["message_id"]


def test_origin_not_named_is_read_from_the_newest_cursor_minus_the_margin(chatd, tmp_path):
    """For an origin the list does not name, the replay reads from 10 s before the NEWEST
    cursor: an old cursor of a quiet origin does not pull in another node's old messages
    (which a client connected at its newest cursor had received)."""
    store = f"sqlite:{tmp_path}/shared.db"
    a = chatd("--node-id", "1", "--replay-limit", "100", store=store)
    alice = a.client("general", "alice")
    for i in range(300):
        alice.send({"event": "message:message", "message": f"old{i}", "client_id": f"o{i}"})
    for _ in range(300):
        assert alice.recv(timeout=20)["event"] == "message:message"
    a.stop_ok()
    time.sleep(11)  # node 1's messages are now older than the in-flight margin
    b = chatd("--node-id", "2", "--replay-limit", "100", store=store)
    carol = b.client("general", "carol")
    new = [carol.say(f"new{i}")["message_id"] for i in range(60)]
    quiet = node_id(7, ms_ago=3600 * 1000)
    bob = connect_since(b, "general", "bob", f"{quiet},{new[9]}")
    got = drain_events(bob, 50)
    assert [e.get("message_id") for e in got] == new[10:], got[:1]
    bob.expect_quiet()


def test_resume_too_far_behind_closes_1013_and_the_next_resume_gets_the_rest(chatd):
    """A resuming client that does not read while live events pile up behind its backlog is
    closed with 1013 once they pass the outbound bound (not reset, nothing dropped silently):
    it has a prefix of the backlog, and resuming from its last id gets the rest, then the
    live events, in order."""
    srv = chatd("--max-outbound-bytes", "1048576")
    alice = srv.client("general", "alice")
    text = "z" * 60000
    acks = [alice.say(f"{i:04d}{text}", timeout=20)["message_id"] for i in range(200)]
    bob = srv.raw("general", path=f"/ws/chat/general?token={srv.token('bob')}&since={acks[0]}",
                  rcvbuf=65536)
    live = [alice.say(f"L{i:04d}{text}", timeout=20)["message_id"] for i in range(40)]
    got = []
    while True:
        f = bob.recv_frame(timeout=10)
        if f.opcode == OP_CLOSE:
            code = f.close_code()[0]
            break
        assert f.opcode == OP_TEXT, f
        got.append(json.loads(f.payload)["message_id"])
    assert code == 1013
    assert got == acks[1:1 + len(got)], "a prefix of the backlog, in order"
    again = connect_since(srv, "general", "bob", got[-1] if got else acks[0])
    rest = [e["message_id"] for e in drain_events(again, 199 - len(got) + 40)]
    assert rest == acks[1 + len(got):] + live
    again.expect_quiet()


def collect_until_quiet(client, quiet=1.0):
    out = []
    while True:
        try:
            out.append(client.recv(timeout=quiet))
        except TimeoutError:
            return out


def test_retry_sent_on_resume_is_received_once(server):
    """A client that did not see its acknowledgement resumes with since= and at once sends
    the message again with the same client_id (what the README tells it to do). It gets the
    message once, whether the replay or the retry's answer comes first; a member who saw the
    message live does not get it again."""
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    base = alice.say("before")
    m = alice.say("its ack was lost", client_id="retry-1")
    assert [bob.recv()["message_id"] for _ in range(2)] == [base["message_id"], m["message_id"]]
    for attempt in range(5):
        again = connect_since(server, "general", "alice", base["message_id"])
        again.send({"event": "message:message", "message": "its ack was lost",
                    "client_id": "retry-1"})
        got = [e["message_id"] for e in collect_until_quiet(again)]
        assert got == [m["message_id"]], (attempt, got)
        again.close()
    bob.expect_quiet()


def test_retry_of_a_message_its_node_never_published_reaches_everyone(chatd, tmp_path):
    """Node A stored a message but never published it (as when it is killed between the
    commit and the publish: here A's bus reaches no other node). The sender retries through
    node B with the same client_id: B's members get the message too, not only the sender."""
    store = f"sqlite:{tmp_path}/shared.db"
    a = chatd("--node-id", "1", store=store)
    b = chatd("--node-id", "2", store=store)
    carol = b.client("general", "carol")
    alice = a.client("general", "alice")
    m = alice.say("stored on A, never published", client_id="orphan-1")
    carol.expect_quiet()  # A's publish does not reach B
    retry = b.client("general", "alice")
    retry.send({"event": "message:message", "message": "stored on A, never published",
                "client_id": "orphan-1"})
    assert retry.recv()["message_id"] == m["message_id"]
    ev = carol.recv()
    assert ev["message_id"] == m["message_id"] and ev["client_id"] == "orphan-1"
    # a second retry is answered to its sender and changes nothing for anyone else
    retry.send({"event": "message:message", "message": "stored on A, never published",
                "client_id": "orphan-1"})
    assert retry.recv()["message_id"] == m["message_id"]
    retry.expect_quiet()
    carol.expect_quiet()


def test_retries_of_unpublished_messages_in_reverse_order_all_arrive(chatd, tmp_path):
    """Two messages node A stored but never published, retried through node B newest first
    (two senders, each retrying its own): B's members get both. A filter by per-origin
    high-water mark alone would drop the older one as 'seen'."""
    store = f"sqlite:{tmp_path}/shared.db"
    a = chatd("--node-id", "1", store=store)
    b = chatd("--node-id", "2", store=store)
    carol = b.client("general", "carol")
    alice = a.client("general", "alice")
    dave = a.client("general", "dave")
    m1 = alice.say("first", client_id="c-first")
    m2 = dave.say("second", client_id="c-second")
    assert int(m1["message_id"]) < int(m2["message_id"])
    carol.expect_quiet()
    dave_b = b.client("general", "dave")
    dave_b.send({"event": "message:message", "message": "second", "client_id": "c-second"})
    alice_b = b.client("general", "alice")
    alice_b.send({"event": "message:message", "message": "first", "client_id": "c-first"})
    got = [e["message_id"] for e in collect_until_quiet(carol)]
    assert sorted(got) == sorted([m1["message_id"], m2["message_id"]]), got



def test_stalled_resumers_hold_bounded_memory_then_get_everything(server):
    """Clients resuming a large backlog that read nothing for a while: the server keeps only
    a bounded part of each backlog in memory (not all of it per client), and each client
    still gets the whole backlog, in order, once it reads."""
    alice = server.client("general", "alice")
    text = "w" * 60000
    acks = [alice.say(f"{i:04d}{text}", timeout=20)["message_id"] for i in range(400)]
    backlog = 399 * 60000
    before = server.rss_kb()
    n = 10
    raws = [server.raw("general", rcvbuf=65536,
                       path=f"/ws/chat/general?token={server.token(f'r{i}')}&since={acks[0]}")
            for i in range(n)]
    # the backlogs are being read and queued: give the server time to do what it would
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        time.sleep(0.2)
    grown = (server.rss_kb() - before) * 1024
    assert grown < n * backlog * 3 // 4, (
        f"{n} stalled resumers of a {backlog >> 20} MiB backlog grew the server by "
        f"{grown >> 20} MiB")
    for r in raws:
        got = [json.loads(r.recv_frame(timeout=20).payload)["message_id"] for _ in range(399)]
        assert got == acks[1:]
