"""TLS in chatd (--tls-cert, --tls-key): HTTPS and WSS on one port, checked the way a client
sees them, against certificates this test makes with the openssl CLI (a test CA signing
server certificates for 127.0.0.1 and localhost).

The one idea: a client verifies the server against the test CA, as a real one would; every
assertion is about what crosses the wire (the certificate presented, the protocol version,
the ALPN protocol, the cipher the server chose, the bytes of a refusal), plus the server's
own log lines for what only it can tell (a reload, a handshake cut by the deadline).
"""

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time

import pytest
import requests

from conftest import CHATD, REPO, Proc
from helpers import Client


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _server_cert(d, name, ca):
    """An EC P-256 key and a certificate for 127.0.0.1 and localhost signed by ca."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA and two server certificates it signed (a and b), plus one it did not."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other_ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}",
                 cwd=d)
    out = {"dir": d, "ca": d / "ca.pem"}
    out["a"] = _server_cert(d, "server-a", "ca")
    out["b"] = _server_cert(d, "server-b", "ca")
    out["stranger"] = _server_cert(d, "stranger", "other_ca")
    return out


def der(pem_path):
    return ssl.PEM_cert_to_DER_cert(pem_path.read_text())


def client_ctx(pki, **kw):
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


@pytest.fixture
def tls_server(chatd, pki, tmp_path):
    """chatd(*args) with TLS on, its certificate files copied where SIGHUP rereads them."""

    def start(*args):
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        shutil.copy(pki["a"][0], cert)
        shutil.copy(pki["a"][1], key)
        # TLS is below the store: SQLite always (also in the suite's run on Cassandra)
        s = chatd("--tls-cert", cert, "--tls-key", key, *args, store=f"sqlite:{tmp_path}/c.db")
        s.cert, s.key = cert, key
        s.https = f"https://127.0.0.1:{s.port}"
        s.wss = lambda chat, user: f"wss://127.0.0.1:{s.port}/ws/chat/{chat}?token={s.token(user)}"
        return s

    return start


def handshake(port, ctx, host="127.0.0.1"):
    """A TLS connection to chatd; returns the SSLSocket (the caller closes it)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname=host)


def https_get(port, ctx, path):
    with handshake(port, ctx) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_https_rest_wss_fanout_and_connect_url(tls_server, pki):
    s = tls_server()
    r = requests.get(s.https + "/healthz", verify=str(pki["ca"]), timeout=5)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    # /api/connect sends clients to wss:// on this port
    r = requests.get(s.https + "/api/connect", params={"chat_id": "general"},
                     headers=s.auth("alice"), verify=str(pki["ca"]), timeout=5)
    assert r.status_code == 200, r.text
    assert r.json()["url"].startswith(f"wss://127.0.0.1:{s.port}"), r.json()
    assert r.json()["ws_url"].startswith(f"wss://127.0.0.1:{s.port}/ws/chat/general"), r.json()

    ctx = client_ctx(pki)
    alice = Client(s.wss("general", "alice"), user="alice", ssl=ctx)
    bob = Client(s.wss("general", "bob"), user="bob", ssl=ctx)
    s.clients += [alice, bob]
    ack = alice.say("over TLS")
    got = bob.wait_for(lambda e: e.get("message_id") == ack["message_id"])
    assert got["message"] == "over TLS" and got["user_from"] == "alice"
    # a large message crosses several TLS records intact
    big = "x" * 60000
    ack = bob.say(big)
    assert alice.wait_for(lambda e: e.get("message_id") == ack["message_id"])["message"] == big
    # REST over HTTPS sees what was sent over WSS
    r = requests.get(s.https + "/api/chats/general/messages", headers=s.auth("carol"),
                     verify=str(pki["ca"]), timeout=5)
    assert [m["message"] for m in r.json()["messages"]][:2] == [big, "over TLS"]


