"""The REST API and plain HTTP: history paging, posting, errors, keep-alive, health, metrics."""

import json
import os
import select
import time

import pytest

from helpers import (
    HttpConn,
    build_request,
    check_id,
    check_ts,
    make_jwt,
    metric_names,
    metric_value,
    parse_metrics,
    upgrade_headers,
    wait_until,
)


def assert_json_error(r, status):
    """r: a requests.Response or a helpers.Response."""
    code = getattr(r, "status_code", None) or r.status
    assert code == status, (code, getattr(r, "text", None) or r.body)
    ctype = r.headers.get("content-type", r.headers.get("Content-Type", ""))
    assert ctype.startswith("application/json"), ctype
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("detail"), str), body
    return body


# ---- history ------------------------------------------------------------------------------


def test_history_paging(server):
    alice = server.client("general", "alice")
    acks = [alice.say(f"m{i}", client_id=f"c{i}") for i in range(120)]
    newest_first = [a["message_id"] for a in reversed(acks)]

    r = server.get("/api/chats/general/messages", user="reader", params={"limit": 50})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    p1 = r.json()
    assert p1["chat_id"] == "general"
    assert [m["message_id"] for m in p1["messages"]] == newest_first[:50]
    assert isinstance(p1["next_before"], str)
    check_id(p1["next_before"])

    m = p1["messages"][0]
    a = acks[-1]
    assert m["chat_id"] == "general" and m["user_from"] == "alice"
    assert m["message"] == "m119" and m["client_id"] == "c119"
    assert m["created_at"] == a["created_at"]
    check_ts(m["created_at"])
    assert m["deleted"] is False
    assert "edited_at" not in m and "deleted_at" not in m

    p2 = server.history("general", limit=50, before=p1["next_before"])
    assert [m["message_id"] for m in p2["messages"]] == newest_first[50:100]
    assert isinstance(p2["next_before"], str)

    p3 = server.history("general", limit=50, before=p2["next_before"])
    assert [m["message_id"] for m in p3["messages"]] == newest_first[100:]
    assert p3["next_before"] is None
    assert [m["message"] for m in p3["messages"]] == [f"m{i}" for i in range(19, -1, -1)]


def test_history_default_limit_is_50_and_max_is_200(server):
    alice = server.client("general", "alice")
    ids = [alice.say(f"m{i}")["message_id"] for i in range(60)]
    assert len(server.history("general")["messages"]) == 50
    page = server.history("general", limit=200)
    assert [m["message_id"] for m in page["messages"]] == ids[::-1]
    assert page["next_before"] is None


def test_history_limit_1_walks_one_by_one(server):
    alice = server.client("general", "alice")
    ids = [alice.say(f"m{i}")["message_id"] for i in range(3)]
    seen, before = [], None
    for _ in range(3):
        params = {"limit": 1} if before is None else {"limit": 1, "before": before}
        page = server.history("general", **params)
        assert len(page["messages"]) == 1
        seen.append(page["messages"][0]["message_id"])
        before = page["next_before"]
        if before is None:
            break
    if before is not None:
        last = server.history("general", limit=1, before=before)
        assert last["messages"] == [] and last["next_before"] is None
    assert seen == ids[::-1]


def test_history_before_arbitrary_id(server):
    alice = server.client("general", "alice")
    ids = [alice.say(f"m{i}")["message_id"] for i in range(10)]
    page = server.history("general", before=ids[5], limit=3)
    assert [m["message_id"] for m in page["messages"]] == [ids[4], ids[3], ids[2]]
    page = server.history("general", before=ids[0])
    assert page["messages"] == [] and page["next_before"] is None


def test_history_of_unknown_chat_is_empty(server):
    page = server.history("never-used")
    assert page == {"chat_id": "never-used", "messages": [], "next_before": None}


def test_history_is_per_chat(server):
    a = server.client("a", "alice")
    b = server.client("b", "alice")
    a.say("in a")
    b.say("in b")
    assert [m["message"] for m in server.history("a")["messages"]] == ["in a"]
    assert [m["message"] for m in server.history("b")["messages"]] == ["in b"]


@pytest.mark.parametrize(
    "params",
    [{"limit": "0"}, {"limit": "201"}, {"limit": "abc"}, {"limit": "-1"},
     {"limit": "5x"}, {"before": "xyz"}, {"before": "-1"}, {"before": "1.5"},
     {"before": "99999999999999999999999"}],
    ids=lambda p: "&".join(f"{k}={v}" for k, v in p.items()),
)
def test_history_bad_params_are_400(server, params):
    r = server.get("/api/chats/general/messages", user="reader", params=params)
    assert_json_error(r, 400)


