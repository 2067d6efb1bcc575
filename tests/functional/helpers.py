"""Helpers for the black-box tests of chatd: JWT minting, a raw WebSocket client, a raw HTTP
client, a thin JSON wrapper around the websockets sync client, and a Prometheus text parser.

The one idea: everything here is independent of the C code. Tokens are signed with Python's
hmac, frames are built byte by byte, so a bug shared by the server and its own helpers
cannot hide.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import select
import socket
import struct
import time
import uuid
import zlib
from datetime import datetime, timezone

import websockets.sync.client
from websockets.exceptions import ConnectionClosed

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
ID_RE = re.compile(r"^[0-9]+$")


# ---- JWT (HS256) ---------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def make_jwt(secret, payload, header=None, signature=None):
    """An HS256 JWT. header/signature overrides let tests forge bad tokens."""
    if header is None:
        header = {"alg": "HS256", "typ": "JWT"}
    h = b64url(json.dumps(header, separators=(",", ":")).encode())
    p = b64url(json.dumps(payload, separators=(",", ":")).encode())
    signing_input = f"{h}.{p}".encode()
    if signature is None:
        key = secret.encode() if isinstance(secret, str) else secret
        signature = b64url(hmac.new(key, signing_input, hashlib.sha256).digest())
    return f"{h}.{p}.{signature}"


def mint_token(secret, user, chats=None, ttl=3600):
    now = int(time.time())
    payload = {"sub": user, "iat": now, "exp": now + ttl}
    if chats is not None:
        payload["chats"] = list(chats)
    return make_jwt(secret, payload)


def verify_jwt(token, secret):
    """Verify an HS256 token independently; returns (header, payload) or raises AssertionError."""
    parts = token.split(".")
    assert len(parts) == 3, f"not a JWT: {token!r}"
    header = json.loads(b64url_decode(parts[0]))
    payload = json.loads(b64url_decode(parts[1]))
    assert header.get("alg") == "HS256", header
    key = secret.encode()
    want = hmac.new(key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    assert hmac.compare_digest(want, b64url_decode(parts[2])), "bad signature"
    return header, payload


# ---- field checks --------------------------------------------------------------------------


def check_ts(value):
    """RFC 3339 UTC with milliseconds, and a plausible value (the test machine's clock)."""
    assert isinstance(value, str) and TS_RE.match(value), f"bad timestamp {value!r}"
    t = datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert abs(t.timestamp() - time.time()) < 600, f"timestamp far from now: {value}"
    return t


def check_id(value):
    assert isinstance(value, str) and ID_RE.match(value), f"bad message_id {value!r}"
    assert 0 < int(value) < 2**64, value
    return int(value)


# ---- websockets (sync) wrapper -------------------------------------------------------------


def ws_connect(url, **kw):
    kw.setdefault("compression", None)
    kw.setdefault("proxy", None)
    kw.setdefault("open_timeout", 5)
    kw.setdefault("close_timeout", 2)
    kw.setdefault("ping_interval", None)
    kw.setdefault("max_size", None)
    kw.setdefault("max_queue", None)
    kw.setdefault("legacy", True)  # a plain connection object, not the reconnecting wrapper
    return websockets.sync.client.connect(url, **kw)


AUTO = object()


class Client:
    """A chat member speaking JSON over the websockets sync client."""

    def __init__(self, url, user=None, **kw):
        self.url = url
        self.user = user
        self.ws = ws_connect(url, **kw)

    def send(self, obj):
        self.ws.send(obj if isinstance(obj, str) else json.dumps(obj))

    def recv(self, timeout=5.0):
        raw = self.ws.recv(timeout=timeout)
        assert isinstance(raw, str), f"server sent a binary frame: {raw!r}"
        return json.loads(raw)

    def wait_for(self, pred, timeout=5.0):
        """Next event satisfying pred (others are skipped and returned in .skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no matching event within %.1fs" % timeout)
            ev = self.recv(timeout=left)
            if pred(ev):
                return ev

    def say(self, text, client_id=AUTO, timeout=5.0, **extra):
        """Send message:message and wait for this sender's ack; returns the ack event."""
        msg = {"event": "message:message", "message": text}
        if client_id is AUTO:
            client_id = "c-" + uuid.uuid4().hex
        if client_id is not None:
            msg["client_id"] = client_id
        msg.update(extra)
        self.send(msg)

        def is_ack(ev):
            if ev.get("event") == "error":
                raise AssertionError(f"error instead of ack: {ev}")
            if ev.get("event") != "message:message":
                return False
            if client_id is not None:
                return ev.get("client_id") == client_id
            return ev.get("message") == text and (self.user is None or ev.get("user_from") == self.user)

        return self.wait_for(is_ack, timeout=timeout)

    def expect_quiet(self, timeout=0.5):
        """Nothing arrives within timeout (a safety-net wait, not a timing assertion)."""
        try:
            ev = self.ws.recv(timeout=timeout)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected event: {ev!r}")

    def expect_close(self, timeout=5.0):
        """Wait for the server's close; returns (code, reason) it sent."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("server did not close the connection")
                self.ws.recv(timeout=left)
        except TimeoutError:
            raise AssertionError("server did not close the connection")
        except ConnectionClosed as e:
            assert e.rcvd is not None, f"no close frame received from the server ({e!r})"
            return e.rcvd.code, e.rcvd.reason

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass


# ---- raw HTTP ------------------------------------------------------------------------------


class Response:
    def __init__(self, status, reason, headers, body, raw_headers):
        self.status = status
        self.reason = reason
        self.headers = headers  # lowercase name -> last value
        self.raw_headers = raw_headers  # list of (name, value)
        self.body = body

    def json(self):
        return json.loads(self.body)

    def header_values(self, name):
        return [v for k, v in self.raw_headers if k.lower() == name.lower()]

    def __repr__(self):
        return f"<Response {self.status} {self.headers} {self.body[:300]!r}>"


class HttpConn:
    """One TCP connection speaking raw HTTP/1.1 (for keep-alive and malformed requests)."""

    def __init__(self, port, host="127.0.0.1", timeout=5.0, rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.timeout = timeout
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out reading from the server")
        self.sock.settimeout(left)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed by the server")
        self.buf += chunk

    def read_exact(self, n, deadline):
        while len(self.buf) < n:
            self._fill(deadline)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_until(self, sep, deadline, limit=1 << 20):
        while sep not in self.buf:
            if len(self.buf) > limit:
                raise AssertionError("no %r within %d bytes" % (sep, limit))
            self._fill(deadline)
        i = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def read_response(self, timeout=None, head=False):
        deadline = time.monotonic() + (timeout or self.timeout)
        head_bytes = self.read_until(b"\r\n\r\n", deadline)
        lines = head_bytes.decode("latin-1").split("\r\n")
        m = re.match(r"HTTP/1\.[01] (\d{3}) ?(.*)$", lines[0])
        assert m, f"bad status line {lines[0]!r}"
        status = int(m.group(1))
        raw = []
        for line in lines[1:]:
            if not line:
                continue
            k, _, v = line.partition(":")
            raw.append((k.strip(), v.strip()))
        headers = {k.lower(): v for k, v in raw}
        body = b""
        if head or status < 200 or status == 204 or status == 304:
            pass
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = self.read_until(b"\r\n", deadline)
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    self.read_until(b"\r\n", deadline)
                    break
                body += self.read_exact(size, deadline)
                self.read_exact(2, deadline)
        elif "content-length" in headers:
            body = self.read_exact(int(headers["content-length"]), deadline)
        else:
            try:
                while True:
                    self._fill(deadline)
            except EOFError:
                pass
            body, self.buf = self.buf, b""
        return Response(status, m.group(2), headers, body, raw)

    def request(self, method, path, headers=None, body=b"", timeout=None):
        self.send(build_request(method, path, headers, body))
        return self.read_response(timeout=timeout, head=(method == "HEAD"))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def build_request(method, path, headers=None, body=b""):
    hs = {"Host": "127.0.0.1"}
    if headers:
        hs.update(headers)
    if body and not any(k.lower() == "content-length" for k in hs):
        hs["Content-Length"] = str(len(body))
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in hs.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def http_once(port, method, path, headers=None, body=b"", timeout=5.0):
    c = HttpConn(port, timeout=timeout)
    try:
        return c.request(method, path, headers, body)
    finally:
        c.close()


def ws_key():
    return base64.b64encode(os.urandom(16)).decode()


def ws_accept(key):
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


def upgrade_headers(key=None, **overrides):
    h = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key or ws_key(),
        "Sec-WebSocket-Version": "13",
    }
    for k, v in overrides.items():
        h[k.replace("_", "-")] = v
    return h


# ---- raw WebSocket -------------------------------------------------------------------------


class Frame:
    def __init__(self, fin, rsv, opcode, masked, payload):
        self.fin, self.rsv, self.opcode, self.masked, self.payload = fin, rsv, opcode, masked, payload

    def close_code(self):
        assert self.opcode == OP_CLOSE
        if len(self.payload) < 2:
            return None, b""
        return struct.unpack("!H", self.payload[:2])[0], self.payload[2:]

    def __repr__(self):
        return f"<Frame fin={self.fin} rsv={self.rsv} op={self.opcode:#x} {self.payload[:80]!r}>"


def apply_mask(data, key):
    n = len(data)
    if n == 0:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def build_frame(opcode, payload=b"", fin=True, rsv=0, mask=True, length=None):
    """One frame; length overrides the header's payload length (to lie about it)."""
    if isinstance(payload, str):
        payload = payload.encode()
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0xF)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if mask:
        key = os.urandom(4)
        return head + key + apply_mask(payload, key)
    return head + payload


