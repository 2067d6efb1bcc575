"""Open connections honour their token's expiry: at `exp` the server closes the WebSocket with
4001 "token expired"; a `token:refresh` with a new token of the same user (checked like a new
token: signature, exp, the chats claim) moves the deadline; a refused refresh is an `error`
event and changes nothing; a token without exp never expires.

The server checks expiry on its keepalive sweep (at most 5 s apart), so the waits below are
bounded by exp + a sweep period + slack; a connection with a short-lived token that is never
refreshed serves as the witness that the sweep has run past the old deadline.
"""

import time

from helpers import Client, make_jwt, verify_jwt

TTL = 3  # seconds: the short-lived tokens
CLOSE_WAIT = TTL + 15.0  # bound for the close after exp (sweep period <= 5 s, slow machines)


def connect(srv, chat, user, ttl=TTL, chats=None):
    return Client(srv.ws_url(chat, token=srv.token(user, chats=chats, ttl=ttl)), user=user)


def refresh(client, token):
    client.send({"event": "token:refresh", "token": token})
    return client.wait_for(lambda ev: ev.get("event") in ("token:refreshed", "error"))


def no_exp_token(secret, user):
    return make_jwt(secret, {"sub": user, "iat": int(time.time())})


def test_expired_token_closes_with_4001(server):
    c = connect(server, "exp-close", "alice")
    code, reason = c.expect_close(timeout=CLOSE_WAIT)
    assert (code, reason) == (4001, "token expired")


def test_refresh_keeps_the_connection_open_past_the_old_exp(server):
    chat = "exp-refresh"
    c = connect(server, chat, "alice")
    witness = connect(server, chat, "witness")  # same old exp, never refreshed
    peer = server.client(chat, "bob")
    new = server.token("alice", ttl=3600)
    ev = refresh(c, new)
    assert ev["event"] == "token:refreshed", ev
    assert isinstance(ev["exp"], int) and ev["exp"] >= int(time.time()) + 3500
    assert set(ev) == {"event", "exp"}

    assert witness.expect_close(timeout=CLOSE_WAIT) == (4001, "token expired")
    # the sweep has passed the old deadline: alice is still connected, sends and receives
    ack = c.say("still here")
    assert ack["user_from"] == "alice"
    assert peer.wait_for(lambda e: e.get("message") == "still here")["user_from"] == "alice"
    peer.say("hello alice")
    assert c.wait_for(lambda e: e.get("message") == "hello alice")["user_from"] == "bob"


def test_refresh_for_another_user_is_refused_and_the_old_exp_holds(server):
    c = connect(server, "exp-wrong-user", "alice")
    ev = refresh(c, server.token("mallory", ttl=3600))
    assert ev["event"] == "error" and ev["code"] == "wrong_user", ev
    assert ev["detail"]
    # still open after the refusal ...
    assert c.say("after the refusal")["user_from"] == "alice"
    # ... until the old exp
    assert c.expect_close(timeout=CLOSE_WAIT) == (4001, "token expired")


def test_refresh_with_a_bad_signature_is_refused(server):
    c = connect(server, "exp-bad-sig", "alice")
    now = int(time.time())
    forged = make_jwt("not-the-secret", {"sub": "alice", "iat": now, "exp": now + 3600})
    ev = refresh(c, forged)
    assert ev["event"] == "error" and ev["code"] == "bad_token", ev
    ev = refresh(c, "not.a.token")
    assert ev["event"] == "error" and ev["code"] == "bad_token", ev
    assert c.say("still open")["user_from"] == "alice"
    assert c.expect_close(timeout=CLOSE_WAIT) == (4001, "token expired")


def test_refresh_with_an_expired_token_is_refused(server):
    c = connect(server, "exp-stale", "alice", ttl=3600)
    now = int(time.time())
    stale = make_jwt(server.secret, {"sub": "alice", "iat": now - 100, "exp": now - 10})
    ev = refresh(c, stale)
    assert ev["event"] == "error" and ev["code"] == "bad_token", ev
    assert "expired" in ev["detail"]


def test_refresh_whose_chats_claim_excludes_this_chat_is_refused(server):
    chat = "exp-chats"
    c = connect(server, chat, "alice", chats=[chat, "other"])
    ev = refresh(c, server.token("alice", chats=["other"], ttl=3600))
    assert ev["event"] == "error" and ev["code"] == "forbidden", ev
    # one that still lists it is accepted
    ev = refresh(c, server.token("alice", chats=[chat], ttl=3600))
    assert ev["event"] == "token:refreshed", ev


def test_refresh_event_is_validated(server):
    c = connect(server, "exp-proto", "alice", ttl=3600)
    c.send({"event": "token:refresh"})
    ev = c.wait_for(lambda e: e.get("event") == "error")
    assert ev["code"] == "bad_request" and "token" in ev["detail"], ev
    c.send({"event": "token:refresh", "token": 7})
    ev = c.wait_for(lambda e: e.get("event") == "error")
    assert ev["code"] == "bad_request", ev
    assert c.say("fine")["user_from"] == "alice"


def test_token_without_exp_is_never_closed_by_expiry(server):
    chat = "exp-none"
    forever = Client(server.ws_url(chat, token=no_exp_token(server.secret, "alice")), user="alice")
    witness = connect(server, chat, "witness")
    assert witness.expect_close(timeout=CLOSE_WAIT) == (4001, "token expired")
    assert forever.say("no exp, still here")["user_from"] == "alice"
    # a refresh to a token without exp lifts the deadline of a short-lived connection
    short = connect(server, chat, "bob")
    ev = refresh(short, no_exp_token(server.secret, "bob"))
    assert ev == {"event": "token:refreshed", "exp": None}
    witness2 = connect(server, chat, "witness2")
    assert witness2.expect_close(timeout=CLOSE_WAIT) == (4001, "token expired")
    assert short.say("bob lives on")["user_from"] == "bob"


def test_dev_token_endpoint_takes_a_short_ttl(chatd):
    srv = chatd("--dev")
    r = srv.post("/api/dev/token", json={"user": "dana", "ttl": TTL})
    assert r.status_code == 200, r.text
    _, claims = verify_jwt(r.json()["token"], srv.secret)
    assert claims["sub"] == "dana" and claims["exp"] - claims["iat"] == TTL
    r = srv.post("/api/dev/token", json={"user": "dana"})
    _, claims = verify_jwt(r.json()["token"], srv.secret)
    assert claims["exp"] - claims["iat"] == 86400
    for bad in (0, -1, 86401, "5", 2.5):
        r = srv.post("/api/dev/token", json={"user": "dana", "ttl": bad})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"] == "bad_request" and "ttl" in r.json()["detail"]
    # a page signed in with such a token is closed at its exp unless it refreshes
    tok = srv.post("/api/dev/token", json={"user": "dana", "ttl": TTL}).json()["token"]
    c = Client(srv.ws_url("dev-ttl", token=tok))
    assert c.expect_close(timeout=CLOSE_WAIT) == (4001, "token expired")
