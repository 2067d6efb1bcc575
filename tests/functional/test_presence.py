"""Presence and typing on one node.

Who is online in a chat: `{"event":"presence:get"}` answers `{"event":"presence","users":[..]}`,
members that asked (presence:get, or ?presence=1 on the WebSocket URL) get presence:join /
presence:leave when a user's first connection opens or last one closes (two tabs are one
presence; a reconnect within --presence-grace-ms is neither), and GET
/api/chats/{chat_id}/presence lists them over REST. `{"event":"typing"}` reaches the other
members as `{"event":"typing","user_from":..}`, at most one per user per chat per 2 s, never
stored, never to the sender's own connections. A client that asked for none of it (the
seed's three events) receives none of it.

Orders are checked with a later event as the marker (a join, or a message that travels
behind), never with a wait: what did not come before the marker did not come at all.
"""

import time

import pytest

from helpers import Client

NO_GRACE = ("--presence-grace-ms", "0")


def member(server, chat, user, presence=True):
    """A client; with presence, one that asked for presence events from the start."""
    url = server.ws_url(chat, user=user) + ("&presence=1" if presence else "")
    c = Client(url, user=user)
    server.clients.append(c)
    return c


def next_presence(c, timeout=10.0):
    """The next presence:join / presence:leave event of c (typing and others are skipped)."""
    return c.wait_for(lambda e: e.get("event", "").startswith("presence:"), timeout)


def change(ev):
    return ev["event"], ev["user"]


def presence_list(c):
    c.send({"event": "presence:get"})
    ev = c.wait_for(lambda e: e.get("event") == "presence")
    return ev["users"]


def test_join_leave_two_tabs_one_presence(chatd):
    server = chatd(*NO_GRACE)
    seed = member(server, "room", "dave", presence=False)  # knows the seed's events only
    alice = member(server, "room", "alice")
    assert change(next_presence(alice)) == ("presence:join", "alice")  # its own arrival
    bob1 = member(server, "room", "bob")
    assert change(next_presence(alice)) == ("presence:join", "bob")
    bob2 = member(server, "room", "bob")  # a second tab: no event
    carol = member(server, "room", "carol")
    assert change(next_presence(alice)) == ("presence:join", "carol")
    assert presence_list(alice) == ["alice", "bob", "carol", "dave"]

    bob1.close()  # bob still has a tab: no leave
    carol.close()
    assert change(next_presence(alice)) == ("presence:leave", "carol")
    bob2.close()
    assert change(next_presence(alice)) == ("presence:leave", "bob")
    assert presence_list(alice) == ["alice", "dave"]

    # the seed-shaped client got none of it: its own message is the first thing it sees
    ack = seed.say("still here")
    assert ack["message"] == "still here"


def test_seed_client_receives_only_its_events(chatd):
    server = chatd(*NO_GRACE)
    seed = member(server, "quiet", "dave", presence=False)
    bob = member(server, "quiet", "bob")
    bob.send({"event": "typing"})
    other = member(server, "quiet", "erin")
    other.close()
    bob.say("hello")
    ev = seed.recv()
    assert ev["event"] == "message:message" and ev["message"] == "hello", ev


def test_presence_get_opts_in(chatd):
    server = chatd(*NO_GRACE)
    alice = member(server, "optin", "alice", presence=False)
    assert presence_list(alice) == ["alice"]
    member(server, "optin", "bob", presence=False)
    assert change(next_presence(alice)) == ("presence:join", "bob")


def test_reconnect_within_grace_is_no_leave(chatd):
    server = chatd("--presence-grace-ms", "3000")
    alice = member(server, "grace", "alice")
    assert change(next_presence(alice)) == ("presence:join", "alice")
    bob = member(server, "grace", "bob")
    assert change(next_presence(alice)) == ("presence:join", "bob")
    bob.close()
    bob = member(server, "grace", "bob")  # back at once, well within 3 s
    carol = member(server, "grace", "carol")
    assert change(next_presence(alice)) == ("presence:join", "carol")  # nothing about bob
    bob.close()
    # gone for good: the leave comes once the grace period is over
    assert change(next_presence(alice, timeout=15)) == ("presence:leave", "bob")
    r = server.get("/api/chats/grace/presence", user="zed")
    assert r.json()["users"] == ["alice", "carol"]


