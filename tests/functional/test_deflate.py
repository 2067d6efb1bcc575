"""permessage-deflate (RFC 7692) against the real chatd: the Python websockets client (an
independent implementation) negotiating it, a hand-made client looking at the bytes on the
wire (RSV1, one compressed frame shared by every compressing member), the offer's
negotiation, zip bombs and bad RSV1 frames, and --compression off."""

import json
import zlib

import pytest

from helpers import (OP_CONT, OP_PING, OP_TEXT, Client, HttpConn, deflate, metric_value,
                     parse_metrics, upgrade_headers, ws_key)

OFFER = "permessage-deflate; client_max_window_bits"
LONG = "compress me " * 40  # an event well above the 128-byte threshold


def metrics(server):
    return parse_metrics(server.metrics_text())


def metric(server, name):
    return metric_value(metrics(server), name) or 0


def deflate_client(server, chat, user):
    c = Client(server.ws_url(chat, user=user), user=user, compression="deflate")
    server.clients.append(c)
    return c


def raw_deflate(server, chat, user, offer=OFFER):
    ws = server.raw(chat, user, headers={"Sec-WebSocket-Extensions": offer})
    assert ws.deflate, ws.response
    return ws


def ext_params(value):
    """The parameters of a one-extension Sec-WebSocket-Extensions value, as a list."""
    parts = [p.strip() for p in value.split(";")]
    assert parts[0] == "permessage-deflate", value
    return parts[1:]


def recv_event_frame(ws, pred):
    """The next text frame whose JSON satisfies pred, with its RSV bits."""
    while True:
        f = ws.recv_frame()
        if f.opcode != OP_TEXT:
            continue
        data = zlib.decompressobj(-15).decompress(f.payload + b"\x00\x00\xff\xff") \
            if f.rsv == 4 else f.payload
        ev = json.loads(data)
        if pred(ev):
            return f, ev


# ---- the websockets client ----------------------------------------------------------------


def test_websockets_client_negotiates_deflate_and_chats_both_ways(server):
    alice = deflate_client(server, "general", "alice")
    ext = alice.ws.response.headers.get("Sec-WebSocket-Extensions")
    assert ext is not None, "permessage-deflate was not negotiated"
    params = ext_params(ext)
    assert "server_no_context_takeover" in params
    assert "client_no_context_takeover" in params
    assert "server_max_window_bits=11" in params
    assert "client_max_window_bits=11" in params
    bob = deflate_client(server, "general", "bob")
    # long and short messages, both ways: the client compresses what it sends, we inflate
    for text in (LONG, "hi", "é" * 3000):
        ack = alice.say(text)
        assert ack["message"] == text
        got = bob.wait_for(lambda e: e.get("message_id") == ack["message_id"])
        assert got["message"] == text and got["user_from"] == "alice"
    assert metric(server, "chat_websocket_deflate_total") == 2
    # a message the history and REST see the same as any other
    texts = [m["message"] for m in server.history("general")["messages"]]
    assert LONG in texts and "hi" in texts


def test_fanout_to_compressing_and_plain_members_compresses_once(server):
    z1 = raw_deflate(server, "room", "z1")
    z2 = deflate_client(server, "room", "z2")
    z3 = deflate_client(server, "room", "z3")
    plain = server.client("room", "plain")
    plain_raw = server.raw("room", "plain2")
    assert not plain_raw.deflate
    before = metric(server, "chat_deflate_frames_total")
    out_before = metric(server, "chat_deflate_deliveries_total")
    ack = plain.say(LONG)
    mid = ack["message_id"]
    f, ev = recv_event_frame(z1, lambda e: e.get("message_id") == mid)
    assert f.rsv == 4, "a long event to a compressing member must be compressed"
    assert len(f.payload) < len(json.dumps(ev))
    assert ev["message"] == LONG
    for c in (z2, z3):
        assert c.wait_for(lambda e: e.get("message_id") == mid)["message"] == LONG
    f, ev = recv_event_frame(plain_raw, lambda e: e.get("message_id") == mid)
    assert f.rsv == 0 and ev["message"] == LONG
    # one compressed encoding for the event, whatever the number of compressing members
    assert metric(server, "chat_deflate_frames_total") - before == 1
    assert metric(server, "chat_deflate_deliveries_total") - out_before == 3