def test_history_without_bearer_is_401(server):
    assert_json_error(server.get("/api/chats/general/messages"), 401)


@pytest.mark.parametrize("auth", ["Bearer", "Bearer not.a.token", "Basic YWxpY2U6cHc=", "garbage"])
def test_history_with_bad_authorization_is_401(server, auth):
    r = server.get("/api/chats/general/messages", headers={"Authorization": auth})
    assert_json_error(r, 401)


def test_history_with_expired_token_is_401(server):
    tok = make_jwt(server.secret, {"sub": "alice", "exp": int(time.time()) - 3600})
    r = server.get("/api/chats/general/messages", headers={"Authorization": f"Bearer {tok}"})
    assert_json_error(r, 401)


def test_history_chats_claim_excluding_chat_is_403(server):
    tok = server.token("alice", chats=["other"])
    r = server.get("/api/chats/general/messages", headers={"Authorization": f"Bearer {tok}"})
    assert_json_error(r, 403)
    tok = server.token("alice", chats=["general"])
    r = server.get("/api/chats/general/messages", headers={"Authorization": f"Bearer {tok}"})
    assert r.status_code == 200


def test_history_bad_chat_id_is_400(server):
    assert_json_error(server.get("/api/chats/bad%24id/messages", user="reader"), 400)
    assert_json_error(server.get("/api/chats/" + "a" * 129 + "/messages", user="reader"), 400)