def test_a_client_trusting_another_ca_refuses_the_server(tls_server, pki):
    s = tls_server()
    other = ssl.create_default_context(cafile=str(pki["dir"] / "other_ca.pem"))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(s.port, other).close()
    assert https_get(s.port, client_ctx(pki), "/healthz")[0] == 200


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_versions_alpn_and_server_cipher_order(tls_server, pki):
    s = tls_server()
    for v in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        with handshake(s.port, client_ctx(pki, minimum_version=v, maximum_version=v)) as c:
            assert c.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[v.name]

    # TLS 1.1 is refused, even by a client willing to use weak settings
    old = client_ctx(pki, minimum_version=ssl.TLSVersion.TLSv1_1,
                     maximum_version=ssl.TLSVersion.TLSv1_1)
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        handshake(s.port, old).close()

    ctx = client_ctx(pki)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with handshake(s.port, ctx) as c:
        assert c.selected_alpn_protocol() == "http/1.1"
    with handshake(s.port, client_ctx(pki)) as c:  # no ALPN offered: served all the same
        assert c.selected_alpn_protocol() is None
    only_h2 = client_ctx(pki)
    only_h2.set_alpn_protocols(["h2"])
    with pytest.raises(ssl.SSLError, match="NO_APPLICATION_PROTOCOL|no application protocol"):
        handshake(s.port, only_h2).close()

    # TLS 1.2: the client prefers ChaCha20, the server's order puts AES-GCM first and wins
    ctx = client_ctx(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256")
    with handshake(s.port, ctx) as c:
        assert c.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"


def test_session_ticket_resumes_across_a_reload(tls_server, pki):
    s = tls_server()
    ctx = client_ctx(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    with handshake(s.port, ctx) as c:
        session = c.session
        assert session.has_ticket

    def resumed():
        raw = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as c:
            return c.session_reused

    assert resumed()
    s.proc.p.send_signal(signal.SIGHUP)  # a new context; the ticket keys are carried over
    assert s.proc.wait_output(re.compile(r"tls_reloaded"), 5), s.log
    assert resumed()


def test_a_connection_over_the_limit_gets_its_503_over_tls(tls_server, pki):
    s = tls_server("--max-connections", "1")
    ctx = client_ctx(pki)
    first = handshake(s.port, ctx)
    try:
        status, body = https_get(s.port, ctx, "/healthz")
        assert status == 503 and json.loads(body)["error"] == "too_many_connections"
    finally:
        first.close()


def test_plain_http_to_the_tls_port_gets_a_clear_error(tls_server, pki):
    s = tls_server()
    with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := c.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body)["error"] == "tls_required"


def test_sighup_swaps_the_certificate_and_keeps_connections(tls_server, pki):
    s = tls_server()
    ctx = client_ctx(pki)
    with handshake(s.port, ctx) as c:
        assert c.getpeercert(binary_form=True) == der(pki["a"][0])
    alice = Client(s.wss("room", "alice"), user="alice", ssl=ctx)
    s.clients.append(alice)
    alice.say("before")

    shutil.copy(pki["b"][0], s.cert)
    shutil.copy(pki["b"][1], s.key)
    s.proc.p.send_signal(signal.SIGHUP)
    assert s.proc.wait_output(re.compile(r"tls_reloaded"), 5), s.log
    with handshake(s.port, ctx) as c:  # new handshakes: the new pair
        assert c.getpeercert(binary_form=True) == der(pki["b"][0])
    bob = Client(s.wss("room", "bob"), user="bob", ssl=ctx)
    s.clients.append(bob)
    ack = alice.say("after")  # the connection opened before the reload goes on
    assert bob.wait_for(lambda e: e.get("message_id") == ack["message_id"])["message"] == "after"

    # a broken pair (key of another certificate) is refused; the current one stays
    shutil.copy(pki["stranger"][1], s.key)
    s.proc.p.send_signal(signal.SIGHUP)
    assert s.proc.wait_output(re.compile(r"tls_reload_failed error=.*does not match"), 5), s.log
    with handshake(s.port, ctx) as c:
        assert c.getpeercert(binary_form=True) == der(pki["b"][0])
    alice.say("still here")


def client_hello():
    """The first flight of a real TLS client, from Python's ssl on memory BIOs."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(inc, out, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def closed_by_server(sock, timeout=5.0):
    """True once the server closed (FIN or reset) within timeout."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_stalled_handshakes_are_cut_by_the_header_timeout(tls_server, pki):
    s = tls_server("--header-timeout", "1")
    hello = client_hello()
    socks = []
    for i in range(10):
        c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        if i % 2:  # half send part of a ClientHello, half nothing at all
            c.sendall(hello[: len(hello) // 2])
        socks.append(c)
    try:
        for c in socks:
            assert closed_by_server(c), "a stalled handshake was not cut"
    finally:
        for c in socks:
            c.close()
    # the log line is written just before the close; the reader of the log may lag behind
    assert s.proc.wait_output(re.compile(r"(?s)(tls_handshake_timeout.*){10}"), 5), s.log
    assert https_get(s.port, client_ctx(pki), "/healthz")[0] == 200


def test_shutdown_with_handshakes_under_way(tls_server):
    s = tls_server()
    socks = [socket.create_connection(("127.0.0.1", s.port), timeout=5) for _ in range(3)]
    socks[1].sendall(client_hello()[:40])
    try:
        s.stop_ok()  # within the stop timeout, exit status 0: the handshakes did not hold it
        for c in socks:
            assert closed_by_server(c)
    finally:
        for c in socks:
            c.close()


def test_tls_garbage_closes_without_memory_growth(tls_server, pki):
    s = tls_server()
    rnd = os.urandom(1 << 16)
    hello = client_hello()
    payloads = [
        rnd[:4096],                                   # not TLS at all
        b"\x16\x03\x01\xff\xff" + rnd[:20000],        # a record longer than TLS allows
        hello[:5] + rnd[: len(hello) - 5],            # a record header with garbage after it
        b"\x15\x03\x03\x00\x02\x02\x28",              # an alert first
        hello + b"\x17\x03\x03\x00\x20" + rnd[:32],   # application data before the handshake
    ]

    def round_of(n):
        for i in range(n):
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
                try:
                    c.sendall(payloads[i % len(payloads)])
                except (ConnectionResetError, BrokenPipeError):
                    continue
                assert closed_by_server(c), f"garbage {i % len(payloads)} left the connection open"

    round_of(100)  # warm up the allocator
    before = s.rss_kb()
    round_of(500)
    grown = s.rss_kb() - before
    # a leak of even a TLS object (a few KiB) per connection would be megabytes here
    assert grown < 1024, f"RSS grew by {grown} KiB over 500 garbage connections"
    assert https_get(s.port, client_ctx(pki), "/healthz")[0] == 200


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tls-cert", "{a_cert}"], "go together"),
        (["--tls-key", "{a_key}"], "go together"),
        (["--tls-cert", "{a_cert}", "--tls-key", "{dir}/missing.key"], "cannot load the TLS key"),
        (["--tls-cert", "{a_key}", "--tls-key", "{a_key}"], "cannot load the TLS certificate"),
        (["--tls-cert", "{a_cert}", "--tls-key", "{b_key}"], "does not match"),
    ],
)
def test_bad_tls_configuration_exits_2(pki, tmp_path, args, message):
    fill = {"a_cert": pki["a"][0], "a_key": pki["a"][1], "b_key": pki["b"][1], "dir": pki["dir"]}
    argv = [CHATD, "--port", "0", "--host", "127.0.0.1", "--store", f"sqlite:{tmp_path}/c.db",
            "--jwt-secret", "x" * 32, *[a.format(**fill) for a in args]]
    p = Proc(argv)
    assert p.wait(10) == 2
    assert message in p.output, p.output


def test_env_variables_configure_tls(chatd, pki, tmp_path):
    s = chatd(env={"CHAT_TLS_CERT": str(pki["a"][0]), "CHAT_TLS_KEY": str(pki["a"][1])},
              store=f"sqlite:{tmp_path}/c.db")
    assert "tls=1" in s.log
    assert https_get(s.port, client_ctx(pki), "/healthz")[0] == 200


def test_chat_bench_speaks_tls(tls_server, pki):
    """The load generator over wss:// counts exactly, and checks the certificate it is shown."""
    s = tls_server()
    bench = os.environ.get("CHAT_BENCH_BIN", str(REPO / "build" / "chat-bench"))

    def run(*args):
        argv = [bench, "--host", "127.0.0.1", "--port", str(s.port), "--secret", s.secret,
                "--json-only", "--tls", *[str(a) for a in args]]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    r = run("--ca", pki["ca"], "--connections", 10, "--chats", 2, "--publishers", 2,
            "--rate", 20, "--duration", 1, "--warmup", 0.3)
    assert r["tls"] is True and r["errors"]["total"] == 0, r["errors"]
    assert r["connect"]["ok"] == 10
    assert r["sent"] > 0 and r["delivered"] == r["expected_deliveries"] == 5 * r["sent"]
    assert r["teardown"]["clean"] == 10
    # a CA that did not sign the server's certificate: every handshake fails, counted
    r = run("--ca", pki["dir"] / "other_ca.pem", "--connections", 3, "--chats", 1,
            "--publishers", 1, "--duration", 0.2, "--warmup", 0)
    assert r["connect"]["failed"] == 3
    assert r["errors"]["by_kind"] == {"tls_handshake": 3}