def inflate(payload):
    """A permessage-deflate message's payload, inflated (RFC 7692 7.2.2)."""
    return zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")


def deflate(data, wbits=15):
    """data compressed as a permessage-deflate message (the 00 00 ff ff tail removed)."""
    c = zlib.compressobj(6, zlib.DEFLATED, -wbits)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


class HandshakeRejected(Exception):
    def __init__(self, response):
        super().__init__(f"handshake rejected: {response!r}")
        self.response = response


class RawWS:
    """A hand-made WebSocket client: exact control over every byte we send."""

    def __init__(self, port, path, headers=None, rcvbuf=None, timeout=5.0):
        self.http = HttpConn(port, timeout=timeout, rcvbuf=rcvbuf)
        self.sock = self.http.sock
        key = ws_key()
        h = upgrade_headers(key)
        if headers:
            h.update(headers)
        resp = self.http.request("GET", path, h)
        if resp.status != 101:
            self.http.close()
            raise HandshakeRejected(resp)
        assert resp.headers.get("sec-websocket-accept") == ws_accept(key), resp
        self.response = resp
        # permessage-deflate accepted: the server may set RSV1 on a message's first frame
        self.deflate = "permessage-deflate" in resp.headers.get("sec-websocket-extensions", "")

    def send_raw(self, data):
        self.sock.sendall(data)

    def send_frame(self, opcode, payload=b"", **kw):
        self.sock.sendall(build_frame(opcode, payload, **kw))

    def send_text(self, text, **kw):
        self.send_frame(OP_TEXT, text, **kw)

    def send_json(self, obj):
        self.send_text(json.dumps(obj))

    def send_close(self, code=None, reason=b""):
        payload = b"" if code is None else struct.pack("!H", code) + reason
        self.send_frame(OP_CLOSE, payload)

    def recv_frame(self, timeout=5.0):
        """Next frame from the server; raises EOFError on a closed TCP connection."""
        deadline = time.monotonic() + timeout
        b0, b1 = self.http.read_exact(2, deadline)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self.http.read_exact(2, deadline))[0]
        elif n == 127:
            n = struct.unpack("!Q", self.http.read_exact(8, deadline))[0]
        masked = bool(b1 & 0x80)
        key = self.http.read_exact(4, deadline) if masked else None
        payload = self.http.read_exact(n, deadline)
        if masked:
            payload = apply_mask(payload, key)
        f = Frame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0xF, masked, payload)
        assert not f.masked, "server frames must not be masked"
        assert f.rsv == 0 or (f.rsv == 4 and self.deflate and f.opcode in (OP_TEXT, OP_BINARY)), \
            f"server set RSV bits: {f!r}"
        return f

    def recv_json(self, timeout=5.0):
        """Next text message (skipping pings, answered with pongs) as JSON."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.recv_frame(max(0.01, deadline - time.monotonic()))
            if f.opcode == OP_PING:
                self.send_frame(OP_PONG, f.payload)
                continue
            assert f.opcode == OP_TEXT and f.fin, f"expected a text frame, got {f!r}"
            return json.loads(inflate(f.payload) if f.rsv == 4 else f.payload)

    def recv_close(self, timeout=5.0, skip_data=True):
        """Read until the server's close frame; returns (code, reason). Data frames are
        skipped when skip_data (the server may have queued events before the error)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                f = self.recv_frame(max(0.01, deadline - time.monotonic()))
            except EOFError:
                raise AssertionError("TCP closed without a close frame")
            if f.opcode == OP_CLOSE:
                return f.close_code()
            assert skip_data, f"expected close, got {f!r}"

    def expect_eof(self, timeout=5.0):
        """The server closes TCP (after the close handshake); extra data is an error."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("server did not close TCP")
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return
            if not chunk:
                assert not self.http.buf, f"unread data before EOF: {self.http.buf[:100]!r}"
                return
            self.http.buf += chunk

    def ack_after(self, text, timeout=5.0):
        """Send message:message with a fresh client_id and wait for its ack."""
        cid = "raw-" + uuid.uuid4().hex
        self.send_json({"event": "message:message", "message": text, "client_id": cid})
        deadline = time.monotonic() + timeout
        while True:
            ev = self.recv_json(max(0.01, deadline - time.monotonic()))
            if ev.get("client_id") == cid:
                return ev

    def close(self):
        self.http.close()


# ---- Prometheus text format ----------------------------------------------------------------

_METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """{(name, frozenset(labels.items())): value}"""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_RE.match(line)
        assert m, f"bad metrics line {line!r}"
        labels = frozenset(_LABEL_RE.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric_value(metrics, name, **labels):
    """The value of one series, or None; labels must match exactly the given subset."""
    want = set(labels.items())
    found = [v for (n, ls), v in metrics.items() if n == name and want <= set(ls)]
    if not found:
        return None
    return sum(found)


def metric_names(metrics):
    return {n for n, _ in metrics}


def wait_until(pred, timeout=5.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)
