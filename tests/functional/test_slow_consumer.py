"""A member that never reads must not hold up the chat nor grow the server's memory: it is
dropped (1008) once its pending output passes --max-outbound-bytes."""

import json
import socket
import sqlite3
import threading
import time

from helpers import OP_PING, OP_TEXT, build_frame, metric_value, parse_metrics, wait_until

# The kernel absorbs a lot before chatd's own queue grows: on loopback the server socket's
# send buffer autotunes up to net.ipv4.tcp_wmem's max (4 MiB here), and only what is left
# over counts against --max-outbound-bytes. So send well over 4 MiB in total (~7 MB).
N = 6000
TEXT = "x" * 1024
WINDOW = 32


def test_slow_reader_is_dropped_fast_reader_gets_everything(chatd):
    srv = chatd("--max-outbound-bytes", "65536")
    slow = srv.raw("general", "slow", rcvbuf=4096)  # joins, then never reads
    fast = srv.client("general", "fast")
    sender = srv.client("general", "sender")
    rss_before = srv.rss_kb()

    received, errors = set(), []

    def read_fast():
        try:
            while len(received) < N:
                ev = fast.recv(timeout=30)
                assert ev["event"] == "message:message", ev
                received.add(ev["message_id"])
        except Exception as e:  # reported by the main thread
            errors.append(e)

    t = threading.Thread(target=read_fast, daemon=True)
    t.start()

    # pipelined sends, at most WINDOW unacknowledged
    acked = []
    sent = 0
    while len(acked) < N:
        while sent < N and sent - len(acked) < WINDOW:
            sender.send({"event": "message:message", "message": TEXT, "client_id": f"s{sent}"})
            sent += 1
        ev = sender.recv(timeout=30)
        assert ev["event"] == "message:message", ev
        assert ev["client_id"] == f"s{len(acked)}", ev
        acked.append(ev["message_id"])
    assert len(set(acked)) == N

    t.join(60)
    assert not errors, errors
    assert received == set(acked), f"fast reader got {len(received)} of {N}"

    # the slow member was disconnected: draining its socket ends in EOF or a reset
    got = len(slow.http.buf)
    deadline = time.monotonic() + 15
    closed = False
    slow.sock.settimeout(1)
    while time.monotonic() < deadline:
        try:
            chunk = slow.sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        got += len(chunk)
    assert closed, f"slow consumer still connected after reading {got} bytes"
    assert got < N * len(TEXT), "the slow consumer received everything: it was never slow"

    def closes_1008():
        return (metric_value(parse_metrics(srv.metrics_text()), "chat_ws_closes_total", code="1008")
                or 0) >= 1
    wait_until(closes_1008, what='chat_ws_closes_total{code="1008"} >= 1')

    grown_mb = (srv.rss_kb() - rss_before) / 1024
    assert grown_mb < 64, f"RSS grew by {grown_mb:.1f} MB"

    # the chat still works for those who read
    ack = sender.say("after the storm")
    assert fast.wait_for(lambda e: e.get("message_id") == ack["message_id"])
    assert metric_value(parse_metrics(srv.metrics_text()), "chat_connections") == 2


def blast(raw, n, text, prefix):
    """Send n messages from a thread of its own, on a socket object of its own (sharing the
    connection), so that a send blocked by the server's flow control never holds up reading:
    a client library that sends and reads under one lock (the websockets sync client does)
    deadlocks here against any server that stops reading a sender, which is not what we test."""
    sock = raw.sock.dup()
    sock.settimeout(60)  # the descriptor's O_NONBLOCK is shared: both objects use timeouts
    errors = []

    def run():
        try:
            for i in range(n):
                payload = json.dumps({"event": "message:message", "message": text,
                                      "client_id": f"{prefix}{i}"})
                sock.sendall(build_frame(OP_TEXT, payload))
        except Exception as e:  # reported by the caller
            errors.append(e)
        finally:
            sock.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def read_echoes(raw, n, pace=0.0, timeout=30):
    """The next n text messages as JSON, at the given pace; pings are not answered (a paused
    sender is not read, so an answer could not help it); a close frame fails the test."""
    echoes, pings = [], 0
    while len(echoes) < n:
        f = raw.recv_frame(timeout=timeout)
        if f.opcode == OP_PING:
            pings += 1
            continue
        assert f.opcode == OP_TEXT, f"after {len(echoes)} of {n} echoes: {f!r}"
        echoes.append(json.loads(f.payload))
        if pace:
            time.sleep(pace)
    return echoes, pings


