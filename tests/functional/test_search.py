"""Search: GET /api/chats/{chat_id}/search (one chat) and GET /api/search (several chats).

Both backends answer the same API (--search sqlite: the FTS5 index in the SQLite store;
--search scan: a bounded scan of the history). The tests that hold for both run on every
backend the suite's store has (SQLite: both; Cassandra: scan); what is particular to one
backend is tested on that one: FTS5 tests always on a SQLite store of their own, the
scan's bounds on the suite's store."""

import json
import sqlite3
import subprocess
import time

import pytest

from conftest import CHATCTL, CHATD, TEST_STORE, clean_env, require_binary
from helpers import HttpConn, check_id
from test_rest import assert_json_error

SCAN_MAX = 5000  # SEARCH_SCAN_MAX in src/search/search_scan.c
SCAN_BYTES = 2 << 20  # SEARCH_SCAN_BYTES

# the backends this suite's store can serve
BACKENDS = ["sqlite", "scan"] if TEST_STORE == "sqlite" else ["scan"]


@pytest.fixture(params=BACKENDS)
def server(request, chatd):
    """A chatd with each search backend the store has, in turn."""
    s = chatd("--search", request.param)
    s.search = request.param
    return s


@pytest.fixture
def scan_server(chatd):
    s = chatd("--search", "scan")
    s.search = "scan"
    return s


@pytest.fixture
def fts_server(chatd, tmp_path):
    """FTS5 needs the SQLite store: its own, whatever store the suite runs on."""
    s = chatd("--search", "sqlite", store=f"sqlite:{tmp_path}/fts.db")
    s.search = "sqlite"
    return s


def search(server, chat, user="reader", **params):
    r = server.get(f"/api/chats/{chat}/search", user=user, params=params)
    assert r.status_code == 200, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


def search_all(server, user="reader", token=None, **params):
    headers = {"Authorization": f"Bearer {token}"} if token else None
    r = server.get("/api/search", user=None if token else user, params=params, headers=headers or {})
    assert r.status_code == 200, (r.status_code, r.text)
    return r.json()


def texts(page):
    return [m["message"] for m in page["messages"]]


# ---- both backends ------------------------------------------------------------------------

def test_every_word_must_appear_ignoring_case(server):
    alice = server.client("general", "alice")
    for text in ["The Red fox", "a red hen", "blue fox", "RED FOX again", "nothing here"]:
        alice.say(text)
    page = search(server, "general", q="red fox")
    assert texts(page) == ["RED FOX again", "The Red fox"]
    assert page["chat_id"] == "general"
    assert page["next_before"] is None
    assert texts(search(server, "general", q="  FOX\t")) == ["RED FOX again", "blue fox", "The Red fox"]
    assert texts(search(server, "general", q="green")) == []


def test_results_are_history_messages_with_a_highlight(server):
    alice = server.client("general", "alice")
    ack = alice.say("find me please", client_id="k1")
    [m] = search(server, "general", q="find")["messages"]
    hist = server.history("general")["messages"]
    assert m.pop("highlight") == "<em>find</em> me please"
    assert m == hist[0]
    assert m["message_id"] == ack["message_id"] and m["client_id"] == "k1"
    assert m["user_from"] == "alice" and m["chat_id"] == "general"
    check_id(m["message_id"])


def test_highlight_escapes_the_text_around_the_matches(server):
    alice = server.client("general", "alice")
    alice.say("<b>Red</b> & \"fox\" isn't <script>red</script>")
    [m] = search(server, "general", q="red")["messages"]
    assert m["highlight"] == ("&lt;b&gt;<em>Red</em>&lt;/b&gt; &amp; &quot;fox&quot; isn&#39;t "
                              "&lt;script&gt;<em>red</em>&lt;/script&gt;")
    [m] = search(server, "general", q="fox -zebra")["messages"]
    assert m["highlight"].count("<em>") == 1 and "<em>fox</em>" in m["highlight"]


