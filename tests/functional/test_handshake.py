"""The WebSocket handshake: what is accepted, and every rejection with its HTTP status."""

import base64
import hashlib
import hmac
import os
import time

import pytest

from helpers import (
    Client,
    HttpConn,
    b64url,
    make_jwt,
    metric_value,
    parse_metrics,
    upgrade_headers,
    ws_accept,
    ws_connect,
    ws_key,
)


def assert_json_error(resp, status):
    assert resp.status == status, resp
    assert "sec-websocket-accept" not in resp.headers, resp
    assert resp.headers.get("content-type", "").startswith("application/json"), resp
    body = resp.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("detail"), str), body
    return body


def handshake(server, path, headers, method="GET"):
    c = HttpConn(server.port)
    try:
        return c.request(method, path, headers)
    finally:
        c.close()


def path_for(server, chat="general", user="alice", token=None):
    return f"/ws/chat/{chat}?token={token or server.token(user)}"


# ---- accepted -----------------------------------------------------------------------------


def test_handshake_101_with_correct_accept_and_no_subprotocol(server):
    key = ws_key()
    h = upgrade_headers(key)
    h["Sec-WebSocket-Extensions"] = "x-webkit-deflate-frame"
    h["Sec-WebSocket-Protocol"] = "chat, superchat"
    c = HttpConn(server.port)
    resp = c.request("GET", path_for(server), h)
    assert resp.status == 101, resp
    assert resp.headers["sec-websocket-accept"] == ws_accept(key)
    assert resp.headers["upgrade"].lower() == "websocket"
    assert "upgrade" in resp.headers["connection"].lower()
    assert "sec-websocket-extensions" not in resp.headers
    assert "sec-websocket-protocol" not in resp.headers
    c.close()


def test_default_websockets_client_offering_deflate_works(server):
    c = Client(server.ws_url("general", user="alice"), user="alice", compression="deflate")
    server.clients.append(c)
    # negotiated (tests/functional/test_deflate.py has the rest)
    assert "permessage-deflate" in c.ws.response.headers.get("Sec-WebSocket-Extensions")
    assert c.say("deflate offered")["message"] == "deflate offered"


@pytest.mark.parametrize("connection", ["keep-alive, Upgrade", "upgrade", "Upgrade,keep-alive"])
def test_connection_header_token_list(server, connection):
    ws = server.raw("general", path=path_for(server), headers={"Connection": connection})
    assert ws.ack_after("token list")["user_from"] == "alice"


def test_upgrade_value_is_case_insensitive(server):
    ws = server.raw("general", path=path_for(server), headers={"Upgrade": "WebSocket"})
    assert ws.ack_after("case")["message"] == "case"


def test_trailing_slash(server):
    ws = server.raw("general", path=f"/ws/chat/general/?token={server.token('alice')}")
    ack = ws.ack_after("slash")
    assert ack["chat_id"] == "general"


def test_token_in_authorization_header(server):
    ws = server.raw("general", path="/ws/chat/general",
                    headers={"Authorization": f"Bearer {server.token('bob')}"})
    ack = ws.ack_after("bearer")
    assert ack["user_from"] == "bob"


def test_sync_client_with_authorization_header(server):
    c = Client(f"ws://127.0.0.1:{server.port}/ws/chat/general",
               additional_headers={"Authorization": f"Bearer {server.token('carol')}"})
    server.clients.append(c)
    assert c.say("hdr")["user_from"] == "carol"


def test_chats_claim_listing_the_chat_is_accepted(server):
    tok = server.token("alice", chats=["other", "general"])
    ws = server.raw("general", path=f"/ws/chat/general?token={tok}")
    assert ws.ack_after("allowed")["chat_id"] == "general"


# ---- rejected -----------------------------------------------------------------------------


