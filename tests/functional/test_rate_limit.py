"""--rate-limit / --rate-burst: a token bucket per user on the node over every send
(messages, edits, deletes), WebSocket and REST together.

What a user sees over the limit: an error event `rate_limited` with `retry_after_ms` (the
connection stays open, nothing is stored), or a REST 429 with Retry-After. Pings are free,
other users are not touched, and --rate-limit 0 is no limit at all.

A burst is written in one TCP write, so the server reads it in one go (one loop turn, one
reading of its clock): exactly `burst` sends pass. The tests about sharing use a slow
refill (one token per 10 s) so that nothing they check depends on how fast the machine is.
"""

import json
import math
import subprocess
import time

from conftest import CHATD, clean_env
from helpers import build_frame, metric_value, parse_metrics

SLOW = ("--rate-limit", "0.1", "--rate-burst", "5")  # one token back every 10 s


def burst(raw, events):
    """Write every event as its own WebSocket frame, all in one write."""
    raw.send_raw(b"".join(build_frame(0x1, json.dumps(e).encode()) for e in events))


def collect(raw, n, timeout=10.0):
    """The next n events (acks and errors) on a raw connection."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        out.append(raw.recv_json(max(0.01, deadline - time.monotonic())))
    return out


def msg(i, prefix="b"):
    return {"event": "message:message", "message": f"{prefix}{i}", "client_id": f"{prefix}-{i}"}


def answer_to(raw, client_id, timeout=10.0):
    """The next event about the send with client_id (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        ev = raw.recv_json(max(0.01, deadline - time.monotonic()))
        if ev.get("client_id") == client_id:
            return ev


def is_limited(ev):
    return ev.get("event") == "error" and ev.get("code") == "rate_limited"


def test_burst_over_the_limit_is_refused_and_nothing_extra_is_stored(chatd):
    server = chatd("--rate-limit", "5", "--rate-burst", "5")
    raw = server.raw("general", user="alice")
    burst(raw, [msg(i) for i in range(20)])
    events = collect(raw, 20)
    acks = [e for e in events if e.get("event") == "message:message"]
    refused = [e for e in events if is_limited(e)]
    assert len(acks) == 5, events
    assert len(refused) == 15, events
    assert {a["client_id"] for a in acks} == {f"b-{i}" for i in range(5)}
    # each refusal names the send it refuses and says when to come back
    assert sorted(e["client_id"] for e in refused) == sorted(f"b-{i}" for i in range(5, 20))
    for e in refused:
        assert isinstance(e["retry_after_ms"], int) and e["retry_after_ms"] > 0, e
        assert e["detail"]
    # nothing but the acknowledged ones was stored
    history = server.all_history("general")
    assert sorted(m["message"] for m in history) == sorted(f"b{i}" for i in range(5))
    metrics = parse_metrics(server.metrics_text())
    assert metric_value(metrics, "chat_rate_limited_total") == 15

    # the connection is still open: after the wait it was told, a send goes through
    time.sleep(max(e["retry_after_ms"] for e in refused) / 1000.0)
    assert raw.ack_after("after the wait")["message"] == "after the wait"
    assert len(server.all_history("general")) == 6


def test_two_connections_of_one_user_share_the_bucket_and_others_are_unaffected(chatd):
    server = chatd(*SLOW)
    tab1 = server.raw("general", user="alice")
    tab2 = server.raw("general", user="alice")
    burst(tab1, [msg(i, "t1-") for i in range(5)])
    assert all(e.get("event") == "message:message" for e in collect(tab1, 5))
    # the other tab of the same user has nothing left
    tab2.send_json(msg(0, "t2-"))
    ev = answer_to(tab2, "t2--0")  # (tab1's five come by on the way: same chat)
    assert is_limited(ev), ev
    assert ev["retry_after_ms"] > 0
    # and neither has its REST sends
    r = server.post("/api/chats/general/messages", user="alice", json={"message": "by rest"})
    assert r.status_code == 429, r.text
    # another user, in the same chat and in another, sends as usual
    bob = server.client("general", "bob")
    assert bob.say("bob is fine")["message"] == "bob is fine"
    carol = server.client("elsewhere", "carol")
    for i in range(5):
        carol.say(f"carol {i}")
    stored = sorted(m["message"] for m in server.all_history("general"))
    assert stored == sorted([f"t1-{i}" for i in range(5)] + ["bob is fine"])


def test_rest_send_over_the_limit_is_429_with_retry_after(chatd):
    server = chatd(*SLOW)
    for i in range(5):
        r = server.post("/api/chats/general/messages", user="bot", json={"message": f"r{i}"})
        assert r.status_code == 201, r.text
    r = server.post("/api/chats/general/messages", user="bot",
                    json={"message": "one too many", "client_id": "x-1"})
    assert r.status_code == 429, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert body["error"] == "rate_limited"
    assert body["detail"]
    assert isinstance(body["retry_after_ms"], int) and body["retry_after_ms"] > 0
    # Retry-After: whole seconds, rounded up
    assert int(r.headers["Retry-After"]) == math.ceil(body["retry_after_ms"] / 1000)
    assert int(r.headers["Retry-After"]) >= 1
    assert sorted(m["message"] for m in server.all_history("general")) == [f"r{i}" for i in range(5)]
    # the REST sends used the user's bucket: its WebSocket is limited as well
    ws = server.raw("general", user="bot")
    ws.send_json(msg(0))
    ev = ws.recv_json(5)
    assert is_limited(ev), ev
    # the connection (keep-alive) still answers, and reads are not limited
    assert server.get("/api/chats/general/messages", user="bot").status_code == 200
    metrics = parse_metrics(server.metrics_text())
    assert metric_value(metrics, "chat_rate_limited_total") == 2  # the 429 and the event


def test_edits_and_deletes_count_pings_do_not(chatd):
    server = chatd(*SLOW)
    raw = server.raw("general", user="alice")
    # pings are free: many of them, then the whole burst is still there
    burst(raw, [{"event": "ping"}] * 30)
    assert all(e == {"event": "pong"} for e in collect(raw, 30))
    # three messages (3 sends), then one edit and one delete (4, 5), each of another message:
    # changes of one message sent back to back may be applied in either order on Cassandra
    ids = [raw.ack_after(t)["message_id"] for t in ("first", "second", "third")]  # 1-3
    burst(raw, [
        {"event": "message:edit", "message": "first!", "message_id": ids[0]},      # 4
        {"event": "message:delete", "message_id": ids[1]},                         # 5
        {"event": "message:edit", "message": "too many", "message_id": ids[2]},    # refused
        {"event": "message:delete", "message_id": ids[2]},                         # refused
    ])
    events = collect(raw, 4)
    # (the refusals come at once, the changes once stored: the order is not the test)
    done = sorted(e["event"] for e in events if e["event"] != "error")
    assert done == ["message:delete", "message:edit"], events
    refused = [e for e in events if e["event"] == "error"]
    assert len(refused) == 2, events
    for e in refused:
        assert is_limited(e), e
        assert e["message_id"] == ids[2]  # the message the refused change was for
        assert e["retry_after_ms"] > 0
    # still open, and pings still answered while limited
    raw.send_json({"event": "ping"})
    assert raw.recv_json(5) == {"event": "pong"}
    history = {m["message_id"]: m for m in server.all_history("general")}
    assert history[ids[0]]["message"] == "first!" and not history[ids[0]]["deleted"]
    assert history[ids[1]]["deleted"] is True
    assert history[ids[2]]["message"] == "third" and not history[ids[2]]["deleted"]
    metrics = parse_metrics(server.metrics_text())
    assert metric_value(metrics, "chat_rate_limited_total") == 2


def test_rate_limit_zero_is_unlimited(chatd):
    server = chatd("--rate-limit", "0", "--rate-burst", "5")
    raw = server.raw("general", user="alice")
    burst(raw, [msg(i) for i in range(200)])
    events = collect(raw, 200, timeout=30)
    assert all(e.get("event") == "message:message" for e in events), [e for e in events if e.get("event") == "error"][:3]
    assert len(server.all_history("general")) == 200
    metrics = parse_metrics(server.metrics_text())
    assert metric_value(metrics, "chat_rate_limited_total") == 0


def test_bad_rate_flags_are_refused(tmp_path):
    for args in (["--rate-limit", "-1"], ["--rate-limit", "fast"], ["--rate-burst", "x"],
                 ["--rate-burst", "-2"]):
        p = subprocess.run([str(CHATD), "--dev", "--store", f"sqlite:{tmp_path}/x.db", *args],
                           env=clean_env(), capture_output=True, text=True, timeout=10)
        assert p.returncode == 2, (args, p.stderr)
        assert "rate-" in p.stderr


def test_environment_and_the_default_burst(chatd):
    # CHAT_RATE_LIMIT / CHAT_RATE_BURST configure it as the flags do
    server = chatd(env={"CHAT_RATE_LIMIT": "0.1", "CHAT_RATE_BURST": "3"})
    raw = server.raw("general", user="alice")
    burst(raw, [msg(i) for i in range(5)])
    events = collect(raw, 5)
    assert sum(e.get("event") == "message:message" for e in events) == 3, events
    assert sum(is_limited(e) for e in events) == 2, events
    # without --rate-burst a burst is twice the rate: 4 at 2 a second
    server2 = chatd("--rate-limit", "2")
    raw2 = server2.raw("general", user="alice")
    burst(raw2, [msg(i) for i in range(10)])
    events = collect(raw2, 10)
    assert sum(e.get("event") == "message:message" for e in events) == 4, events
    # ... and the flag wins over the environment
    server3 = chatd("--rate-limit", "0", env={"CHAT_RATE_LIMIT": "0.1", "CHAT_RATE_BURST": "1"})
    raw3 = server3.raw("general", user="alice")
    burst(raw3, [msg(i) for i in range(10)])
    assert all(e.get("event") == "message:message" for e in collect(raw3, 10))