def test_phrases_and_exclusions(server):
    alice = server.client("general", "alice")
    for text in ["the quick brown fox", "quick and brown", "brown quick fox", "slow brown fox"]:
        alice.say(text)
    assert texts(search(server, "general", q='"quick brown"')) == ["the quick brown fox"]
    assert texts(search(server, "general", q="quick brown")) == [
        "brown quick fox", "quick and brown", "the quick brown fox"]
    assert texts(search(server, "general", q="brown -quick")) == ["slow brown fox"]
    assert texts(search(server, "general", q='fox -"quick brown"')) == [
        "slow brown fox", "brown quick fox"]
    [m] = search(server, "general", q='"quick brown"')["messages"]
    assert "<em>quick" in m["highlight"] and "brown</em>" in m["highlight"]


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
    assert search(server, "general", q="plan")["messages"] == []


def test_messages_sent_over_rest_are_searchable(server):
    r = server.post("/api/chats/general/messages", user="bot", json={"message": "posted by a bot"})
    assert r.status_code == 201, r.text
    [m] = search(server, "general", q="bot")["messages"]
    assert m["message"] == "posted by a bot" and m["user_from"] == "bot"


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


def test_search_is_per_chat(server):
    server.client("a", "alice").say("same words")
    server.client("b", "alice").say("same words too")
    assert texts(search(server, "a", q="same")) == ["same words"]
    assert texts(search(server, "b", q="same")) == ["same words too"]
    assert search(server, "never-used", q="same") == {
        "chat_id": "never-used", "messages": [], "next_before": None, "scanned": 0}


BAD_QUERIES = {
    "no-q": {}, "empty": {"q": ""}, "blank": {"q": "   "}, "too-long": {"q": "x" * 257},
    "9-terms": {"q": "a " * 8 + "b"}, "9-with-excludes": {"q": "a b c d e f g h -i"},
    "unbalanced-quote": {"q": 'red "fox'}, "lone-quote": {"q": '"'},
    "empty-phrase": {"q": 'red ""'}, "blank-phrase": {"q": 'red "   "'},
    "only-excludes": {"q": "-red -fox"}, "only-excluded-phrase": {"q": '-"red fox"'},
    "limit-0": {"q": "a", "limit": "0"}, "limit-101": {"q": "a", "limit": "101"},
    "limit-x": {"q": "a", "limit": "x"}, "before-zz": {"q": "a", "before": "zz"},
    "before-0": {"q": "a", "before": "0"},
    "nul": {"q": "red\x00fox"}, "control": {"q": "red \x01"},
}


@pytest.mark.parametrize("params", BAD_QUERIES.values(), ids=BAD_QUERIES.keys())
def test_bad_params_are_400(server, params):
    assert_json_error(server.get("/api/chats/general/search", user="reader", params=params), 400)
    all_params = dict(params, chats="general")
    assert_json_error(server.get("/api/search", user="reader", params=all_params), 400)


def test_query_text_is_never_engine_syntax(server):
    """What FTS5 would read as its own syntax is only words here: never a 400 from the
    engine, never a 500, and it finds the words."""
    alice = server.client("general", "alice")
    alice.say("message NEAR col OR star")
    for q in ["NEAR(message col)", "message:col", "col*", "OR", "star AND", "^star", "{message}",
              "star +col", "NOT", "a:b:c", "(star", "star)"]:
        r = server.get("/api/chats/general/search", user="reader", params={"q": q})
        assert r.status_code in (200, 400), (q, r.status_code, r.text)
        if r.status_code == 400:
            assert_json_error(r, 400)
    assert texts(search(server, "general", q="OR")) == ["message NEAR col OR star"]
    assert texts(search(server, "general", q="NOT")) == []


def test_q_of_256_bytes_and_8_terms_is_fine(server):
    server.client("general", "alice").say("alpha beta gamma")
    assert search(server, "general", q="x" * 256)["messages"] == []
    assert texts(search(server, "general", q="alpha beta gamma alpha beta gamma alpha beta")) == [
        "alpha beta gamma"]
    r = server.get("/api/chats/general/search?q=alpha+beta", user="reader")  # '+' is a blank
    assert texts(r.json()) == ["alpha beta gamma"]


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