def test_fast_sender_reading_its_echoes_is_slowed_not_cut(chatd):
    """A sender that blasts messages (far more, in echoes, than --max-outbound-bytes) while it
    reads its echoes at its own pace is slowed down (not read until its echoes drain), never
    cut: every message is acknowledged."""
    srv = chatd()
    n, text = 300, "b" * 60000  # ~18 MB of echoes, over 4 MiB of queue plus what kernels buffer
    raw = srv.raw("blast", "blaster", timeout=30)
    t, errors = blast(raw, n, text, "b")
    echoes, _ = read_echoes(raw, n, pace=0.01)  # its own pace: slower than it sends
    t.join(30)
    assert not errors, errors
    assert [e["event"] for e in echoes] == ["message:message"] * n
    assert [e["client_id"] for e in echoes] == [f"b{i}" for i in range(n)]
    assert len({e["message_id"] for e in echoes}) == n
    m = parse_metrics(srv.metrics_text())
    assert not metric_value(m, "chat_ws_closes_total", code="1008"), "someone was cut"


def test_paused_sender_is_not_cut_by_the_keepalive(chatd, tmp_path):
    """A sender paused by the flow control is not read, so chatd cannot see its pongs: while the
    store is slow (here: SQLite locked by another process for 3 s, three idle periods) and its
    echoes are still to come, it must not be pinged and then cut for 'ping timeout'. Every
    message is acknowledged once the store answers. (SQLite whatever CHAT_TEST_STORE says: the
    stall is made with its lock.)"""
    db = tmp_path / "chat.db"
    srv = chatd("--idle-timeout", "1", store=f"sqlite:{db}")
    srv.post("/api/chats/paused/messages", user="pausee", json={"message": "warm"})
    n, text = 100, "p" * 60000  # 6 MB in flight: over half of --max-outbound-bytes (4 MiB)
    raw = srv.raw("paused", "pausee", timeout=30)
    lock = sqlite3.connect(db, timeout=10, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # chatd's writer waits (up to its 5 s busy timeout)
    t, errors = blast(raw, n, text, "p")
    time.sleep(3)
    lock.execute("COMMIT")
    lock.close()
    echoes, _ = read_echoes(raw, n)
    t.join(30)
    assert not errors, errors
    assert [e["event"] for e in echoes] == ["message:message"] * n
    assert [e["client_id"] for e in echoes] == [f"p{i}" for i in range(n)]
    m = parse_metrics(srv.metrics_text())
    assert not metric_value(m, "chat_ws_closes_total", code="1001"), "cut for a ping timeout"


def test_paused_sender_that_reads_nothing_is_still_cut(chatd):
    """The other side of the same rule: a paused sender that reads none of its queue for two
    idle periods is gone (a dead peer that cannot answer pings either), and is closed."""
    srv = chatd("--idle-timeout", "1", "--max-outbound-bytes", "262144")
    raw = srv.raw("stuck", "stuck", rcvbuf=4096, timeout=30)
    t, _ = blast(raw, 500, "s" * 16000, "s")  # ~8 MB of echoes, never read

    def closed_1001():
        m = parse_metrics(srv.metrics_text())
        return (metric_value(m, "chat_ws_closes_total", code="1001") or 0) >= 1
    wait_until(closed_1001, timeout=30, what='chat_ws_closes_total{code="1001"} >= 1')
    assert "write_timeout user=stuck" in srv.log
    t.join(30)