def test_rest_presence(chatd):
    server = chatd(*NO_GRACE)
    r = server.get("/api/chats/rest/presence", user="zed")
    assert r.status_code == 200 and r.json() == {"chat_id": "rest", "users": []}
    a = member(server, "rest", "alice", presence=False)
    member(server, "rest", "bob", presence=False)
    member(server, "other", "carol", presence=False)
    r = server.get("/api/chats/rest/presence", user="zed")
    assert r.status_code == 200, r.text
    assert r.json() == {"chat_id": "rest", "users": ["alice", "bob"]}
    a.close()
    deadline = time.monotonic() + 10
    while server.get("/api/chats/rest/presence", user="zed").json()["users"] != ["bob"]:
        assert time.monotonic() < deadline, "alice never left"
        time.sleep(0.05)
    # auth as for the history: a token, and one that allows the chat
    r = server.get("/api/chats/rest/presence")
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = server.get("/api/chats/rest/presence",
                   headers={"Authorization": f"Bearer {server.token('zed', chats=['other'])}"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    r = server.post("/api/chats/rest/presence", user="zed", json={})
    assert r.status_code == 405
    r = server.get("/api/chats/bad%20id/presence", user="zed")
    assert r.status_code == 400 and r.json()["error"] == "bad_chat_id"


def test_bad_presence_parameter(chatd):
    server = chatd()
    r = server.get("/ws/chat/x", params={"presence": "maybe", "token": server.token("a")},
                   headers={"Upgrade": "websocket", "Connection": "Upgrade",
                            "Sec-WebSocket-Version": "13",
                            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert r.status_code == 400 and r.json()["error"] == "bad_request", r.text


def test_typing_throttled_not_stored_not_echoed(chatd):
    server = chatd(*NO_GRACE)
    alice = member(server, "typing", "alice")
    seed = member(server, "typing", "dave", presence=False)
    bob1 = member(server, "typing", "bob")
    bob2 = member(server, "typing", "bob")
    for _ in range(5):
        bob1.send({"event": "typing"})
    bob1.say("done typing")  # travels behind the typing events: the marker

    def before_message(c):
        seen = []
        while True:
            ev = c.recv()
            if ev.get("event") == "message:message":
                assert ev["message"] == "done typing"
                return seen
            if ev.get("event") == "typing":
                seen.append(ev)

    assert before_message(alice) == [{"event": "typing", "chat_id": "typing",
                                      "user_from": "bob"}]
    assert before_message(bob2) == []  # the sender's other tab: not to the sender
    assert before_message(seed) == []  # asked for no presence events
    # never stored: the history has the message alone
    assert [m["message"] for m in server.all_history("typing")] == ["done typing"]

    # 2 s after the one forwarded, the next one goes out again
    time.sleep(2.1)
    alice.send({"event": "typing"})
    ev = bob1.wait_for(lambda e: e.get("event") == "typing")
    assert ev["user_from"] == "alice"
    bob1.send({"event": "typing"})
    ev = alice.wait_for(lambda e: e.get("event") == "typing")
    assert ev["user_from"] == "bob"


def test_typing_counts_against_the_rate_limit(chatd):
    server = chatd("--rate-limit", "0.1", "--rate-burst", "1")
    alice = member(server, "limited", "alice")
    bob = member(server, "limited", "bob")
    bob.send({"event": "typing"})  # takes bob's one token
    assert alice.wait_for(lambda e: e.get("event") == "typing")["user_from"] == "bob"
    bob.send({"event": "message:message", "message": "hi", "client_id": "m1"})
    ev = bob.wait_for(lambda e: e.get("client_id") == "m1")
    assert ev["event"] == "error" and ev["code"] == "rate_limited", ev
    assert server.all_history("limited") == []


@pytest.mark.parametrize("limit", ["0", "1"])
def test_max_members_stops_join_leave(chatd, limit):
    server = chatd(*NO_GRACE, "--presence-max-members", limit)
    alice = member(server, "big", "alice")
    bob = member(server, "big", "bob")  # a second user: past 1
    carol = member(server, "big", "carol")
    carol.close()
    bob.say("marker")
    evs = []
    while True:
        ev = alice.recv()
        if ev.get("event") == "message:message":
            break
        evs.append(change(ev))
    # with 1, alice's own join (1 user online) is the only one sent; with 0, none
    assert evs == ([("presence:join", "alice")] if limit == "1" else [])
    # the list still answers
    assert presence_list(alice) == ["alice", "bob"]