# ---- /api/search: several chats -------------------------------------------------------------

def test_across_chats_newest_first_each_hit_naming_its_chat(server):
    a, b, c = (server.client(chat, "alice") for chat in ("a", "b", "c"))
    ids = [a.say("lunch at noon")["message_id"], b.say("lunch? sure")["message_id"],
           c.say("lunch in chat c")["message_id"], a.say("no food talk")["message_id"],
           b.say("late lunch")["message_id"]]
    page = search_all(server, q="lunch", chats="a,b")
    assert page["chats"] == ["a", "b"]
    assert [(m["chat_id"], m["message_id"]) for m in page["messages"]] == [
        ("b", ids[4]), ("b", ids[1]), ("a", ids[0])]
    assert page["next_before"] is None
    assert all("<em>lunch</em>" in m["highlight"].lower() for m in page["messages"])
    assert texts(search_all(server, q="lunch", chats="c,c")) == ["lunch in chat c"]


def test_across_chats_paging_walks_every_match_once(server):
    clients = {chat: server.client(chat, "alice") for chat in ("x", "y", "z")}
    want = []
    for i in range(24):
        chat = "xyz"[i % 3]
        ack = clients[chat].say(f"hit {i}" if i % 2 == 0 else f"miss {i}")
        if i % 2 == 0:
            want.append((chat, ack["message_id"]))
    seen, before = [], None
    for _ in range(20):
        params = {"q": "hit", "chats": "x,y,z", "limit": 5}
        if before:
            params["before"] = before
        page = search_all(server, **params)
        seen += [(m["chat_id"], m["message_id"]) for m in page["messages"]]
        before = page["next_before"]
        if before is None:
            break
    assert seen == want[::-1]


def test_from_keeps_one_author(server):
    server.client("a", "alice").say("status report")
    server.client("b", "bob").say("status update")
    server.client("a", "bob").say("status again")
    page = search_all(server, q="status", chats="a,b", **{"from": "bob"})
    assert texts(page) == ["status again", "status update"]
    assert {m["user_from"] for m in page["messages"]} == {"bob"}
    assert search_all(server, q="status", chats="a,b", **{"from": "nobody"})["messages"] == []


def test_the_chats_claim_decides_what_may_be_searched(server):
    server.client("mine", "alice").say("shared word")
    server.client("theirs", "bob").say("shared word")
    tok = server.token("carol", chats=["mine", "other"])
    # without chats=: every chat of the claim
    page = search_all(server, token=tok, q="shared")
    assert page["chats"] == ["mine", "other"]
    assert [m["chat_id"] for m in page["messages"]] == ["mine"]
    # naming a chat outside the claim: 403, and nothing of it comes back
    r = server.get("/api/search", params={"q": "shared", "chats": "mine,theirs"},
                   headers={"Authorization": f"Bearer {tok}"})
    assert_json_error(r, 403)
    assert "theirs" not in r.text.replace('"detail"', "")
    # a token without the claim must name its chats
    assert_json_error(server.get("/api/search", user="reader", params={"q": "shared"}), 400)
    assert [m["chat_id"] for m in search_all(server, q="shared", chats="theirs")["messages"]] == [
        "theirs"]


@pytest.mark.parametrize("params", [
    {"q": "a", "chats": ""}, {"q": "a", "chats": "a,,b"}, {"q": "a", "chats": "a,"},
    {"q": "a", "chats": "bad id"}, {"q": "a", "chats": ",".join(f"c{i}" for i in range(33))},
    {"q": "a", "chats": "a", "from": ""}, {"q": "a", "chats": "a", "from": "x\x01y"},
], ids=["empty", "empty-item", "trailing-comma", "bad-id", "33-chats", "from-empty",
        "from-control"])
def test_bad_search_all_params_are_400(server, params):
    assert_json_error(server.get("/api/search", user="reader", params=params), 400)


