"""GET /api/chats/{chat_id}/search: words looked up in one chat's messages, newest first,
with the same message objects as the history, a cursor to go on, and a bound on how many
messages one request reads."""

import time

import pytest

from helpers import HttpConn, check_id
from test_rest import assert_json_error

SCAN_MAX = 5000  # SEARCH_SCAN_MAX in src/chat/routes.c
SCAN_BYTES = 2 << 20  # SEARCH_SCAN_BYTES


def search(server, chat, user="reader", **params):
    r = server.get(f"/api/chats/{chat}/search", user=user, params=params)
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def texts(page):
    return [m["message"] for m in page["messages"]]


def test_every_word_must_appear_ignoring_ascii_case(server):
    alice = server.client("general", "alice")
    for text in ["The Red fox", "a red hen", "blue fox", "RED FOX again", "nothing here"]:
        alice.say(text)
    page = search(server, "general", q="red fox")
    assert texts(page) == ["RED FOX again", "The Red fox"]
    assert page["chat_id"] == "general"
    assert page["next_before"] is None
    assert page["scanned"] == 5
    assert texts(search(server, "general", q="  FOX\t")) == ["RED FOX again", "blue fox", "The Red fox"]
    assert texts(search(server, "general", q="ed fo")) == ["RED FOX again", "The Red fox"]
    assert texts(search(server, "general", q="green")) == []


def test_results_are_history_messages(server):
    alice = server.client("general", "alice")
    ack = alice.say("find me please", client_id="k1")
    [m] = search(server, "general", q="find")["messages"]
    hist = server.history("general")["messages"]
    assert m == hist[0]
    assert m["message_id"] == ack["message_id"] and m["client_id"] == "k1"
    assert m["user_from"] == "alice" and m["chat_id"] == "general"
    check_id(m["message_id"])


def test_non_ascii_text_matches_exactly(server):
    alice = server.client("general", "alice")
    alice.say("Grüße aus Köln")
    alice.say("GRÜSSE")
    assert texts(search(server, "general", q="grüße")) == ["Grüße aus Köln"]
    assert texts(search(server, "general", q="KÖLN")) == []  # Ö is not ASCII: exact
    assert texts(search(server, "general", q="köln")) == ["Grüße aus Köln"]
    assert texts(search(server, "general", q="привет")) == []


def test_edits_are_searched_as_they_are_now_and_deleted_messages_never(server):
    alice = server.client("general", "alice")
    a = alice.say("old words")
    b = alice.say("secret plan")
    alice.send({"event": "message:edit", "message_id": a["message_id"], "message": "new words"})
    alice.wait_for(lambda ev: ev.get("event") == "message:edit")
    alice.send({"event": "message:delete", "message_id": b["message_id"]})
    alice.wait_for(lambda ev: ev.get("event") == "message:delete")
    assert texts(search(server, "general", q="old")) == []
    [m] = search(server, "general", q="new")["messages"]
    assert m["message"] == "new words" and "edited_at" in m
    assert search(server, "general", q="secret")["messages"] == []


def test_limit_and_next_before_walk_every_match_once(server):
    alice = server.client("general", "alice")
    ids = []
    for i in range(30):
        ack = alice.say(f"match {i}" if i % 3 == 0 else f"other {i}")
        if i % 3 == 0:
            ids.append(ack["message_id"])
    seen, before = [], None
    for _ in range(20):  # 10 matches, 4 a page: 3 pages; a cursor that loops fails here
        params = {"q": "match", "limit": 4}
        if before:
            params["before"] = before
        page = search(server, "general", **params)
        seen += [m["message_id"] for m in page["messages"]]
        before = page["next_before"]
        if before is None:
            break
        assert len(page["messages"]) == 4
    assert before is None
    assert seen == ids[::-1]


def test_the_last_match_on_the_oldest_message_ends_the_walk(server):
    alice = server.client("general", "alice")
    first = alice.say("first words")["message_id"]
    alice.say("later")
    page = search(server, "general", q="first", limit=1)
    assert [m["message_id"] for m in page["messages"]] == [first]
    assert page["next_before"] is None
    newest = alice.say("first again")["message_id"]
    page = search(server, "general", q="first", limit=1)
    assert [m["message_id"] for m in page["messages"]] == [newest]
    assert page["next_before"] == newest


