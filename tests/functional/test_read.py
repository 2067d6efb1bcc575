"""Read positions: {"event":"read"} over the WebSocket, GET /api/chats/{chat}/read.

Runs on SQLite and, in `make functional-cassandra`, on Cassandra (CHAT_TEST_STORE)."""

import json

import requests


def is_read(ev):
    if ev.get("event") == "error":
        raise AssertionError(f"error instead of a read event: {ev}")
    return ev.get("event") == "read"


def read(client, message_id):
    """Send a read and wait for this connection's answer (the read event)."""
    client.send({"event": "read", "message_id": message_id})
    return client.wait_for(is_read)


def error_for(client, payload):
    client.send(payload if isinstance(payload, str) else json.dumps(payload))
    return client.wait_for(lambda ev: ev.get("event") in ("error", "read"))


def position(server, chat, user):
    r = server.get(f"/api/chats/{chat}/read", user=user)
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json")
    return r.json()


def test_position_is_monotonic_and_acknowledged(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    ids = [bob.say(f"m{i}")["message_id"] for i in range(3)]

    ack = read(alice, ids[1])
    assert ack == {"event": "read", "chat_id": "general", "message_id": ids[1],
                   "user_from": "alice"}
    # an older id (a stale tab) never moves it back: the answer says where it stays
    assert read(alice, ids[0])["message_id"] == ids[1]
    assert position(server, "general", "alice")["message_id"] == ids[1]
    assert read(alice, ids[2])["message_id"] == ids[2]
    assert read(alice, ids[1])["message_id"] == ids[2]
    got = position(server, "general", "alice")
    assert got == {"chat_id": "general", "message_id": ids[2], "unread": 0,
                   "unread_capped": False}
    # bob's position is his own
    assert position(server, "general", "bob")["message_id"] is None


def test_concurrent_reads_from_two_tabs_end_at_the_newest(server):
    tab1 = server.client("general", "alice")
    tab2 = server.client("general", "alice")
    bob = server.client("general", "bob")
    ids = [bob.say(f"m{i}")["message_id"] for i in range(12)]
    # both tabs race through the ids in opposite orders, without waiting for answers
    for a, b in zip(ids, reversed(ids)):
        tab1.send({"event": "read", "message_id": a})
        tab2.send({"event": "read", "message_id": b})
    for tab in (tab1, tab2):
        tab.wait_for(lambda ev: ev.get("event") == "read" and ev["message_id"] == ids[-1])
    # reads of older ids may still be landing: none of them can move it back
    assert position(server, "general", "alice")["message_id"] == ids[-1]


def test_other_tabs_of_the_same_user_follow_and_nobody_else_hears(server):
    tab1 = server.client("general", "alice")
    tab2 = server.client("general", "alice")
    bob = server.client("general", "bob")
    elsewhere = server.client("random", "alice")
    mid = bob.say("hello")["message_id"]
    tab1.wait_for(lambda ev: ev.get("message_id") == mid)
    tab2.wait_for(lambda ev: ev.get("message_id") == mid)

    ack = read(tab1, mid)
    assert tab2.wait_for(is_read) == ack
    bob.expect_quiet(0.3)
    elsewhere.expect_quiet(0.1)
    # a stale id from tab2 moves nothing: tab2 alone is told, tab1 hears nothing new
    older = bob.say("later")["message_id"]
    assert read(tab2, mid)["message_id"] == mid
    tab1.wait_for(lambda ev: ev.get("message_id") == older)
    tab1.expect_quiet(0.3)


def test_unread_counts_others_messages_not_deleted(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    b = [bob.say(f"b{i}")["message_id"] for i in range(5)]
    alice.say("mine, never unread for me")
    bob.send({"event": "message:delete", "message_id": b[4]})
    bob.wait_for(lambda ev: ev.get("event") == "message:delete")

    never = position(server, "general", "alice")
    assert never == {"chat_id": "general", "message_id": None, "unread": 4,
                     "unread_capped": False}
    read(alice, b[1])
    assert position(server, "general", "alice")["unread"] == 2  # b2, b3
    # bob has never read: alice's message counts for him, his own do not
    assert position(server, "general", "bob")["unread"] == 1
    # reading a deleted message is allowed: it is still the chat's
    assert read(alice, b[4])["message_id"] == b[4]
    assert position(server, "general", "alice")["unread"] == 0


def test_unread_is_capped(server):
    bob = server.client("busy", "bob")
    for i in range(101):
        bob.send({"event": "message:message", "message": f"n{i}", "client_id": f"c{i}"})
    bob.wait_for(lambda ev: ev.get("client_id") == "c100", timeout=20)
    got = position(server, "busy", "alice")
    assert got["message_id"] is None
    assert got["unread"] == 100 and got["unread_capped"] is True


def test_bad_reads_are_errors_and_the_connection_stays(server):
    alice = server.client("general", "alice")
    other = server.client("random", "alice").say("in another chat")["message_id"]
    mine = alice.say("here")["message_id"]

    ev = error_for(alice, {"event": "read"})
    assert ev["event"] == "error" and ev["code"] == "bad_request"
    assert "message_id" in ev["detail"]
    for bad in (int(mine), "12ab", "", None, ["1"]):
        ev = error_for(alice, {"event": "read", "message_id": bad})
        assert ev["event"] == "error" and ev["code"] == "bad_request", (bad, ev)
    unknown = str(int(mine) + 1)
    ev = error_for(alice, {"event": "read", "message_id": unknown})
    assert ev == {"event": "error", "code": "not_found",
                  "detail": "no such message in this chat", "message_id": unknown}
    # a message of another chat is not this chat's
    ev = error_for(alice, {"event": "read", "message_id": other})
    assert ev["code"] == "not_found" and ev["message_id"] == other
    assert position(server, "general", "alice")["message_id"] is None
    # still open and working
    assert read(alice, mine)["message_id"] == mine


def test_rest_endpoint_rules(server):
    url = server.base_url + "/api/chats/general/read"
    r = requests.get(url, timeout=5)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = server.get("/api/chats/general/read", headers=server.auth("alice", chats=["random"]))
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = server.post("/api/chats/general/read", user="alice", json={})
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD"
    r = server.get("/api/chats/bad%20id/read", user="alice")
    assert r.status_code == 400 and r.json()["error"] == "bad_chat_id"


def test_position_survives_a_restart(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    ids = [bob.say(f"m{i}")["message_id"] for i in range(3)]
    read(alice, ids[1])
    server.restart()
    assert position(server, "general", "alice") == {
        "chat_id": "general", "message_id": ids[1], "unread": 1, "unread_capped": False}
    # and stays monotonic against the stored value, not a fresh one
    alice = server.client("general", "alice")
    assert read(alice, ids[0])["message_id"] == ids[1]