def test_small_frames_go_uncompressed_to_compressing_members(server):
    z = raw_deflate(server, "general", "alice")
    z.send_json({"event": "ping"})
    f, ev = recv_event_frame(z, lambda e: e.get("event") == "pong")
    assert f.rsv == 0 and len(f.payload) < 128
    # an error event (under the threshold) too
    z.send_json({"event": "message:delete", "message_id": "12345"})
    f, ev = recv_event_frame(z, lambda e: e.get("event") == "error")
    assert f.rsv == 0 and len(f.payload) < 128, ev
    # while a one-letter message's event (about 180 bytes) is over it: compressed
    z.send_json({"event": "message:message", "message": "x", "client_id": "k"})
    f, ev = recv_event_frame(z, lambda e: e.get("client_id") == "k")
    assert f.rsv == 4 and len(f.payload) < len(json.dumps(ev)), ev


def test_compressed_message_fragmented_and_sent_raw(server):
    z = raw_deflate(server, "general", "alice")
    body = json.dumps({"event": "message:message", "message": LONG, "client_id": "frag"}).encode()
    data = deflate(body)
    half = len(data) // 2
    z.send_frame(OP_TEXT, data[:half], fin=False, rsv=4)
    z.send_frame(OP_PING, b"in between")
    z.send_frame(OP_CONT, data[half:])
    f, ev = recv_event_frame(z, lambda e: e.get("client_id") == "frag")
    assert ev["message"] == LONG


def test_resume_backlog_comes_compressed(server):
    alice = server.client("general", "alice")
    first = alice.say("before")["message_id"]
    ids = [alice.say(f"{LONG}{i}")["message_id"] for i in range(3)]
    path = f"/ws/chat/general?token={server.token('bob')}&since={first}"
    z = server.raw("general", path=path, headers={"Sec-WebSocket-Extensions": OFFER})
    assert z.deflate
    got = []
    while len(got) < 3:
        f, ev = recv_event_frame(z, lambda e: e.get("event") == "message:message")
        assert f.rsv == 4, "a replayed event over the threshold goes compressed"
        got.append(ev["message_id"])
    assert got == ids
    # and live after the backlog
    mid = alice.say(LONG)["message_id"]
    f, ev = recv_event_frame(z, lambda e: e.get("message_id") == mid)
    assert f.rsv == 4 and ev["message"] == LONG


# ---- limits and bad frames ----------------------------------------------------------------


def test_zip_bomb_closes_1009(server):
    z = raw_deflate(server, "general", "alice")
    bomb = deflate(b'{"event":"message:message","message":"' + b"a" * (20 << 20) + b'"}')
    assert len(bomb) < 65536  # it passes the wire limit: only its output is too big
    z.send_frame(OP_TEXT, bomb, rsv=4)
    code, _ = z.recv_close()
    assert code == 1009
    assert server.history("general")["messages"] == []


def test_inflated_size_just_under_the_limit_is_accepted(chatd):
    server = chatd("--max-message-bytes", "4096")
    z = raw_deflate(server, "general", "alice")
    body = json.dumps({"event": "message:message", "message": "b" * 4000, "client_id": "big"})
    assert len(body) <= 4096
    z.send_frame(OP_TEXT, deflate(body.encode()), rsv=4)
    f, ev = recv_event_frame(z, lambda e: e.get("client_id") == "big")
    assert ev["message"] == "b" * 4000
    over = json.dumps({"event": "message:message", "message": "b" * 4100})
    z.send_frame(OP_TEXT, deflate(over.encode()), rsv=4)
    assert z.recv_close()[0] == 1009


@pytest.mark.parametrize("case", ["continuation", "ping", "no_negotiation"])
def test_bad_rsv1_closes_1002(server, case):
    if case == "no_negotiation":
        ws = server.raw("general", "alice")
        assert not ws.deflate
        ws.send_frame(OP_TEXT, deflate(b'{"event":"ping"}'), rsv=4)
    else:
        ws = raw_deflate(server, "general", "alice")
        if case == "continuation":
            ws.send_frame(OP_TEXT, deflate(b'{"event":"ping"}'), fin=False, rsv=4)
            ws.send_frame(OP_CONT, b"", rsv=4)
        else:
            ws.send_frame(OP_PING, b"x", rsv=4)
    assert ws.recv_close()[0] == 1002


