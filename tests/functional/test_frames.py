"""RFC 6455 framing with a hand-made client: every close code, ping/pong, fragmentation,
size limits and the idle timeout."""

import json
import struct

import pytest

from helpers import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, build_frame


def msg(text, cid=None):
    d = {"event": "message:message", "message": text}
    if cid:
        d["client_id"] = cid
    return json.dumps(d).encode()


def expect_close(ws, code):
    got, reason = ws.recv_close()
    assert got == code, f"close code {got} (reason {reason!r}), expected {code}"
    return reason


# ---- 1002 protocol errors ------------------------------------------------------------------


def test_unmasked_frame_closes_1002(server):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_TEXT, msg("x"), mask=False)
    expect_close(ws, 1002)


def test_unmasked_ping_closes_1002(server):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_PING, b"hi", mask=False)
    expect_close(ws, 1002)


@pytest.mark.parametrize("rsv", [4, 2, 1], ids=["rsv1", "rsv2", "rsv3"])
def test_rsv_bits_close_1002(server, rsv):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_TEXT, msg("x"), rsv=rsv)
    expect_close(ws, 1002)


@pytest.mark.parametrize("opcode", [0x3, 0x7, 0xB, 0xF])
def test_unknown_opcode_closes_1002(server, opcode):
    ws = server.raw("general", "alice")
    ws.send_frame(opcode, b"abc")
    expect_close(ws, 1002)


def test_ping_with_126_byte_payload_closes_1002(server):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_PING, b"p" * 126)
    expect_close(ws, 1002)


def test_fragmented_ping_closes_1002(server):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_PING, b"part", fin=False)
    expect_close(ws, 1002)


def test_continuation_without_start_closes_1002(server):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_CONT, msg("orphan"))
    expect_close(ws, 1002)


def test_new_text_frame_during_fragmented_message_closes_1002(server):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_TEXT, b'{"event":"message:message",', fin=False)
    ws.send_frame(OP_TEXT, msg("interloper"))
    expect_close(ws, 1002)


def test_close_with_one_byte_payload_closes_1002(server):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_CLOSE, b"\x03")
    expect_close(ws, 1002)


@pytest.mark.parametrize("code", [1005, 999, 2000, 1006, 1015, 0, 5000])
def test_close_with_invalid_code_closes_1002(server, code):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_CLOSE, struct.pack("!H", code))
    expect_close(ws, 1002)


def test_close_with_126_byte_payload_closes_1002(server):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_CLOSE, struct.pack("!H", 1000) + b"r" * 124)
    expect_close(ws, 1002)


# ---- 1007 invalid UTF-8 --------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b'{"event":"message:message","message":"\xff\xfe"}',
     b'{"event":"message:message","message":"\xc0\xaf"}',          # overlong
     b'{"event":"message:message","message":"\xed\xa0\x80"}',      # surrogate
     b'{"event":"message:message","message":"\xf4\x90\x80\x80"}',  # > U+10FFFF
     b'{"event":"message:message","message":"\xe2\x82"}'],         # truncated
    ids=["ff", "overlong", "surrogate", "too_big", "truncated"],
)
def test_invalid_utf8_text_closes_1007(server, payload):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_TEXT, payload)
    expect_close(ws, 1007)


def test_invalid_utf8_split_across_fragments_closes_1007(server):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_TEXT, b'{"event":"message:message","message":"\xe2\x82', fin=False)
    ws.send_frame(OP_CONT, b'\x28"}')
    expect_close(ws, 1007)


def test_valid_utf8_split_across_fragments_is_accepted(server):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_TEXT, b'{"event":"message:message","client_id":"eu","message":"\xe2\x82', fin=False)
    ws.send_frame(OP_CONT, b'\xac"}')
    ev = ws.recv_json()
    assert ev["client_id"] == "eu"
    assert ev["message"] == "\u20ac"


def test_close_reason_invalid_utf8_closes_1007(server):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye \xff")
    expect_close(ws, 1007)


# ---- 1003 binary ---------------------------------------------------------------------------


def test_binary_frame_closes_1003(server):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_BINARY, msg("x"))
    expect_close(ws, 1003)


# ---- 1009 too big --------------------------------------------------------------------------


def test_message_over_limit_closes_1009_from_the_header(chatd):
    srv = chatd("--max-message-bytes", "1024")
    ws = srv.raw("general", "alice")
    # announce 4000 bytes but send only a few: the header alone must trigger the close
    ws.send_raw(build_frame(OP_TEXT, b'{"event":"mes', length=4000)[: 2 + 2 + 4 + 13])
    expect_close(ws, 1009)


def test_huge_64bit_length_closes_1009(chatd):
    srv = chatd("--max-message-bytes", "1024")
    ws = srv.raw("general", "alice")
    ws.send_raw(build_frame(OP_TEXT, b"", length=1 << 40))
    expect_close(ws, 1009)


