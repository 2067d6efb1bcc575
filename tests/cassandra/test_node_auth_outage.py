"""A Cassandra of this module's own, started with PasswordAuthenticator:

- right credentials connect (chatctl migrate and chatd), wrong or missing ones give a clear
  startup error and a non-zero exit;
- Cassandra stopped while chatd runs: every send fails with a clear error to its sender
  (store_unavailable over WebSocket, 503 over REST), nothing is lost silently, chatd does not
  crash, /healthz says 503 (store_unavailable); once Cassandra is back, chatd reconnects by
  itself, sends succeed again and /healthz says ok.
"""

import time

import cassandra_support as cs
import pytest

from conftest import Chatd

KS = "authks"


@pytest.fixture(scope="module")
def node(private_node):
    p = cs.migrate(private_node.url(KS))
    assert p.returncode == 0, p.stdout
    return private_node


def test_start_time_is_reasonable(node):
    # the first start of this module's node (or 0 if it was reused): keep CI honest
    assert node.start_seconds < 90


def test_right_credentials(node, chatd_factory):
    srv = chatd_factory(node.url(KS))
    ack = srv.client("a", "alice").say("hello with auth")
    assert ack["message"] == "hello with auth"
    assert srv.history("a")["messages"][0]["message_id"] == ack["message_id"]


def test_wrong_password(node):
    s = Chatd(node.url(KS, password="wrong"), expect_start=False)
    rc = s.wait_exit(30)
    assert rc != 0
    assert 'authentication failed for user "cassandra"' in s.log
    assert "Provided username cassandra and/or password are incorrect" in s.log
    p = cs.migrate(node.url("otherks", password="wrong"))
    assert p.returncode != 0
    assert "authentication failed" in p.stdout


def test_unknown_user_and_no_credentials(node):
    s = Chatd(node.url(KS, user="mallory", password="x"), expect_start=False)
    assert s.wait_exit(30) != 0
    assert 'authentication failed for user "mallory"' in s.log
    s = Chatd(node.url(KS, user=None), expect_start=False)
    assert s.wait_exit(30) != 0
    assert "requires authentication" in s.log
    assert "PasswordAuthenticator" in s.log


def test_cassandra_down_then_back(node, chatd_factory):
    srv = chatd_factory(node.url(KS, query="?timeout_ms=3000&reconnect_max_ms=1000"))
    alice = srv.client("outage", "alice")
    before = alice.say("before the outage")
    assert srv.get("/healthz").json() == {"status": "ok"}

    node.stop()
    try:
        # WebSocket: an error to the sender, the connection stays open
        alice.send({"event": "message:message", "message": "during", "client_id": "d1"})
        ev = alice.wait_for(lambda e: e.get("event") in ("error", "message:message"), timeout=15)
        assert ev["event"] == "error", ev
        assert ev["code"] == "store_unavailable"
        # REST: 503 with the same code
        r = srv.post("/api/chats/outage/messages", "alice", {"message": "during rest"})
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "store_unavailable"
        r = srv.get("/api/chats/outage/messages")
        assert r.status_code == 503
        # /healthz names the store while no connection to Cassandra is up
        r = srv.get("/healthz")
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "store_unavailable" and "cassandra" in r.json()["detail"]
        assert srv.p.poll() is None, "chatd died with Cassandra"
    finally:
        node.start()

    # back: chatd reconnects on its own; a send succeeds within a few seconds
    deadline = time.monotonic() + 30
    ok = None
    while time.monotonic() < deadline and ok is None:
        alice.send({"event": "message:message", "message": "after", "client_id": "a1"})
        ev = alice.wait_for(lambda e: e.get("event") in ("error", "message:message"), timeout=15)
        if ev["event"] == "message:message":
            ok = ev
        else:
            time.sleep(0.5)
    assert ok is not None, "no successful send within 30 s of Cassandra coming back"
    assert srv.get("/healthz").json() == {"status": "ok"}
    # a retry of the failed idempotent send now succeeds once
    again = alice.say("during", client_id="d1")
    # nothing sent during the outage was stored behind the sender's back
    texts = [m.get("message") for m in srv.all_history("outage")]
    assert texts.count("after") == 1
    assert texts.count("during") == 1
    assert "during rest" not in texts
    assert before["message"] in texts
    assert again["message_id"] != before["message_id"]
    assert "cql_conn_lost" in srv.log
