"""A member that never reads must not hold up the chat nor grow the server's memory: it is
dropped (1008) once its pending output passes --max-outbound-bytes."""

import socket
import threading
import time

from helpers import metric_value, parse_metrics, wait_until

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


def test_fast_sender_reading_its_echoes_is_slowed_not_cut(chatd):
    """A sender that blasts messages (far more, in echoes, than --max-outbound-bytes) while it
    reads its echoes at its own pace is slowed down (not read until its echoes drain), never
    cut: every message is acknowledged."""
    srv = chatd()
    n, text = 300, "b" * 60000  # ~18 MB of echoes, over 4 MiB of queue plus what kernels buffer
    sender = srv.client("blast", "blaster")
    echoes, errors = [], []

    def read_echoes():
        try:
            while len(echoes) < n:
                ev = sender.recv(timeout=30)
                assert ev["event"] == "message:message", ev
                echoes.append(ev)
                time.sleep(0.01)  # its own pace: slower than it sends
        except Exception as e:  # reported by the main thread
            errors.append(e)

    t = threading.Thread(target=read_echoes, daemon=True)
    t.start()
    for i in range(n):
        sender.send({"event": "message:message", "message": text, "client_id": f"b{i}"})
    t.join(120)
    assert not errors, f"after {len(echoes)} of {n} echoes: {errors[0]!r}"
    assert [e["client_id"] for e in echoes] == [f"b{i}" for i in range(n)]
    assert len({e["message_id"] for e in echoes}) == n
    m = parse_metrics(srv.metrics_text())
    assert not metric_value(m, "chat_ws_closes_total", code="1008"), "someone was cut"
