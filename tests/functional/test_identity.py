"""Identity: RS256/ES256 public keys (--jwt-public-key), a JWKS URL that rotates its keys
(--jwks-url), iss/aud checks, and the alg-confusion tokens that must never get in.

Keys are made by each test with the openssl CLI, and most tokens are signed here with the
openssl CLI too (not with our own code), so chatd's verifier is checked against an outside
signer. The JWKS is served by a local Python HTTP server that counts its requests.
"""

import json
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import CHATCTL, CHATD, Proc
from helpers import Client, HttpConn, b64url, make_jwt, upgrade_headers

WAIT = 15.0  # bound for an event (a fetch, a retry) to happen


# ---- keys and tokens, with the openssl CLI ---------------------------------------------------


def openssl(*args, data=None):
    return subprocess.run(["openssl", *args], input=data, capture_output=True, check=True).stdout


class Key:
    """A private key file, its public PEM, and a signer that does not use chatd's code."""

    def __init__(self, tmp_path, name, kind):
        self.kind = kind
        self.priv = tmp_path / f"{name}.pem"
        self.pub = tmp_path / f"{name}.pub"
        if kind == "RS256":
            openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", self.priv)
        else:
            openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", self.priv)
        openssl("pkey", "-in", self.priv, "-pubout", "-out", self.pub)

    def sign(self, data):
        """The JOSE signature of data: PKCS#1 v1.5 as is, or ECDSA's DER as raw r||s."""
        der = openssl("dgst", "-sha256", "-sign", self.priv, data=data)
        return der if self.kind == "RS256" else der_to_raw(der)

    def jwk(self, kid):
        if self.kind == "RS256":
            out = openssl("rsa", "-pubin", "-in", self.pub, "-modulus", "-noout").decode()
            n = bytes.fromhex(out.strip().split("=", 1)[1])
            text = openssl("rsa", "-pubin", "-in", self.pub, "-text", "-noout").decode()
            assert "Exponent: 65537" in text, text
            return {"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64url(n), "e": "AQAB"}
        der = openssl("pkey", "-pubin", "-in", self.pub, "-outform", "DER")
        point = der[-65:]
        assert point[0] == 4
        return {"kty": "EC", "kid": kid, "use": "sig", "crv": "P-256",
                "x": b64url(point[1:33]), "y": b64url(point[33:])}


def der_to_raw(der):
    """ECDSA-Sig-Value (SEQUENCE of two INTEGERs) to JOSE's 64-byte r||s."""
    assert der[0] == 0x30
    i = 2 if der[1] < 0x80 else 3
    out = b""
    for _ in range(2):
        assert der[i] == 0x02
        n = der[i + 1]
        v = der[i + 2:i + 2 + n].lstrip(b"\0")
        out += v.rjust(32, b"\0")
        i += 2 + n
    return out


def token(key, claims=None, header=None, sig=None, user="alice"):
    now = int(time.time())
    payload = claims if claims is not None else {"sub": user, "iat": now, "exp": now + 600}
    h = header if header is not None else {"alg": key.kind, "typ": "JWT"}
    signing = b64url(json.dumps(h).encode()) + "." + b64url(json.dumps(payload).encode())
    signature = sig if sig is not None else key.sign(signing.encode())
    return signing + "." + b64url(signature)


def chatctl_token(*args):
    r = subprocess.run([str(CHATCTL), "token", "--user", "alice", *map(str, args)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def handshake(server, tok, chat="general"):
    """The WebSocket handshake with tok: (status, JSON body or None)."""
    c = HttpConn(server.port)
    try:
        resp = c.request("GET", f"/ws/chat/{chat}?token={tok}", upgrade_headers())
    finally:
        c.close()
    if resp.status == 101:
        return 101, None
    assert resp.headers.get("content-type", "").startswith("application/json"), resp
    body = resp.json()
    assert isinstance(body.get("error"), str) and isinstance(body.get("detail"), str), body
    return resp.status, body


def accepted(server, tok):
    status, body = handshake(server, tok)
    return status == 101


def refused(server, tok):
    status, body = handshake(server, tok)
    assert status == 401, (status, body)
    assert body["error"] == "unauthorized", body
    return body


def wait_until(pred, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


# ---- a JWKS server ---------------------------------------------------------------------------


class JwksServer:
    """Serves {"keys": [...]} at /certs on 127.0.0.1 and counts the GETs."""

    def __init__(self, keys, port=0):
        self.doc = {"keys": keys}
        self.requests = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                with outer.lock:
                    outer.requests += 1
                    body = json.dumps(outer.doc).encode()
                if self.path != "/realms/chat/protocol/openid-connect/certs":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/realms/chat/protocol/openid-connect/certs"
        self.t = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.t.start()

    def set_keys(self, keys):
        with self.lock:
            self.doc = {"keys": keys}

    def count(self):
        with self.lock:
            return self.requests

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server():
    servers = []

    def start(keys, port=0):
        s = JwksServer(keys, port)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def keys(tmp_path):
    return {
        "rsa": Key(tmp_path, "rsa", "RS256"),
        "rsa2": Key(tmp_path, "rsa2", "RS256"),
        "ec": Key(tmp_path, "ec", "ES256"),
        "ec2": Key(tmp_path, "ec2", "ES256"),
    }


# ---- --jwt-public-key --------------------------------------------------------------------------


def test_rs256_and_es256_tokens_from_pem_keys(chatd, keys):
    srv = chatd("--jwt-public-key", keys["rsa"].pub, "--jwt-public-key", keys["ec"].pub)
    # tokens signed by the openssl CLI and by chatctl token --key, for both key types
    for tok in (token(keys["rsa"]), token(keys["ec"]),
                chatctl_token("--key", keys["rsa"].priv), chatctl_token("--key", keys["ec"].priv)):
        assert accepted(srv, tok), tok
    # the shared secret goes on working beside the public keys
    assert accepted(srv, srv.token("alice"))
    # and the session is a real one: a message goes through
    rs = Client(srv.ws_url("general", token=token(keys["rsa"])), user="alice")
    srv.clients.append(rs)
    ack = rs.say("signed by RSA")
    assert ack["user_from"] == "alice" and ack["message"] == "signed by RSA", ack
    # keys we were not given
    refused(srv, token(keys["rsa2"]))
    refused(srv, token(keys["ec2"]))


def test_public_keys_from_the_environment(chatd, keys):
    srv = chatd(env={"CHAT_JWT_PUBLIC_KEY": f"{keys['rsa'].pub}:{keys['ec'].pub}"})
    assert accepted(srv, token(keys["rsa"]))
    assert accepted(srv, token(keys["ec"]))
    refused(srv, token(keys["rsa2"]))


def test_alg_confusion_and_malformed_signatures_refused(chatd, keys):
    rsa, ec = keys["rsa"], keys["ec"]
    srv = chatd("--jwt-public-key", rsa.pub, "--jwt-public-key", ec.pub)
    now = int(time.time())
    claims = {"sub": "mallory", "exp": now + 600}
    # HS256 "signed" with the public key's PEM bytes, as a confused verifier would accept
    for pub in (rsa.pub, ec.pub):
        forged = make_jwt(pub.read_bytes(), claims)
        body = refused(srv, forged)
        assert body["detail"] == "invalid token", body
    # alg none, with and without a signature
    h = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    p = b64url(json.dumps(claims).encode())
    refused(srv, f"{h}.{p}.")
    refused(srv, token(rsa, claims, header={"alg": "none"}))
    # a good signature under the other algorithm's name
    refused(srv, token(rsa, claims, header={"alg": "ES256"}))
    refused(srv, token(ec, claims, header={"alg": "RS256"}))
    refused(srv, token(rsa, claims, header={"alg": "RS512"}))
    # ES256: DER instead of r||s, and r||s cut or padded
    signing = b64url(json.dumps({"alg": "ES256"}).encode()) + "." + p
    der = openssl("dgst", "-sha256", "-sign", ec.priv, data=signing.encode())
    raw = der_to_raw(der)
    assert accepted(srv, signing + "." + b64url(raw))
    for bad in (der, raw[:63], raw + b"\0", raw[:32], b""):
        refused(srv, signing + "." + b64url(bad))


def test_issuer_and_audience(chatd, keys):
    iss = "https://idp.example/realms/chat"
    srv = chatd("--jwt-public-key", keys["rsa"].pub, "--jwt-issuer", iss, "--jwt-audience", "chat")
    now = int(time.time())
    ok = {"sub": "alice", "exp": now + 600, "iss": iss, "aud": "chat"}
    assert accepted(srv, token(keys["rsa"], ok))
    assert accepted(srv, token(keys["rsa"], {**ok, "aud": ["account", "chat"]}))
    assert accepted(srv, chatctl_token("--key", keys["rsa"].priv, "--iss", iss, "--aud", "chat"))
    refused(srv, token(keys["rsa"], {**ok, "iss": "https://evil.example/realms/chat"}))
    refused(srv, token(keys["rsa"], {**ok, "aud": "other"}))
    refused(srv, token(keys["rsa"], {**ok, "aud": ["account"]}))
    refused(srv, token(keys["rsa"], {k: v for k, v in ok.items() if k != "iss"}))
    refused(srv, token(keys["rsa"], {k: v for k, v in ok.items() if k != "aud"}))
    # the REST API checks the same way
    r = srv.get("/api/chats/general/messages", headers={"Authorization": "Bearer " + token(keys["rsa"], ok)})
    assert r.status_code == 200, r.text
    r = srv.get("/api/chats/general/messages",
                headers={"Authorization": "Bearer " + token(keys["rsa"], {**ok, "aud": "x"})})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text


def test_chatctl_token_key_errors(keys):
    cases = [
        (["--key", keys["rsa"].pub], 1, "private key"),  # a public key cannot sign
        (["--key", keys["rsa"].priv, "--secret", "s"], 2, "not both"),
        (["--key", "/nonexistent/key.pem"], 1, "cannot read"),
    ]
    for args, code, why in cases:
        r = subprocess.run([str(CHATCTL), "token", "--user", "alice", *map(str, args)],
                           capture_output=True, text=True)
        assert r.returncode == code and why in r.stderr and not r.stdout, (args, r)


def test_bad_key_files_stop_chatd_with_a_reason(tmp_path, keys):
    cases = [
        (tmp_path / "missing.pem", "cannot open"),
        (keys["rsa"].priv, "PUBLIC KEY"),  # a private key given as the public one
    ]
    small = tmp_path / "small.pem"
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024", "-out", small)
    openssl("pkey", "-in", small, "-pubout", "-out", tmp_path / "small.pub")
    cases.append((tmp_path / "small.pub", "2048"))
    for path, why in cases:
        p = Proc([CHATD, "--port", "0", "--host", "127.0.0.1", "--store", f"sqlite:{tmp_path}/c.db",
                  "--jwt-public-key", path])
        assert p.wait(10) == 2, p.output
        assert str(path) in p.output and why in p.output, p.output


def test_public_key_without_a_secret(tmp_path, keys):
    """No --jwt-secret is needed when tokens come from an identity provider."""
    p = Proc([CHATD, "--port", "0", "--host", "127.0.0.1", "--store", f"sqlite:{tmp_path}/c.db",
              "--jwt-public-key", keys["ec"].pub])
    try:
        import re
        m = p.wait_output(re.compile(r"listening.*\bport=(\d+)"), 10)
        assert m, p.output

        class S:
            port = int(m.group(1))
        assert accepted(S, token(keys["ec"]))
        refused(S, make_jwt("", {"sub": "alice"}))
    finally:
        p.p.terminate()
        assert p.wait(10) == 0, p.output


# ---- --jwks-url ------------------------------------------------------------------------------


def test_jwks_rotation(chatd, keys, jwks_server):
    a, b = keys["rsa"], keys["ec"]
    idp = jwks_server([a.jwk("a1")])
    srv = chatd("--jwks-url", idp.url, "--jwks-min-interval", "1")
    tok_a = token(a, header={"alg": "RS256", "kid": "a1"})
    # the first fetch runs at start, beside the listening socket
    wait_until(lambda: accepted(srv, tok_a), "the token of the first key is accepted")
    fetches = idp.count()
    assert fetches >= 1

    # rotate: the provider now publishes only b, under a new kid
    idp.set_keys([b.jwk("b1")])
    tok_b = token(b, header={"alg": "ES256", "kid": "b1"})
    first = handshake(srv, tok_b)
    if first[0] != 101:
        assert first[0] == 401 and "kid" in first[1]["detail"], first
    wait_until(lambda: accepted(srv, tok_b), "the new key's token is accepted after the refresh")
    assert idp.count() > fetches
    # the retired key is gone with the refresh
    wait_until(lambda: handshake(srv, tok_a)[0] == 401, "the old key's token is refused")
    assert "jwks fetched" in srv.log


def test_jwks_flood_of_unknown_kids_is_rate_limited(chatd, keys, jwks_server):
    a = keys["rsa"]
    idp = jwks_server([a.jwk("a1")])
    min_interval = 2
    srv = chatd("--jwks-url", idp.url, "--jwks-min-interval", str(min_interval))
    wait_until(lambda: accepted(srv, token(a, header={"alg": "RS256", "kid": "a1"})), "first fetch")
    before = idp.count()
    t0 = time.monotonic()
    for i in range(60):
        body = refused(srv, token(a, header={"alg": "RS256", "kid": f"bogus-{i}"}))
        assert "kid" in body["detail"], body
    # a fetch the flood asked for may still be waiting for its slot: let it run
    time.sleep(min_interval + 1)
    elapsed = time.monotonic() - t0
    fetched = idp.count() - before
    # at most one fetch per interval (plus the one that may start at once)
    assert fetched <= 1 + int(elapsed / min_interval) + 1, (fetched, elapsed)
    assert fetched < 60
    # and the server still serves good tokens
    assert accepted(srv, token(a, header={"alg": "RS256", "kid": "a1"}))


def test_jwks_unreachable_at_start(chatd, keys, jwks_server):
    """chatd starts without the provider, serves the secret's tokens, refuses the
    provider's, and picks the keys up once the provider answers."""
    a = keys["ec"]
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f"http://127.0.0.1:{port}/realms/chat/protocol/openid-connect/certs"
    srv = chatd("--jwks-url", url, "--jwks-min-interval", "1")
    tok = token(a, header={"alg": "ES256", "kid": "k1"})
    assert accepted(srv, srv.token("alice"))
    refused(srv, tok)
    wait_until(lambda: "jwks fetch failed" in srv.log, "the failed fetch is logged")
    idp = jwks_server([a.jwk("k1")], port=port)
    wait_until(lambda: accepted(srv, tok), "the provider's token is accepted once it answers")
    assert idp.count() >= 1


def test_jwks_bad_documents_keep_the_last_good_keys(chatd, keys, jwks_server):
    a = keys["rsa"]
    idp = jwks_server([a.jwk("a1")])
    srv = chatd("--jwks-url", idp.url, "--jwks-min-interval", "1")
    tok = token(a, header={"alg": "RS256", "kid": "a1"})
    wait_until(lambda: accepted(srv, tok), "first fetch")
    n = idp.count()
    with idp.lock:
        idp.doc = "not a jwks"
    refused(srv, token(a, header={"alg": "RS256", "kid": "unknown"}))  # asks for a refetch
    wait_until(lambda: idp.count() > n and "jwks fetch failed" in srv.log, "the bad refetch")
    assert accepted(srv, tok)


def test_shutdown_while_the_provider_stalls(chatd, keys):
    """A JWKS fetch that never gets an answer does not hold up SIGTERM (the fixture insists
    on a clean exit within its deadline)."""
    stall = socket.socket()
    stall.bind(("127.0.0.1", 0))
    stall.listen(8)  # accepts connections (the kernel does) and never answers
    try:
        url = f"http://127.0.0.1:{stall.getsockname()[1]}/certs"
        srv = chatd("--jwks-url", url)
        assert accepted(srv, srv.token("alice"))
        refused(srv, token(keys["ec"], header={"alg": "ES256", "kid": "k1"}))
        srv.stop_ok()
        assert "jwks fetched" not in srv.log
    finally:
        stall.close()