def forged(server, kind):
    now = int(time.time())
    good = {"sub": "alice", "iat": now, "exp": now + 3600}
    if kind == "bad_signature":
        tok = make_jwt(server.secret, good)
        return tok[:-4] + ("AAAA" if not tok.endswith("AAAA") else "BBBB")
    if kind == "wrong_secret":
        return make_jwt(server.secret + "x", good)
    if kind == "alg_none":
        return make_jwt(server.secret, good, header={"alg": "none", "typ": "JWT"}, signature="")
    if kind == "alg_none_signed":
        return make_jwt(server.secret, good, header={"alg": "none", "typ": "JWT"})
    if kind == "alg_hs512":
        h = b64url(b'{"alg":"HS512","typ":"JWT"}')
        p = b64url(('{"sub":"alice","exp":%d}' % (now + 3600)).encode())
        sig = hmac.new(server.secret.encode(), f"{h}.{p}".encode(), hashlib.sha512).digest()
        return f"{h}.{p}.{b64url(sig)}"
    if kind == "expired":
        return make_jwt(server.secret, {"sub": "alice", "iat": now - 7200, "exp": now - 3600})
    if kind == "no_sub":
        return make_jwt(server.secret, {"iat": now, "exp": now + 3600})
    if kind == "empty_sub":
        return make_jwt(server.secret, {"sub": "", "exp": now + 3600})
    if kind == "long_sub":
        return make_jwt(server.secret, {"sub": "u" * 129, "exp": now + 3600})
    if kind == "sub_not_string":
        return make_jwt(server.secret, {"sub": 42, "exp": now + 3600})
    if kind == "malformed":
        return "abc.def"
    if kind == "garbage":
        return "not-a-token-at-all"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["bad_signature", "wrong_secret", "alg_none", "alg_none_signed", "alg_hs512", "expired",
     "no_sub", "empty_sub", "long_sub", "sub_not_string", "malformed", "garbage"],
)
def test_bad_token_is_401(server, kind):
    resp = handshake(server, path_for(server, token=forged(server, kind)), upgrade_headers())
    assert_json_error(resp, 401)


def test_missing_token_is_401(server):
    assert_json_error(handshake(server, "/ws/chat/general", upgrade_headers()), 401)


def test_bad_bearer_header_is_401(server):
    h = upgrade_headers(Authorization=f"Bearer {forged(server, 'bad_signature')}")
    assert_json_error(handshake(server, "/ws/chat/general", h), 401)


def test_chats_claim_not_listing_the_chat_is_403(server):
    tok = server.token("alice", chats=["other", "general2"])
    assert_json_error(handshake(server, f"/ws/chat/general?token={tok}", upgrade_headers()), 403)


def test_empty_chats_claim_is_403(server):
    tok = server.token("alice", chats=[])
    assert_json_error(handshake(server, f"/ws/chat/general?token={tok}", upgrade_headers()), 403)


@pytest.mark.parametrize(
    "chat",
    ["bad%20id", "a" * 129, "bad$id", "%C3%A9t%C3%A9", "semi;colon"],
    ids=["space", "129_chars", "dollar", "non_ascii", "semicolon"],
)
def test_bad_chat_id_is_400(server, chat):
    resp = handshake(server, f"/ws/chat/{chat}?token={server.token('alice')}", upgrade_headers())
    assert_json_error(resp, 400)


# `.` and `..` are path segments that URL normalisation removes: such a chat's REST API
# (/api/chats/../messages) could never be reached, so they are not chat ids at all.
@pytest.mark.parametrize("chat", [".", "..", "%2E", "%2e%2E"], ids=["dot", "dotdot", "pct_dot", "pct_dotdot"])
def test_dot_and_dotdot_chat_ids_are_400(server, chat):
    resp = handshake(server, f"/ws/chat/{chat}?token={server.token('alice')}", upgrade_headers())
    body = assert_json_error(resp, 400)
    assert "chat id" in body["detail"], body


def test_chat_ids_with_dots_inside_still_work(server):
    for chat in ("...", ".a", "a..b", "v1.2"):
        c = server.client(chat, "alice")
        assert c.say("dotted")["chat_id"] == chat
        c.close()


def drop(h, name):
    return {k: v for k, v in h.items() if k.lower() != name.lower()}


@pytest.mark.parametrize(
    "case",
    ["missing_upgrade", "upgrade_not_websocket", "missing_connection",
     "connection_without_upgrade", "missing_key", "key_not_base64", "key_15_bytes", "key_17_bytes"],
)
def test_bad_upgrade_headers_are_400(server, case):
    h = upgrade_headers()
    if case == "missing_upgrade":
        h = drop(h, "Upgrade")
    elif case == "upgrade_not_websocket":
        h["Upgrade"] = "h2c"
    elif case == "missing_connection":
        h = drop(h, "Connection")
    elif case == "connection_without_upgrade":
        h["Connection"] = "keep-alive"
    elif case == "missing_key":
        h = drop(h, "Sec-WebSocket-Key")
    elif case == "key_not_base64":
        h["Sec-WebSocket-Key"] = "!!!!not*base64!!!!!!!=="
    elif case == "key_15_bytes":
        h["Sec-WebSocket-Key"] = base64.b64encode(os.urandom(15)).decode()
    elif case == "key_17_bytes":
        h["Sec-WebSocket-Key"] = base64.b64encode(os.urandom(17)).decode()
    assert_json_error(handshake(server, path_for(server), h), 400)