@pytest.mark.parametrize("chat", [".", "..", "%2e", "%2E%2e"], ids=["dot", "dotdot", "pct_dot", "pct_dotdot"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_dot_and_dotdot_chat_ids_are_400(server, chat, method):
    # raw HTTP: a library client would normalise the path before it is sent
    c = HttpConn(server.port)
    try:
        body = json.dumps({"message": "hi"}).encode() if method == "POST" else b""
        h = {"Authorization": f"Bearer {server.token('reader')}"}
        if body:
            h["Content-Type"] = "application/json"
        resp = c.request(method, f"/api/chats/{chat}/messages", h, body=body)
    finally:
        c.close()
    err = assert_json_error(resp, 400)
    assert "chat id" in err["detail"], err


# ---- POST ---------------------------------------------------------------------------------


def test_post_message_201_and_broadcast(server):
    bob = server.client("general", "bob")
    r = server.post("/api/chats/general/messages", user="bot", json={"message": "beep", "client_id": "b-1"})
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/json")
    ev = r.json()
    assert ev["event"] == "message:message"
    assert ev["chat_id"] == "general" and ev["user_from"] == "bot"
    assert ev["message"] == "beep" and ev["client_id"] == "b-1"
    check_id(ev["message_id"])
    check_ts(ev["created_at"])
    assert bob.recv() == ev
    hist = server.history("general")["messages"]
    assert [m["message_id"] for m in hist] == [ev["message_id"]]


def test_post_message_with_nul_character(server):
    r = server.post("/api/chats/general/messages", user="bot", json={"message": "a\u0000b"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_request"
    assert "U+0000" in r.json()["detail"]
    assert server.history("general")["messages"] == []


def test_lowercase_authorization_header_name(server):
    c = HttpConn(server.port)
    r = c.request("GET", "/api/chats/general/messages",
                  headers={"authorization": f"Bearer {server.token('alice')}"})
    c.close()
    assert r.status == 200, r


def test_post_without_client_id(server):
    r = server.post("/api/chats/general/messages", user="bot", json={"message": "no id"})
    assert r.status_code == 201, r.text
    assert "client_id" not in r.json()


def test_post_duplicate_client_id_is_200_original(server):
    bob = server.client("general", "bob")
    r1 = server.post("/api/chats/general/messages", user="bot", json={"message": "once", "client_id": "d-1"})
    assert r1.status_code == 201
    assert bob.recv() == r1.json()
    r2 = server.post("/api/chats/general/messages", user="bot", json={"message": "once", "client_id": "d-1"})
    assert r2.status_code == 200, r2.text
    assert r2.json()["message_id"] == r1.json()["message_id"]
    assert r2.json()["created_at"] == r1.json()["created_at"]
    bob.expect_quiet(0.5)
    assert len(server.history("general")["messages"]) == 1


def test_post_and_websocket_share_idempotency(server):
    alice = server.client("general", "alice")
    ack = alice.say("via ws", client_id="shared-1")
    r = server.post("/api/chats/general/messages", user="alice",
                    json={"message": "via ws", "client_id": "shared-1"})
    assert r.status_code == 200, r.text
    assert r.json()["message_id"] == ack["message_id"]
    alice.expect_quiet(0.5)


def test_post_content_type_with_charset_is_accepted(server):
    r = server.post("/api/chats/general/messages", user="bot", data=b'{"message":"cs"}',
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_post_wrong_content_type_is_415(server, ctype):
    headers = {"Content-Type": ctype} if ctype else {}
    r = server.post("/api/chats/general/messages", user="bot", data=b'{"message":"x"}', headers=headers)
    assert_json_error(r, 415)
    assert server.history("general")["messages"] == []


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1,2]", b'"str"', b"{}", b'{"message":""}', b'{"message":5}',
     b'{"message":"x","client_id":7}', b'{"message":"x","client_id":""}', b"",
     b'{"message":"\xff"}'],
    ids=["bad_json", "array", "string", "no_message", "empty", "not_string", "cid_number",
         "cid_empty", "empty_body", "bad_utf8"],
)
def test_post_bad_body_is_400(server, body):
    r = server.post("/api/chats/general/messages", user="bot", data=body,
                    headers={"Content-Type": "application/json"})
    assert_json_error(r, 400)
    assert server.history("general")["messages"] == []


def test_post_without_token_is_401(server):
    r = server.post("/api/chats/general/messages", json={"message": "x"})
    assert_json_error(r, 401)


def test_post_chats_claim_excluding_chat_is_403(server):
    tok = server.token("bot", chats=["other"])
    r = server.post("/api/chats/general/messages", json={"message": "x"},
                    headers={"Authorization": f"Bearer {tok}"})
    assert_json_error(r, 403)
    assert server.history("general")["messages"] == []


def test_post_body_over_1mib_is_413(server):
    size = 2 * 1024 * 1024
    c = HttpConn(server.port, timeout=10)
    head = (f"POST /api/chats/general/messages HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {server.token('bot')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    c.send(head)
    chunk = b'{"message":"' + b"a" * (64 * 1024)
    sent = 0
    try:
        # send the body while watching for an early answer (the server may answer at once)
        while sent < size:
            r, _, _ = select.select([c.sock], [], [], 0)
            if r:
                break
            piece = chunk[: size - sent]
            c.sock.sendall(piece)
            sent += len(piece)
            chunk = b"a" * (64 * 1024)
    except (BrokenPipeError, ConnectionResetError):
        pass
    resp = c.read_response(timeout=10)
    c.close()
    assert_json_error(resp, 413)
    assert server.history("general")["messages"] == []


# ---- plain HTTP ---------------------------------------------------------------------------


def test_keep_alive_several_requests_on_one_connection(server):
    c = HttpConn(server.port)
    r1 = c.request("GET", "/healthz")
    assert r1.status == 200 and r1.json() == {"status": "ok"}
    r2 = c.request("GET", "/api/chats/general/messages", headers=server.auth("alice"))
    assert r2.status == 200 and r2.json()["messages"] == []
    body = json.dumps({"message": "keep-alive"}).encode()
    h = server.auth("alice")
    h["Content-Type"] = "application/json"
    r3 = c.request("POST", "/api/chats/general/messages", headers=h, body=body)
    assert r3.status == 201, r3
    r4 = c.request("GET", "/nope")
    assert r4.status == 404
    r5 = c.request("GET", "/healthz")
    assert r5.status == 200
    c.close()


def test_pipelined_requests(server):
    c = HttpConn(server.port)
    c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
    assert c.read_response().status == 200
    assert c.read_response().status == 404
    c.close()


def test_connection_close_is_honoured(server):
    c = HttpConn(server.port)
    r = c.request("GET", "/healthz", headers={"Connection": "close"})
    assert r.status == 200
    c.sock.settimeout(5)
    assert c.buf == b"" and c.sock.recv(100) == b""
    c.close()


@pytest.mark.parametrize("path", ["/nope", "/api", "/api/chats/general", "/api/chats/general/messages/x",
                                  "/healthz/extra"])
def test_unknown_path_is_404_json(server, path):
    assert_json_error(server.get(path, user="alice"), 404)


@pytest.mark.parametrize(
    "method,path,allowed",
    [("POST", "/healthz", {"GET"}), ("DELETE", "/metrics", {"GET"}),
     ("PUT", "/api/chats/general/messages", {"GET", "POST"}),
     ("DELETE", "/api/chats/general/messages", {"GET", "POST"})],
)
def test_wrong_method_is_405_with_allow(server, method, path, allowed):
    h = server.auth("alice")
    h["Content-Length"] = "0"
    c = HttpConn(server.port)
    r = c.request(method, path, headers=h)
    c.close()
    assert_json_error(r, 405)
    got = {m.strip().upper() for m in r.headers.get("allow", "").split(",") if m.strip()}
    assert allowed <= got, r.headers


def test_huge_header_is_431(server):
    c = HttpConn(server.port)
    try:
        r = c.request("GET", "/healthz", headers={"X-Big": "a" * 20000})
    finally:
        c.close()
    assert_json_error(r, 431)


def test_many_headers_totalling_20k_is_431(server):
    c = HttpConn(server.port)
    try:
        r = c.request("GET", "/healthz", headers={f"X-H{i}": "b" * 200 for i in range(100)})
    finally:
        c.close()
    assert_json_error(r, 431)


def test_healthz(server):
    r = server.get("/healthz")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"status": "ok"}


def test_web_root_serves_index(chatd, tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    (web / "index.html").write_text("<!doctype html><title>chat test page</title>")
    srv = chatd("--web-root", str(web))
    r = srv.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "chat test page" in r.text
    c = HttpConn(srv.port)
    r = c.request("GET", "/../../../../etc/passwd")
    c.close()
    assert r.status in (400, 403, 404) and b"root:" not in r.body


# ---- metrics ------------------------------------------------------------------------------


def test_metrics_names_and_counters(server):
    r = server.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    m0 = parse_metrics(r.text)
    names = metric_names(m0)
    for name in ["chat_connections", "chat_messages_in_total", "chat_messages_out_total",
                 "chat_store_latency_seconds_bucket", "chat_store_latency_seconds_sum",
                 "chat_store_latency_seconds_count"]:
        assert name in names, f"{name} missing from /metrics:\n{r.text}"
    assert metric_value(m0, "chat_connections") == 0

    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    m1 = parse_metrics(server.metrics_text())
    assert metric_value(m1, "chat_connections") == 2

    for i in range(5):
        alice.say(f"counted {i}")
        bob.recv()
    m2 = parse_metrics(server.metrics_text())
    assert metric_value(m2, "chat_messages_in_total") - (metric_value(m0, "chat_messages_in_total") or 0) >= 5
    assert metric_value(m2, "chat_messages_out_total") - (metric_value(m0, "chat_messages_out_total") or 0) >= 10
    assert metric_value(m2, "chat_store_latency_seconds_count") > (
        metric_value(m0, "chat_store_latency_seconds_count") or 0)
    inf = metric_value(m2, "chat_store_latency_seconds_bucket", le="+Inf")
    assert inf == metric_value(m2, "chat_store_latency_seconds_count")

    bob.close()
    wait_until(lambda: metric_value(parse_metrics(server.metrics_text()), "chat_connections") == 1,
               what="chat_connections == 1")
    wait_until(lambda: (metric_value(parse_metrics(server.metrics_text()), "chat_ws_closes_total",
                                     code="1000") or 0) >= 1,
               what='chat_ws_closes_total{code="1000"} >= 1')


def test_metrics_event_loop(server):
    """The loop's own load: a histogram of the work per turn and the time it sat idle.
    While nothing happens the idle counter grows with the wall clock, and never faster."""
    def scrape():
        t0 = time.monotonic()
        text = server.metrics_text()
        return parse_metrics(text), t0, time.monotonic(), text

    m0, sent0, _, text = scrape()
    for name in ["chat_loop_turn_seconds_bucket", "chat_loop_turn_seconds_sum",
                 "chat_loop_turn_seconds_count", "chat_loop_idle_seconds_total"]:
        assert name in metric_names(m0), f"{name} missing from /metrics:\n{text}"
    time.sleep(0.5)
    alice = server.client("general", "alice")
    alice.say("a turn of work")
    alice.close()
    m1, _, got1, _ = scrape()

    idle = metric_value(m1, "chat_loop_idle_seconds_total") - \
        metric_value(m0, "chat_loop_idle_seconds_total")
    assert 0.25 <= idle <= got1 - sent0, (idle, got1 - sent0)
    turns = metric_value(m1, "chat_loop_turn_seconds_count")
    assert turns > metric_value(m0, "chat_loop_turn_seconds_count")
    assert metric_value(m1, "chat_loop_turn_seconds_sum") > 0
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in m1.items()
                     if name == "chat_loop_turn_seconds_bucket")
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), f"buckets are not cumulative: {buckets}"
    assert buckets[-1] == (float("inf"), turns)


TEST_STORE = os.environ.get("CHAT_TEST_STORE", "sqlite")  # as conftest.py reads it


def test_metrics_of_the_store_backend(server):
    """SQLite's own counters: group commits, WAL pages, checkpoints (absent on Cassandra)."""
    m0 = parse_metrics(server.metrics_text())
    names = metric_names(m0)
    sqlite_names = {"chat_store_sqlite_commits_total", "chat_store_sqlite_failed_commits_total",
                    "chat_store_sqlite_writes_total", "chat_store_sqlite_wal_frames_total",
                    "chat_store_sqlite_checkpoints_total", "chat_store_sqlite_largest_commit"}
    if TEST_STORE != "sqlite":
        assert not sqlite_names & names
        return
    assert sqlite_names <= names, sorted(sqlite_names - names)
    alice = server.client("general", "alice")
    acks = [alice.say(f"counted by the store {i}") for i in range(5)]
    alice.send({"event": "message:edit", "message_id": acks[0]["message_id"], "message": "e"})
    assert alice.recv()["event"] == "message:edit"
    m1 = parse_metrics(server.metrics_text())

    def delta(name):
        return metric_value(m1, name) - metric_value(m0, name)

    writes, commits = delta("chat_store_sqlite_writes_total"), delta("chat_store_sqlite_commits_total")
    assert writes == 6, writes  # five appends and an edit
    assert 1 <= commits <= writes
    assert delta("chat_store_sqlite_wal_frames_total") >= commits  # each commit writes a page
    assert metric_value(m1, "chat_store_sqlite_failed_commits_total") == 0
    assert metric_value(m1, "chat_store_sqlite_largest_commit") >= 1


# ---- HEAD and Expect: 100-continue --------------------------------------------------------

@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/", "/api/chats/general/messages?limit=5",
                                  "/nope"])