def test_one_request_reads_a_bounded_number_of_bytes(server):
    """Large messages: the request stops after SCAN_BYTES of text, before SCAN_MAX messages,
    and says where to go on; walking on finds the old match and ends."""
    alice = server.client("general", "alice")
    old = alice.say("needle")["message_id"]
    big = 60_000
    count = SCAN_BYTES // big + 5
    for i in range(count):
        alice.say(f"{i} " + "h" * big)
    page = search(server, "general", q="needle")
    assert page["messages"] == [] and page["next_before"] is not None
    first = page["scanned"]
    assert first < count and first * big >= SCAN_BYTES - big, first
    page = search(server, "general", q="needle", before=page["next_before"])
    assert [m["message_id"] for m in page["messages"]] == [old]
    assert page["next_before"] is None
    assert first + page["scanned"] == count + 1


def test_head_and_keep_alive(server):
    conn = HttpConn(server.port)
    try:
        auth = server.auth("reader")
        r = conn.request("HEAD", "/api/chats/general/search?q=x", headers=auth)
        assert r.status == 200 and r.body == b""
        assert int(r.headers["content-length"]) > 0
        r = conn.request("GET", "/api/chats/general/search?q=x", headers=auth)
        assert r.status == 200 and r.json()["messages"] == []
    finally:
        conn.close()


def test_one_request_reads_a_bounded_number_of_messages(server):
    """Past SCAN_MAX messages without enough matches, the answer stops and says where to go
    on; going on finds the older match."""
    alice = server.client("general", "alice")
    old = alice.say("needle in the hay")["message_id"]
    n = SCAN_MAX + 50
    for i in range(n):  # pipelined: all sent, then all acks read
        alice.send({"event": "message:message", "message": f"hay {i}", "client_id": f"h{i}"})
    acks = 0
    deadline = time.monotonic() + 120
    while acks < n:
        ev = alice.recv(timeout=max(0.1, deadline - time.monotonic()))
        assert ev.get("event") != "error", ev
        if ev.get("event") == "message:message" and ev.get("user_from") == "alice":
            acks += 1
    page = search(server, "general", q="needle")
    assert page["messages"] == []
    assert page["scanned"] == SCAN_MAX
    assert page["next_before"] is not None
    page = search(server, "general", q="needle", before=page["next_before"])
    assert [m["message_id"] for m in page["messages"]] == [old]
    assert page["scanned"] == 51 and page["next_before"] is None


def test_search_is_per_chat(server):
    server.client("a", "alice").say("same words")
    server.client("b", "alice").say("same words too")
    assert texts(search(server, "a", q="same")) == ["same words"]
    assert texts(search(server, "b", q="same")) == ["same words too"]
    assert search(server, "never-used", q="same") == {
        "chat_id": "never-used", "messages": [], "next_before": None, "scanned": 0}


@pytest.mark.parametrize(
    "params",
    [{}, {"q": ""}, {"q": "   "}, {"q": "x" * 257}, 
     {"q": "a " * 8 + "b"},
     {"q": "a", "limit": "0"}, {"q": "a", "limit": "101"}, {"q": "a", "limit": "x"},
     {"q": "a", "before": "zz"}, {"q": "a", "before": "0"}],
    ids=["no-q", "empty", "blank", "too-long", "9-terms", "limit-0", "limit-101", "limit-x",
         "before-zz", "before-0"],
)
def test_bad_params_are_400(server, params):
    assert_json_error(server.get("/api/chats/general/search", user="reader", params=params), 400)


def test_q_of_256_bytes_and_8_terms_is_fine(server):
    server.client("general", "alice").say("abc")
    assert search(server, "general", q="x" * 256)["messages"] == []
    assert texts(search(server, "general", q="a b c a b c a b")) == ["abc"]
    r = server.get("/api/chats/general/search?q=a+b", user="reader")  # '+' is a blank
    assert texts(r.json()) == ["abc"]
    assert texts(search(server, "general", q="a+b")) == []  # sent as %2B: a literal '+'


def test_q_that_is_not_utf8_is_400(server):
    r = server.get("/api/chats/general/search?q=%FF%FE", user="reader")
    assert_json_error(r, 400)


def test_auth_and_method(server):
    assert_json_error(server.get("/api/chats/general/search", params={"q": "a"}), 401)
    tok = server.token("eve", chats=["other"])
    r = server.get("/api/chats/general/search", params={"q": "a"},
                   headers={"Authorization": f"Bearer {tok}"})
    assert_json_error(r, 403)
    r = server.post("/api/chats/general/search", user="reader", json={"q": "a"})
    assert_json_error(r, 405)
    assert "GET" in r.headers["allow"]
    assert_json_error(server.get("/api/chats/bad%20id/search", user="reader",
                                 params={"q": "a"}), 400)