def test_search_all_auth_and_method(server):
    assert_json_error(server.get("/api/search", params={"q": "a", "chats": "a"}), 401)
    r = server.post("/api/search", user="reader", json={})
    assert_json_error(r, 405)
    assert search_all(server, q="a", chats=",".join(f"c{i}" for i in range(32)))["messages"] == []


# ---- FTS5 (--search sqlite): words, folding, the index in the store's transactions -------

def test_fts_folds_case_and_diacritics_and_matches_whole_words(fts_server):
    server = fts_server
    alice = server.client("general", "alice")
    alice.say("Un café à Köln")
    alice.say("GRÜSSE aus Zürich")
    assert texts(search(server, "general", q="cafe")) == ["Un café à Köln"]
    assert texts(search(server, "general", q="KÖLN")) == ["Un café à Köln"]
    assert texts(search(server, "general", q="zurich grusse")) == ["GRÜSSE aus Zürich"]
    assert texts(search(server, "general", q="caf")) == []  # whole words, not substrings
    [m] = search(server, "general", q="cafe")["messages"]
    assert m["highlight"] == "Un <em>café</em> à Köln"


def test_fts_a_query_without_any_word_is_400(fts_server):
    r = fts_server.get("/api/chats/general/search", user="reader", params={"q": "!!! ..."})
    assert_json_error(r, 400)
    assert "letter or digit" in r.json()["detail"]


def test_fts_scanned_counts_the_hits_read(fts_server):
    alice = fts_server.client("general", "alice")
    for i in range(5):
        alice.say(f"word {i}")
    page = search(fts_server, "general", q="word", limit=2)
    assert page["scanned"] == 2 and page["next_before"] is not None


def test_fts_an_acknowledged_message_is_searchable_after_kill9(fts_server):
    """The index is written in the commit that makes the message durable: what was
    acknowledged is found after a crash, edits and deletes included."""
    server = fts_server
    alice = server.client("general", "alice")
    kept = alice.say("survivor words")
    gone = alice.say("doomed words")
    changed = alice.say("before the edit")
    alice.send({"event": "message:delete", "message_id": gone["message_id"]})
    alice.wait_for(lambda ev: ev.get("event") == "message:delete")
    alice.send({"event": "message:edit", "message_id": changed["message_id"],
                "message": "after the edit"})
    alice.wait_for(lambda ev: ev.get("event") == "message:edit")
    server.kill9()
    server.start()
    assert [m["message_id"] for m in search(server, "general", q="survivor")["messages"]] == [
        kept["message_id"]]
    assert search(server, "general", q="doomed")["messages"] == []
    assert texts(search(server, "general", q="edit")) == ["after the edit"]
    assert search(server, "general", q="before")["messages"] == []