def test_head_is_get_without_body(server, path):
    h = server.auth("alice")
    c = HttpConn(server.port)
    try:
        got = c.request("GET", path, headers=h)
        head = c.request("HEAD", path, headers=h)
        # the connection is still in step: nothing of a body came after the HEAD answer
        again = c.request("GET", "/healthz")
    finally:
        c.close()
    assert head.status == got.status
    assert head.body == b""
    assert head.headers.get("content-type") == got.headers.get("content-type")
    if path != "/metrics":  # the metrics text changes between two requests
        assert int(head.headers["content-length"]) == len(got.body)
    assert again.status == 200 and again.body == b'{"status":"ok"}'


@pytest.mark.parametrize("path", ["/ws/chat/general", "/ws/chat/bad%20id"])
def test_head_on_ws_path_is_an_error_without_body_not_an_upgrade(server, path):
    h = upgrade_headers()
    c = HttpConn(server.port)
    try:
        r = c.request("HEAD", path + "?token=" + server.token("alice"), headers=h)
        # the same connection goes on in step: no body bytes were left behind
        again = c.request("GET", "/healthz")
    finally:
        c.close()
    assert r.status == (405 if path == "/ws/chat/general" else 400)
    if r.status == 405:
        assert r.headers.get("allow") == "GET"
    assert r.body == b""
    assert again.status == 200 and again.body == b'{"status":"ok"}'


def test_expect_100_continue_gets_100_before_the_body(server):
    body = json.dumps({"message": "x" * 2000, "client_id": "cont-1"}).encode()
    h = server.auth("bot")
    h.update({"Content-Type": "application/json", "Content-Length": str(len(body)),
              "Expect": "100-continue"})
    c = HttpConn(server.port)
    try:
        c.send(build_request("POST", "/api/chats/general/messages", h))
        interim = c.read_response(timeout=3)
        assert interim.status == 100, interim
        c.send(body)
        r = c.read_response(timeout=5)
    finally:
        c.close()
    assert r.status == 201, r
    assert json.loads(r.body)["message"] == "x" * 2000


def test_expect_100_continue_with_too_large_body_is_413_at_once(server):
    h = server.auth("bot")
    h.update({"Content-Type": "application/json", "Content-Length": str(64 * 1024 * 1024),
              "Expect": "100-continue"})
    c = HttpConn(server.port)
    try:
        c.send(build_request("POST", "/api/chats/general/messages", h))
        r = c.read_response(timeout=3)
    finally:
        c.close()
    assert_json_error(r, 413)
