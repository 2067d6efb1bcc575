"""Smoke test of the load generator: build/chat-bench against a real chatd with tiny
scenarios, so `make test` notices when the instrument of the performance work breaks.

The one idea: a benchmark that miscounts is worse than none, so the counts are checked
exactly: with every member of a chat connected, each message sent in the measurement
window reaches every member of its chat (the sender's own copy included, which is its
acknowledgement), no more and no less.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# CHAT_BENCH_BIN runs the test with another build of chat-bench
BENCH = Path(os.environ.get("CHAT_BENCH_BIN", REPO / "build" / "chat-bench")).resolve()

LATENCY_FIELDS = {"count", "min", "p50", "p90", "p99", "p999", "max", "mean"}
TOP_FIELDS = {
    "target", "config", "connect", "duration_s", "sent", "acked", "publish_failed", "delivered",
    "expected_deliveries", "lost", "sends_per_s", "acks_per_s", "deliveries_per_s", "latency_us",
    "ack_latency_us", "schedule_lag_us", "errors", "closes", "totals", "teardown", "client",
    "client_saturated", "server",
}


def require_bench():
    if not BENCH.exists():
        pytest.fail(f"{BENCH} does not exist: build it first (make build/chat-bench)")


def run_bench(srv, *args, timeout=60):
    require_bench()
    argv = [str(BENCH), "--host", "127.0.0.1", "--port", str(srv.port), "--secret", srv.secret,
            "--server-pid", str(srv.pid), "--json-only", *[str(a) for a in args]]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"chat-bench exited with {p.returncode}\n{p.stderr}\n{p.stdout}"
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"chat-bench did not print one JSON object:\n{p.stdout}\n{p.stderr}")


def check_latency(h):
    assert set(h) >= LATENCY_FIELDS, h
    if h["count"]:
        assert h["min"] <= h["p50"] <= h["p90"] <= h["p99"] <= h["p999"] <= h["max"], h


def test_bench_binary_exists():
    require_bench()


def test_self_test():
    require_bench()
    p = subprocess.run([str(BENCH), "--self-test"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 failed" in p.stdout


def test_fixed_rate_counts_every_delivery(chatd):
    srv = chatd()
    r = run_bench(srv, "--connections", 20, "--chats", 2, "--publishers", 2, "--rate", 20,
                  "--duration", 1, "--warmup", 0.5, "--label", "smoke")
    assert set(r) >= TOP_FIELDS, set(TOP_FIELDS) - set(r)
    assert r["target"] == "chatd" and r["label"] == "smoke"
    assert r["config"]["mode"] == "rate"
    assert r["errors"]["total"] == 0, r["errors"]
    assert r["closes"] == {}
    c = r["connect"]
    assert (c["attempted"], c["ok"], c["failed"]) == (20, 20, 0)
    # 2 publishers at 20/s: 40 messages a second of window (loose: a loaded machine may
    # run the timers late; the exact checks are the ones below)
    assert 20 * r["duration_s"] <= r["sent"] <= 40 * r["duration_s"] + 10, r["sent"]
    assert r["acked"] == r["sent"]
    # 20 connections in 2 chats: each message reaches the 10 members of its chat
    assert r["expected_deliveries"] == r["sent"] * 10
    assert r["delivered"] == r["expected_deliveries"]
    assert r["lost"] == 0
    assert r["latency_us"]["count"] == r["delivered"]
    assert r["ack_latency_us"]["count"] == r["acked"]
    for k in ("latency_us", "ack_latency_us", "schedule_lag_us"):
        check_latency(r[k])
    check_latency(r["connect"]["latency_us"])
    assert r["deliveries_per_s"] > 0 and r["sends_per_s"] > 0
    assert r["teardown"]["clean"] == 20 and r["teardown"]["forced"] == 0
    assert isinstance(r["client_saturated"], bool)
    assert r["client"]["cpu_s"] >= 0 and r["client"]["wall_s"] > 1.5
    srv_stats = r["server"]
    assert srv_stats["pid"] == srv.pid
    assert srv_stats["rss_kb_end"] > 0 and srv_stats["measure_cpu_s"] >= 0


def test_window_mode_acks_everything(chatd):
    srv = chatd()
    r = run_bench(srv, "--connections", 6, "--chats", 3, "--publishers", 3, "--rate", 0,
                  "--window", 4, "--duration", 1, "--warmup", 0.2)
    assert r["config"]["mode"] == "window"
    assert r["errors"]["total"] == 0, r["errors"]
    assert r["sent"] > 0
    assert r["acked"] == r["sent"]
    # 6 connections in 3 chats: 2 members each
    assert r["delivered"] == r["expected_deliveries"] == 2 * r["sent"]
    assert r["totals"]["acked"] == r["totals"]["sent"]


def test_idle_reports_connect_time_and_rss(chatd):
    srv = chatd()
    r = run_bench(srv, "--idle", "--connections", 50, "--chats", 5, "--hold", 0.3)
    assert r["config"]["mode"] == "idle"
    assert r["errors"]["total"] == 0, r["errors"]
    assert r["connect"]["ok"] == 50
    assert r["connect"]["time_s"] > 0 and r["connect"]["per_s"] > 0
    assert r["sent"] == 0 and r["delivered"] == 0
    assert "rss_per_conn_bytes_end" in r["server"]


def test_bad_secret_is_counted_as_errors(chatd):
    srv = chatd()
    require_bench()
    argv = [str(BENCH), "--port", str(srv.port), "--secret", "not-the-secret", "--json-only",
            "--connections", 3, "--chats", 1, "--publishers", 1, "--duration", 0.2,
            "--warmup", 0]
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["connect"]["failed"] == 3
    assert r["errors"]["by_kind"] == {"http_401": 3}


def test_deflate_counts_every_delivery_and_reads_fewer_bytes(chatd):
    """--deflate: every connection negotiates it, every compressed delivery is inflated and
    counted, and with --words the bytes read per delivery are fewer than without."""
    srv = chatd()
    args = ("--connections", 20, "--chats", 1, "--publishers", 2, "--rate", 20, "--size", 300,
            "--words", "--duration", 1, "--warmup", 0.5)
    plain = run_bench(srv, *args)
    zipped = run_bench(srv, *args, "--deflate")
    for r in (plain, zipped):
        assert r["errors"]["total"] == 0, r["errors"]
        assert r["lost"] == 0 and r["delivered"] == r["expected_deliveries"] == r["sent"] * 20
    assert plain["wire"]["deflate_connections"] == 0
    assert zipped["wire"]["deflate_offered"] and zipped["wire"]["deflate_connections"] == 20
    assert zipped["wire"]["rx_bytes_per_delivery"] < 0.8 * plain["wire"]["rx_bytes_per_delivery"]