def v1_database(path, rows):
    """A database as schema version 1 left it (before the search index)."""
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE messages (chat_id TEXT NOT NULL, id INTEGER NOT NULL,
            user_from TEXT NOT NULL, message TEXT, client_id TEXT, created_at INTEGER NOT NULL,
            edited_at INTEGER, deleted_at INTEGER, PRIMARY KEY (chat_id, id)) WITHOUT ROWID;
        CREATE UNIQUE INDEX messages_client_id ON messages (chat_id, user_from, client_id)
            WHERE client_id IS NOT NULL;
        PRAGMA user_version = 1;
    """)
    db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, NULL, ?, NULL, ?)", rows)
    db.commit()
    db.close()


OLD_ROWS = [("general", 1 << 22, "alice", "an old message about tea", 1700000000000, None),
            ("general", 2 << 22, "alice", None, 1700000000001, 1700000000005),
            ("other", 3 << 22, "bob", "tea elsewhere", 1700000000002, None)]


def test_fts_an_existing_database_is_indexed_on_upgrade(chatd, tmp_path):
    path = tmp_path / "old.db"
    v1_database(path, OLD_ROWS)
    server = chatd("--search", "sqlite", store=f"sqlite:{path}")
    assert texts(search(server, "general", q="tea")) == ["an old message about tea"]
    assert texts(search(server, "other", q="tea")) == ["tea elsewhere"]
    server.client("general", "alice").say("new tea")
    assert texts(search(server, "general", q="tea")) == ["new tea", "an old message about tea"]
    server.stop_ok()
    server.start()  # the upgrade ran once: the old rows are not indexed twice
    assert texts(search(server, "general", q="tea")) == ["new tea", "an old message about tea"]
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 3  # the newest version
    assert db.execute("SELECT count(*) FROM messages_fts").fetchone()[0] == 3
    db.close()


def test_fts_chatctl_migrate_indexes_an_existing_database(tmp_path):
    require_binary(CHATCTL)
    path = tmp_path / "old.db"
    v1_database(path, OLD_ROWS)
    for _ in range(2):  # idempotent
        res = subprocess.run([str(CHATCTL), "migrate", "--store", f"sqlite:{path}"],
                             capture_output=True, text=True, timeout=30, env=clean_env(None))
        assert res.returncode == 0, res.stderr
    db = sqlite3.connect(path)
    rows = db.execute("SELECT rowid FROM messages_fts WHERE messages_fts MATCH 'tea' "
                      "ORDER BY rowid").fetchall()
    db.close()
    assert rows == [(1 << 22,), (3 << 22,)]


# ---- scan (--search scan): substrings, and the bounds of one request ----------------------

def test_scan_matches_substrings_ignoring_ascii_case_only(scan_server):
    server = scan_server
    alice = server.client("general", "alice")
    for text in ["The Red fox", "a red hen", "blue fox", "RED FOX again", "nothing here"]:
        alice.say(text)
    page = search(server, "general", q="red fox")
    assert page["scanned"] == 5
    assert texts(search(server, "general", q="ed fo")) == ["RED FOX again", "The Red fox"]
    [m] = search(server, "general", q="ed fo", limit=1)["messages"]
    assert m["highlight"] == "R<em>ED</em> <em>FO</em>X again"


def test_scan_non_ascii_text_matches_exactly(scan_server):
    server = scan_server
    alice = server.client("general", "alice")
    alice.say("Grüße aus Köln")
    alice.say("GRÜSSE")
    assert texts(search(server, "general", q="grüße")) == ["Grüße aus Köln"]
    assert texts(search(server, "general", q="KÖLN")) == []  # Ö is not ASCII: exact
    assert texts(search(server, "general", q="köln")) == ["Grüße aus Köln"]
    assert texts(search(server, "general", q="привет")) == []


def test_scan_terms_are_substrings(scan_server):
    server = scan_server
    server.client("general", "alice").say("abc")
    assert texts(search(server, "general", q="a b c a b c a b")) == ["abc"]
    assert texts(search(server, "general", q="a+b")) == []  # sent as %2B: a literal '+'


def test_scan_one_request_reads_a_bounded_number_of_bytes(scan_server):
    """Large messages: the request stops after SCAN_BYTES of text, before SCAN_MAX messages,
    and says where to go on; walking on finds the old match and ends."""
    server = scan_server
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


def test_scan_one_request_reads_a_bounded_number_of_messages(scan_server):
    """Past SCAN_MAX messages without enough matches, the answer stops and says where to go
    on; going on finds the older match."""
    server = scan_server
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


def test_scan_across_chats_shares_the_bound_and_misses_nothing(scan_server):
    """Two chats: each gets half of the messages bound; the answer holds only what is newer
    than where a chat's scan stopped, so walking on finds every match exactly once."""
    server = scan_server
    a, b = server.client("a", "alice"), server.client("b", "alice")
    old_a = a.say("needle a")["message_id"]
    n = SCAN_MAX // 2 + 20
    for i in range(n):
        a.send({"event": "message:message", "message": f"hay {i}", "client_id": f"h{i}"})
    acks = 0
    deadline = time.monotonic() + 120
    while acks < n:
        ev = a.recv(timeout=max(0.1, deadline - time.monotonic()))
        if ev.get("event") == "message:message" and ev.get("user_from") == "alice":
            acks += 1
    new_b = b.say("needle b")["message_id"]
    found, before, pages = [], None, 0
    while True:
        params = {"q": "needle", "chats": "a,b"}
        if before:
            params["before"] = before
        page = search_all(server, **params)
        pages += 1
        found += [m["message_id"] for m in page["messages"]]
        before = page["next_before"]
        if before is None:
            break
    assert found == [new_b, old_a]
    assert pages == 2