def test_invalid_compressed_data_closes_1007(server):
    ws = raw_deflate(server, "general", "alice")
    ws.send_frame(OP_TEXT, b"\xff\xff\xff\xff garbage", rsv=4)
    assert ws.recv_close()[0] == 1007


def test_compressed_invalid_utf8_closes_1007(server):
    ws = raw_deflate(server, "general", "alice")
    ws.send_frame(OP_TEXT, deflate(b'{"event":"message:message","message":"\xc3\x28"}'), rsv=4)
    assert ws.recv_close()[0] == 1007


# ---- negotiation --------------------------------------------------------------------------


def handshake_ext(server, *values):
    """The Sec-WebSocket-Extensions of the 101 for a request with these header values."""
    key = ws_key()
    h = upgrade_headers(key)
    c = HttpConn(server.port)
    lines = [f"GET /ws/chat/general?token={server.token('alice')} HTTP/1.1", "Host: x"]
    lines += [f"{k}: {v}" for k, v in h.items()]
    lines += [f"Sec-WebSocket-Extensions: {v}" for v in values]
    c.send(("\r\n".join(lines) + "\r\n\r\n").encode())
    resp = c.read_response()
    c.close()
    assert resp.status == 101, resp
    return resp.headers.get("sec-websocket-extensions")


@pytest.mark.parametrize("offer", [
    "permessage-deflate; foo=1",                      # unknown parameter
    "permessage-deflate; server_no_context_takeover=1",  # a value where none is allowed
    "permessage-deflate; client_max_window_bits=16",  # out of range
    "permessage-deflate; client_max_window_bits=08",  # leading zero
    "permessage-deflate; server_max_window_bits",     # a value is required
    "permessage-deflate; server_max_window_bits=9",   # below our window
    "permessage-deflate; client_no_context_takeover; client_no_context_takeover",  # twice
    "permessage-deflate; =",                           # malformed
    'permessage-deflate; client_max_window_bits="1',   # unterminated quote
    "permessage-deflate,,;",                           # malformed
    "x-webkit-deflate-frame",                          # another extension
    "\x7f",
])
def test_unacceptable_offers_are_declined(server, offer):
    assert handshake_ext(server, offer) is None


@pytest.mark.parametrize("offers,want", [
    # a declined offer, then one we take
    (["permessage-deflate; server_max_window_bits=10, permessage-deflate"], []),
    (["permessage-deflate; server_max_window_bits=12"], []),
    (['permessage-deflate; client_max_window_bits="10"'], ["client_max_window_bits=10"]),
    (["permessage-deflate ; client_max_window_bits = 9 ; server_no_context_takeover"],
     ["client_max_window_bits=9"]),
    (["x-unknown; a=b", "permessage-deflate; client_no_context_takeover"], []),
])
def test_acceptable_offers(server, offers, want):
    ext = handshake_ext(server, *offers)
    assert ext is not None, offers
    params = ext_params(ext)
    assert params[:3] == ["server_no_context_takeover", "client_no_context_takeover",
                          "server_max_window_bits=11"]
    assert params[3:] == want


def test_compression_off_declines(chatd):
    server = chatd("--compression", "off")
    c = Client(server.ws_url("general", user="alice"), user="alice", compression="deflate")
    server.clients.append(c)
    assert c.ws.response.headers.get("Sec-WebSocket-Extensions") is None
    assert c.say(LONG)["message"] == LONG
    assert metric(server, "chat_websocket_deflate_total") == 0


def test_compression_env_off_and_bad_value(chatd, tmp_path):
    server = chatd(env={"CHAT_COMPRESSION": "off"})
    assert handshake_ext(server, OFFER) is None
    import subprocess

    from conftest import CHATD, clean_env
    r = subprocess.run([str(CHATD), "--compression", "maybe", "--dev", "--port", "0"],
                       env=clean_env(), capture_output=True, text=True, timeout=10,
                       cwd=str(tmp_path))
    assert r.returncode == 2 and "compression must be on or off" in r.stderr
