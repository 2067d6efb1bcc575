"""The chat protocol over WebSocket: send, edit, delete, errors, idempotency."""

import pytest
from websockets.exceptions import ConnectionClosed

from helpers import check_id, check_ts


def test_two_members_see_each_others_messages(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    carol = server.client("random", "carol")

    ack = alice.say("hello bob", client_id="c-123")
    assert ack["event"] == "message:message"
    assert ack["chat_id"] == "general"
    assert ack["user_from"] == "alice"
    assert ack["message"] == "hello bob"
    assert ack["client_id"] == "c-123"
    check_id(ack["message_id"])
    check_ts(ack["created_at"])
    assert "edited_at" not in ack and "deleted_at" not in ack

    got = bob.recv()
    assert got == ack

    reply = bob.say("hi alice")
    assert reply["user_from"] == "bob"
    assert int(reply["message_id"]) > int(ack["message_id"])
    assert alice.recv() == reply

    carol.expect_quiet(0.5)


def test_user_from_comes_from_token_not_from_payload(server):
    alice = server.client("general", "alice")
    ack = alice.say("spoof", user_from="mallory", chat_id="other")
    assert ack["user_from"] == "alice"
    assert ack["chat_id"] == "general"


def test_no_client_id_means_no_client_id_field(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    ack = alice.say("plain", client_id=None)
    assert "client_id" not in ack
    assert bob.recv() == ack
    hist = server.history("general")["messages"]
    assert len(hist) == 1 and "client_id" not in hist[0]


def test_message_ids_increase_in_send_order(server):
    alice = server.client("general", "alice")
    ids = [int(alice.say(f"m{i}")["message_id"]) for i in range(20)]
    assert ids == sorted(ids) and len(set(ids)) == 20


def test_unicode_and_whitespace_only_messages(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    for text in ["h\u00e9llo \u20ac \U0001F600 \u4f60\u597d", "   ", "\n", 'quote " and \\ backslash']:
        ack = alice.say(text)
        assert ack["message"] == text
        assert bob.recv()["message"] == text


def test_unknown_fields_are_ignored(server):
    alice = server.client("general", "alice")
    ack = alice.say("x", extra_field={"nested": [1, 2]}, another=7)
    assert ack["message"] == "x"
    assert "extra_field" not in ack


def test_chat_ids_uuid_and_128_char_slug(server):
    for chat in ["0b7d3c2e-6a8f-4a5e-9a1e-1c2d3e4f5a6b", "a" * 128, "A.b-c_9"]:
        c = server.client(chat, "alice")
        ack = c.say("hi")
        assert ack["chat_id"] == chat
        c.close()


def test_edit_by_author(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    ack = alice.say("old text")
    bob.recv()

    alice.send({"event": "message:edit", "message": "new text", "message_id": ack["message_id"]})
    for c in (alice, bob):
        ev = c.recv()
        assert ev["event"] == "message:edit"
        assert ev["message_id"] == ack["message_id"]
        assert ev["chat_id"] == "general"
        assert ev["user_from"] == "alice"
        assert ev["message"] == "new text"
        assert ev["created_at"] == ack["created_at"]
        check_ts(ev["edited_at"])

    hist = server.history("general")["messages"]
    assert len(hist) == 1
    m = hist[0]
    assert m["message_id"] == ack["message_id"]
    assert m["message"] == "new text"
    assert m["deleted"] is False
    check_ts(m["edited_at"])
    assert "old text" not in str(server.get("/api/chats/general/messages", user="x").text)


def test_edit_accepts_integer_message_id(server):
    alice = server.client("general", "alice")
    ack = alice.say("old")
    alice.send({"event": "message:edit", "message": "new", "message_id": int(ack["message_id"])})
    ev = alice.recv()
    assert ev["event"] == "message:edit"
    assert ev["message_id"] == ack["message_id"]
    assert ev["message"] == "new"


def test_delete_by_author(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    ack = alice.say("secret text")
    keep = alice.say("kept")
    bob.recv()
    bob.recv()

    alice.send({"event": "message:delete", "message_id": ack["message_id"]})
    for c in (alice, bob):
        ev = c.recv()
        assert ev["event"] == "message:delete"
        assert ev["message_id"] == ack["message_id"]
        assert ev["chat_id"] == "general"
        assert ev["user_from"] == "alice"
        assert ev["created_at"] == ack["created_at"]
        check_ts(ev["deleted_at"])
        assert "message" not in ev

    page = server.history("general")
    assert [m["message_id"] for m in page["messages"]] == [keep["message_id"], ack["message_id"]]
    d = page["messages"][1]
    assert d["deleted"] is True
    assert "message" not in d
    check_ts(d["deleted_at"])
    assert page["messages"][0]["deleted"] is False
    assert "secret text" not in server.get("/api/chats/general/messages", user="x").text


def test_edit_or_delete_after_delete_is_not_found(server):
    alice = server.client("general", "alice")
    ack = alice.say("gone soon")
    alice.send({"event": "message:delete", "message_id": ack["message_id"]})
    assert alice.recv()["event"] == "message:delete"
    for msg in (
        {"event": "message:edit", "message": "zombie", "message_id": ack["message_id"]},
        {"event": "message:delete", "message_id": ack["message_id"]},
    ):
        alice.send(msg)
        err = alice.recv()
        assert err["event"] == "error" and err["code"] == "not_found", err
        assert err["message_id"] == ack["message_id"]
    assert "message" not in server.history("general")["messages"][0]


@pytest.mark.parametrize("action", ["edit", "delete"])
def test_edit_or_delete_by_other_user_is_not_author(server, action):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    ack = alice.say("alice's")
    bob.recv()

    msg = {"event": f"message:{action}", "message_id": ack["message_id"]}
    if action == "edit":
        msg["message"] = "hijacked"
    bob.send(msg)
    err = bob.recv()
    assert err["event"] == "error"
    assert err["code"] == "not_author"
    assert err["message_id"] == ack["message_id"]
    assert isinstance(err["detail"], str)
    alice.expect_quiet(0.5)

    # the connection stays open and usable
    later = bob.say("still here")
    assert later["user_from"] == "bob"
    assert alice.recv() == later

    m = [m for m in server.history("general")["messages"] if m["message_id"] == ack["message_id"]][0]
    assert m["message"] == "alice's" and m["deleted"] is False and "edited_at" not in m


@pytest.mark.parametrize("action", ["edit", "delete"])
def test_unknown_message_id_is_not_found(server, action):
    alice = server.client("general", "alice")
    msg = {"event": f"message:{action}", "message_id": "12345"}
    if action == "edit":
        msg["message"] = "x"
    alice.send(msg)
    err = alice.recv()
    assert err["event"] == "error" and err["code"] == "not_found", err
    assert err["message_id"] == "12345"
    assert alice.say("after not_found")["message"] == "after not_found"


def test_message_id_from_another_chat_is_not_found(server):
    alice_a = server.client("chat-a", "alice")
    alice_b = server.client("chat-b", "alice")
    ack = alice_a.say("in a")
    alice_b.send({"event": "message:edit", "message": "moved?", "message_id": ack["message_id"]})
    err = alice_b.recv()
    assert err["event"] == "error" and err["code"] == "not_found", err
    alice_a.expect_quiet(0.3)
    assert server.history("chat-a")["messages"][0]["message"] == "in a"


BAD_REQUESTS = {
    "unknown_event": {"event": "message:shout", "message": "x"},
    "event_not_string": {"event": 5, "message": "x"},
    "missing_event": {"message": "x"},
    "missing_message": {"event": "message:message"},
    "message_not_string": {"event": "message:message", "message": 123},
    "message_null": {"event": "message:message", "message": None},
    "empty_message": {"event": "message:message", "message": ""},
    "client_id_not_string": {"event": "message:message", "message": "x", "client_id": 42},
    "client_id_empty": {"event": "message:message", "message": "x", "client_id": ""},
    "client_id_too_long": {"event": "message:message", "message": "x", "client_id": "c" * 129},
    "edit_missing_id": {"event": "message:edit", "message": "x"},
    "edit_missing_message": {"event": "message:edit", "message_id": "1"},
    "edit_empty_message": {"event": "message:edit", "message": "", "message_id": "1"},
    "edit_bad_id_letters": {"event": "message:edit", "message": "x", "message_id": "abc"},
    "delete_bad_id_negative": {"event": "message:delete", "message_id": "-5"},
    "delete_bad_id_empty": {"event": "message:delete", "message_id": ""},
    "delete_bad_id_float": {"event": "message:delete", "message_id": 1.5},
    "delete_bad_id_overflow": {"event": "message:delete", "message_id": "99999999999999999999999"},
    "delete_bad_id_bool": {"event": "message:delete", "message_id": True},
    "delete_missing_id": {"event": "message:delete"},
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_request_keeps_connection_open(server, name):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    alice.send(BAD_REQUESTS[name])
    err = alice.recv()
    assert err["event"] == "error", err
    assert err["code"] == "bad_request", err
    assert isinstance(err["detail"], str) and err["detail"]
    bob.expect_quiet(0.3)
    ack = alice.say("fine now")
    assert bob.recv() == ack
    assert len(server.history("general")["messages"]) == 1


def test_ping_is_answered_to_the_sender_alone(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    alice.send({"event": "ping"})
    assert alice.recv() == {"event": "pong"}
    alice.send({"event": "ping", "client_id": "hb-1", "extra": [1, 2]})  # extra fields pass
    assert alice.recv() == {"event": "pong"}
    bob.expect_quiet(0.3)
    assert server.history("general")["messages"] == []
    ack = alice.say("after the pings")
    assert bob.recv() == ack


def test_ping_is_no_rest_event(server):
    r = server.post("/api/chats/general/messages", user="alice", json={"event": "ping"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_request"
    assert server.history("general")["messages"] == []


def test_bad_request_echoes_client_id(server):
    alice = server.client("general", "alice")
    alice.send({"event": "message:message", "message": "", "client_id": "retry-7"})
    err = alice.recv()
    assert err["event"] == "error" and err["code"] == "bad_request"
    assert err["client_id"] == "retry-7"


@pytest.mark.parametrize(
    "payload",
    ["not json", "{\"event\": \"message:message\", ", "[1, 2, 3]", "\"a string\"", "42", "null"],
    ids=["text", "truncated", "array", "string", "number", "null"],
)
def test_non_object_json_closes_1007(server, payload):
    alice = server.client("general", "alice")
    alice.send(payload)
    code, _ = alice.expect_close()
    assert code == 1007


def test_binary_frame_closes_1003(server):
    alice = server.client("general", "alice")
    alice.ws.send(b'{"event":"message:message","message":"x"}')
    code, _ = alice.expect_close()
    assert code == 1003


def test_error_close_does_not_affect_other_members(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    alice.send("garbage")
    assert alice.expect_close()[0] == 1007
    ack = bob.say("bob alone")
    assert ack["message"] == "bob alone"


# ---- idempotency ---------------------------------------------------------------------------


def test_same_client_id_twice_returns_original(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    first = alice.say("once", client_id="dup-1")
    assert bob.recv() == first

    second = alice.say("once", client_id="dup-1")
    assert second["message_id"] == first["message_id"]
    assert second["created_at"] == first["created_at"]
    assert second["message"] == "once"
    bob.expect_quiet(0.5)

    hist = server.history("general")["messages"]
    assert [m["message_id"] for m in hist] == [first["message_id"]]
    assert hist[0]["client_id"] == "dup-1"


def test_retry_with_different_text_still_returns_original(server):
    alice = server.client("general", "alice")
    first = alice.say("original", client_id="dup-2")
    alice.send({"event": "message:message", "message": "changed", "client_id": "dup-2"})
    again = alice.recv()
    assert again["event"] == "message:message"
    assert again["message_id"] == first["message_id"]
    assert again["message"] == "original"
    assert len(server.history("general")["messages"]) == 1


def test_client_id_is_scoped_per_user_and_chat(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    alice_other = server.client("other", "alice")
    a = alice.say("from alice", client_id="same")
    bob.recv()
    b = bob.say("from bob", client_id="same")
    alice.recv()
    c = alice_other.say("alice elsewhere", client_id="same")
    assert len({a["message_id"], b["message_id"], c["message_id"]}) == 3
    assert len(server.history("general")["messages"]) == 2
    assert len(server.history("other")["messages"]) == 1


def test_idempotency_survives_reconnect(server):
    alice = server.client("general", "alice")
    first = alice.say("once", client_id="reconnect-1")
    alice.close()
    alice2 = server.client("general", "alice")
    again = alice2.say("once", client_id="reconnect-1")
    assert again["message_id"] == first["message_id"]
    assert again["created_at"] == first["created_at"]
    assert len(server.history("general")["messages"]) == 1


def test_closed_member_stops_receiving_and_others_continue(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    bob.close()
    try:
        bob.ws.recv(timeout=0.1)
    except (ConnectionClosed, TimeoutError):
        pass
    for i in range(5):
        assert alice.say(f"after bob left {i}")["message"] == f"after bob left {i}"


def test_control_characters_round_trip(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    text = "a\u0001b\u001f\t\"\\\u2028\u2029\u007f end"
    ack = alice.say(text)
    assert ack["message"] == text
    assert bob.recv()["message"] == text
    assert server.history("general")["messages"][0]["message"] == text


def test_nul_character_is_a_bad_request(server):
    # "\u0000" is legal in a JSON string, so this is a JSON object (no 1007 close); the
    # server refuses U+0000 in message text with a clear error and keeps the connection
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    alice.send({"event": "message:message", "message": "before\u0000after", "client_id": "n1"})
    err = alice.recv()
    assert err["event"] == "error" and err["code"] == "bad_request", err
    assert "U+0000" in err["detail"]
    assert err.get("client_id") == "n1"
    ack = alice.say("still here")
    assert ack["message"] == "still here"
    assert bob.recv()["message"] == "still here"  # bob never saw the refused one
    assert [m["message"] for m in server.history("general")["messages"]] == ["still here"]


def test_non_ascii_user_id_from_token(server):
    user = "zo\u00eb-\u4f60"
    alice = server.client("general", user)
    ack = alice.say("hi", client_id="c-\u00e9")
    assert ack["user_from"] == user
    assert ack["client_id"] == "c-\u00e9"
    m = server.history("general")["messages"][0]
    assert m["user_from"] == user and m["client_id"] == "c-\u00e9"


def test_large_message_round_trip(chatd):
    # server frames over 65535 bytes need the 64-bit length form
    srv = chatd("--max-message-bytes", "200000")
    alice = srv.client("general", "alice")
    bob = srv.client("general", "bob")
    text = "".join(chr(0x41 + i % 26) for i in range(150000))
    ack = alice.say(text)
    assert ack["message"] == text
    assert bob.recv()["message"] == text
    assert srv.history("general")["messages"][0]["message"] == text