# ---- configuration ------------------------------------------------------------------------

@pytest.mark.parametrize("name,says", [("lucene", "sqlite, scan"),
                                       ("opensearch://", "host:port"),
                                       ("elasticsearch://127.0.0.1:9200/Bad", "ALIAS"),
                                       ("opensearch://127.0.0.1:9200?x=1", "host:port")])
def test_an_unknown_backend_or_a_bad_engine_url_is_refused_at_startup(tmp_path, name, says):
    require_binary(CHATD)
    res = subprocess.run([str(CHATD), "--port", "0", "--host", "127.0.0.1", "--store",
                          f"sqlite:{tmp_path}/x.db", "--jwt-secret", "s", "--search", name],
                         capture_output=True, text=True, timeout=30, env=clean_env(None))
    assert res.returncode != 0
    assert says in res.stderr + res.stdout


def test_sqlite_search_needs_the_sqlite_store_and_says_so_before_connecting(tmp_path):
    require_binary(CHATD)
    res = subprocess.run([str(CHATD), "--port", "0", "--host", "127.0.0.1", "--store",
                          "cassandra://127.0.0.1:1/nowhere", "--jwt-secret", "s",
                          "--search", "sqlite"],
                         capture_output=True, text=True, timeout=30, env=clean_env(None))
    assert res.returncode != 0
    out = res.stderr + res.stdout
    assert "--search sqlite needs the SQLite store" in out and "scan" in out
    assert "connect" not in out  # refused before any attempt to reach the store


def test_the_environment_chooses_the_backend_and_an_engine_away_is_a_503(chatd):
    """CHAT_SEARCH names an OpenSearch nobody listens on: chatd starts all the same (the
    engine is not needed to chat), and a search is a 503 JSON error naming the engine, on
    both endpoints, never a hang or a 500."""
    server = chatd(env={"CHAT_SEARCH": "opensearch://127.0.0.1:1"})
    server.client("general", "alice").say("hello")
    r = server.get("/api/chats/general/search", user="reader", params={"q": "hello"})
    assert r.status_code == 503 and r.json()["error"] == "search_unavailable", r.text
    r = server.get("/api/search", user="reader", params={"q": "hello", "chats": "general"})
    assert r.status_code == 503 and r.json()["error"] == "search_unavailable", r.text
    # syntax is still ours to judge, engine or not
    r = server.get("/api/search", user="reader", params={"q": '"open', "chats": "general"})
    assert r.status_code == 400 and r.json()["error"] == "bad_query", r.text


def test_an_answer_stops_at_about_a_megabyte_and_says_where_to_go_on(server):
    """Hits of large messages: one answer holds about 1 MiB of JSON (at least one hit), as a
    history page does, and next_before walks on to every match exactly once."""
    alice = server.client("general", "alice")
    ids = [alice.say(f"needle {i} " + "<&>" * 15_000)["message_id"] for i in range(30)]
    seen, before, pages = [], None, 0
    while True:
        params = {"q": "needle", "limit": 100}
        if before:
            params["before"] = before
        r = server.get("/api/chats/general/search", user="reader", params=params)
        assert r.status_code == 200
        assert len(r.content) < (1 << 20) + 400_000, len(r.content)
        page = r.json()
        assert page["messages"]
        seen += [m["message_id"] for m in page["messages"]]
        pages += 1
        before = page["next_before"]
        if before is None:
            break
    assert seen == ids[::-1]
    assert pages > 1
