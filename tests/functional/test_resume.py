"""Resume with ?since=: a client that reconnects gets precisely what it missed (the stored
messages after its cursor, deletions as message:delete), then the live events, with no
gap and no duplicate between the two."""

import threading

import pytest

import json

from helpers import Client, HttpConn


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
