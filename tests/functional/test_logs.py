"""chatd's log as an operator's tools read it: one line per event, "ts level event key=value
...", logfmt. The one idea: a value a client chooses (the token's `sub`, above all) is
quoted and escaped, so it can never end its own field and forge another one."""

import re
import subprocess

from conftest import CHATCTL
from helpers import OP_TEXT, RawWS

FORGED_SUB = 'alice reason="forged" user=admin'

# a logfmt field: a key, '=', and a bare value or a double-quoted one with backslash escapes
FIELD_RE = re.compile(r'([A-Za-z0-9_.-]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?=\s|$)')
ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def unquote(v):
    if not v.startswith('"'):
        return v
    out, i, body = [], 0, v[1:-1]
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
        elif body[i + 1] == "x":
            out.append(chr(int(body[i + 2 : i + 4], 16)))
            i += 4
        else:
            out.append(ESCAPES[body[i + 1]])
            i += 2
    return "".join(out)


def logfmt_fields(line):
    """(event, [(key, value), ...]) of one log line, or None if it is not a log line."""
    parts = line.split(" ", 3)
    if len(parts) < 3:
        return None
    rest = parts[3] if len(parts) > 3 else ""
    return parts[2], [(k, unquote(v)) for k, v in FIELD_RE.findall(rest)]


def test_logfmt_parser_sees_a_raw_forgery():
    # the check below would catch today's raw `user=%s`
    _, fields = logfmt_fields(f"2026-01-01T00:00:00.000Z info ws_open user={FORGED_SUB} chat=x")
    assert ("user", "admin") in fields and ("reason", "forged") in fields


def test_sub_with_spaces_quotes_and_equals_cannot_forge_log_fields(chatd):
    server = chatd("--log-level", "debug")
    token = subprocess.run(
        [str(CHATCTL), "token", "--user", FORGED_SUB, "--secret", server.secret],
        check=True, capture_output=True, text=True, timeout=10,
    ).stdout.strip()
    # a session that opens (ws_open, debug) and then breaks the protocol (ws_protocol_error,
    # info): both lines name the user
    ws = RawWS(server.port, f"/ws/chat/general?token={token}")
    ack = ws.ack_after("hello")
    assert ack["user_from"] == FORGED_SUB
    ws.send_frame(OP_TEXT, b'{"event":"message:message","message":"x"}', mask=False)
    assert ws.recv_close()[0] == 1002
    assert server.stop() == 0

    named = []
    for line in server.log.splitlines():
        parsed = logfmt_fields(line)
        if not parsed:
            continue
        event, fields = parsed
        assert ("user", "admin") not in fields, line
        assert "reason" not in dict(fields) or event == "ws_protocol_error", line
        users = [v for k, v in fields if k == "user"]
        if users:
            assert users == [FORGED_SUB], line
            named.append(event)
    assert "ws_open" in named and "ws_protocol_error" in named, server.log