@pytest.mark.parametrize("version", ["12", "8", "14", "abc"])
def test_wrong_version_is_426_with_version_header(server, version):
    resp = handshake(server, path_for(server), upgrade_headers(Sec_WebSocket_Version=version))
    assert_json_error(resp, 426)
    assert resp.headers.get("sec-websocket-version") == "13"


def test_missing_version_is_rejected(server):
    resp = handshake(server, path_for(server), drop(upgrade_headers(), "Sec-WebSocket-Version"))
    assert resp.status in (400, 426), resp
    assert_json_error(resp, resp.status)


@pytest.mark.parametrize("path", ["/ws/nope", "/ws/chat", "/ws/chats/general", "/wschat/general"])
def test_unknown_ws_path_is_404(server, path):
    resp = handshake(server, f"{path}?token={server.token('alice')}", upgrade_headers())
    assert_json_error(resp, 404)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_non_get_on_ws_path_is_405(server, method):
    h = upgrade_headers()
    h["Content-Length"] = "0"
    resp = handshake(server, path_for(server), h, method=method)
    assert_json_error(resp, 405)
    assert "GET" in resp.headers.get("allow", ""), resp


# ---- check order: path/chat id, method, upgrade headers/version, token --------------------


def test_order_bad_chat_id_before_token(server):
    assert_json_error(handshake(server, "/ws/chat/bad%20id", upgrade_headers()), 400)


def test_order_bad_chat_id_before_method(server):
    h = {"Content-Length": "0"}
    assert_json_error(handshake(server, "/ws/chat/bad%20id", h, method="POST"), 400)


def test_order_unknown_path_before_method_and_headers(server):
    h = {"Content-Length": "0"}
    assert_json_error(handshake(server, "/ws/nope", h, method="POST"), 404)


def test_order_method_before_headers_and_token(server):
    assert_json_error(handshake(server, "/ws/chat/general", {"Content-Length": "0"}, method="POST"), 405)


def test_order_upgrade_headers_before_token(server):
    assert_json_error(handshake(server, "/ws/chat/general", drop(upgrade_headers(), "Upgrade")), 400)
    resp = handshake(server, "/ws/chat/general", upgrade_headers(Sec_WebSocket_Version="12"))
    assert_json_error(resp, 426)


def test_order_token_before_chats_claim(server):
    # an expired token that also excludes the chat: authentication fails first
    tok = make_jwt(server.secret, {"sub": "a", "exp": int(time.time()) - 3600, "chats": ["x"]})
    assert_json_error(handshake(server, f"/ws/chat/general?token={tok}", upgrade_headers()), 401)


def test_rejected_handshake_does_not_join_the_chat(server):
    alice = server.client("general", "alice")
    tok = server.token("eve", chats=["other"])
    assert_json_error(handshake(server, f"/ws/chat/general?token={tok}", upgrade_headers()), 403)
    ack = alice.say("members only")
    assert ack["message"] == "members only"
    assert metric_value(parse_metrics(server.metrics_text()), "chat_connections") == 1


def test_sync_client_sees_rejection_status(server):
    from websockets.exceptions import InvalidStatus
    with pytest.raises(InvalidStatus) as ei:
        ws_connect(f"ws://127.0.0.1:{server.port}/ws/chat/general")
    assert ei.value.response.status_code == 401


def test_token_among_other_query_parameters(server):
    ws = server.raw("general", path=f"/ws/chat/general?foo=1&token={server.token('alice')}&bar=")
    assert ws.ack_after("query")["user_from"] == "alice"


def test_header_names_are_case_insensitive(server):
    ws = server.raw("general", path="/ws/chat/general",
                    headers={"authorization": f"Bearer {server.token('bob')}",
                             "upgrade": "websocket", "connection": "Upgrade"})
    assert ws.ack_after("lower")["user_from"] == "bob"