def test_fragmented_message_over_limit_closes_1009(chatd):
    srv = chatd("--max-message-bytes", "1024")
    ws = srv.raw("general", "alice")
    ws.send_frame(OP_TEXT, b'{"event":"message:message","message":"' + b"a" * 700, fin=False)
    ws.send_frame(OP_CONT, b"a" * 700, fin=False)
    expect_close(ws, 1009)


def test_message_exactly_at_limit_is_accepted(chatd):
    srv = chatd("--max-message-bytes", "1024")
    ws = srv.raw("general", "alice")
    head = b'{"event":"message:message","client_id":"edge","message":"'
    payload = head + b"b" * (1024 - len(head) - 2) + b'"}'
    assert len(payload) == 1024
    ws.send_frame(OP_TEXT, payload)
    ev = ws.recv_json()
    assert ev["client_id"] == "edge" and len(ev["message"]) == 1024 - len(head) - 2


# ---- ping/pong, fragmentation, close handshake --------------------------------------------


def test_ping_gets_pong_with_same_payload(server):
    ws = server.raw("general", "alice")
    for payload in [b"", b"hello", bytes(range(125))]:
        ws.send_frame(OP_PING, payload)
        f = ws.recv_frame()
        assert f.opcode == OP_PONG and f.fin
        assert f.payload == payload


def test_unsolicited_pong_is_ignored(server):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_PONG, b"whatever")
    assert ws.ack_after("after pong")["message"] == "after pong"


def test_fragmented_message_with_interleaved_ping(server):
    ws = server.raw("general", "alice")
    bob = server.client("general", "bob")
    body = msg("fragmented hello", cid="frag-1")
    ws.send_frame(OP_TEXT, body[:10], fin=False)
    ws.send_frame(OP_PING, b"mid")
    f = ws.recv_frame()
    assert f.opcode == OP_PONG and f.payload == b"mid"
    ws.send_frame(OP_CONT, body[10:20], fin=False)
    ws.send_frame(OP_CONT, b"", fin=False)
    ws.send_frame(OP_CONT, body[20:])
    f = ws.recv_frame()
    assert f.opcode == OP_TEXT and f.fin
    ev = json.loads(f.payload)
    assert ev["client_id"] == "frag-1" and ev["message"] == "fragmented hello"
    assert bob.recv() == ev


def test_many_frames_in_one_write(server):
    ws = server.raw("general", "alice")
    blob = b"".join(build_frame(OP_TEXT, msg(f"batch {i}", cid=f"b{i}")) for i in range(50))
    ws.send_raw(blob)
    got = [ws.recv_json()["client_id"] for _ in range(50)]
    assert got == [f"b{i}" for i in range(50)]


def test_frame_split_byte_by_byte(server):
    ws = server.raw("general", "alice")
    frame = build_frame(OP_TEXT, msg("dribble", cid="drib"))
    for i in range(len(frame)):
        ws.send_raw(frame[i:i + 1])
    assert ws.recv_json()["client_id"] == "drib"


def test_client_close_1000_is_echoed_and_tcp_closed(server):
    ws = server.raw("general", "alice")
    ws.send_close(1000, b"bye")
    f = ws.recv_frame()
    assert f.opcode == OP_CLOSE
    assert f.close_code()[0] == 1000
    ws.expect_eof()


@pytest.mark.parametrize("code", [1001, 3000, 4999])
def test_client_close_code_is_echoed(server, code):
    ws = server.raw("general", "alice")
    ws.send_close(code)
    assert ws.recv_frame().close_code()[0] == code
    ws.expect_eof()


def test_empty_close_gets_a_close_back(server):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_CLOSE, b"")
    f = ws.recv_frame()
    assert f.opcode == OP_CLOSE
    code, _ = f.close_code()
    assert code in (None, 1000), f
    ws.expect_eof()


def test_protocol_error_then_tcp_closed(server):
    ws = server.raw("general", "alice")
    ws.send_frame(OP_TEXT, msg("x"), mask=False)
    expect_close(ws, 1002)
    ws.send_close(1002)
    ws.expect_eof()


# ---- idle timeout -------------------------------------------------------------------------


def test_idle_timeout_ping_then_close_1001(chatd):
    srv = chatd("--idle-timeout", "1")
    ws = srv.raw("general", "alice")
    f = ws.recv_frame(timeout=6)
    assert f.opcode == OP_PING, f
    f = ws.recv_frame(timeout=6)  # we never answer the ping
    assert f.opcode == OP_CLOSE, f
    code, reason = f.close_code()
    assert code == 1001
    assert reason == b"ping timeout"


def test_answering_pings_keeps_the_connection(chatd):
    srv = chatd("--idle-timeout", "0.8")  # decimals are allowed
    ws = srv.raw("general", "alice")
    pings = 0
    while pings < 2:
        f = ws.recv_frame(timeout=5)
        assert f.opcode == OP_PING, f
        ws.send_frame(OP_PONG, f.payload)
        pings += 1
    assert ws.ack_after("still alive")["message"] == "still alive"
