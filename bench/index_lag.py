#!/usr/bin/env python3
"""bench/index_lag.py: the search pipeline's lag, from a send's acknowledgement to the moment
the message can be found, and chat-indexer's throughput.

Needs a running Kafka and OpenSearch (scripts/kafka, scripts/opensearch) on KAFKA_PORT and
OPENSEARCH_PORT. Starts build/chatd (a fresh SQLite file, --kafka, a fresh topic made by
chatctl migrate) and one build/chat-indexer (a fresh alias), sends N messages (default
50,000) at RATE msg/s (default 10,000) over CONNS WebSockets (default 10, one chat each),
and polls the index every 50 ms for the newest documents (sort by message_id). Prints the
lag p50 / p99 / max over every message and the indexer's docs/s while it was busy. Run from
the repository root after `make`.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "functional"))
import requests  # noqa: E402
from helpers import mint_token, ws_connect  # noqa: E402

N = int(os.environ.get("N", "50000"))
RATE = float(os.environ.get("RATE", "10000"))
CONNS = int(os.environ.get("CONNS", "10"))
KAFKA = f"127.0.0.1:{os.environ['KAFKA_PORT']}"
OS = f"http://127.0.0.1:{os.environ['OPENSEARCH_PORT']}"
tag = uuid.uuid4().hex[:8]
topic, alias = f"bench.{tag}", f"bench-{tag}"
tmp = tempfile.mkdtemp(prefix="index-lag.")
secret = os.urandom(16).hex()
procs = []


def start(argv, ready):
    p = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    procs.append(p)
    while True:
        line = p.stderr.readline()
        if not line:
            sys.exit(f"{argv[0]} did not start")
        m = re.search(ready, line)
        if m:
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return m


try:
    subprocess.run(["build/chatctl", "migrate", "--store", f"sqlite:{tmp}/m.db", "--kafka", KAFKA,
                    "--kafka-topic", topic], check=True, capture_output=True)
    url = f"opensearch://127.0.0.1:{os.environ['OPENSEARCH_PORT']}/{alias}"
    port = int(start(["build/chatd", "--host", "127.0.0.1", "--port", "0", "--store",
                      f"sqlite:{tmp}/chat.db", "--jwt-secret", secret, "--kafka", KAFKA,
                      "--kafka-topic", topic, "--search", url], r"listening.* port=(\d+)").group(1))
    mport = int(start(["build/chat-indexer", "--kafka", KAFKA, "--search", url, "--topic", topic,
                       "--group", f"bench-{tag}", "--replicas", "0", "--metrics-port", "0"],
                      r"metrics_listening.* port=(\d+)").group(1))
    time.sleep(3)  # the group's first assignment
    http = requests.Session()
    http.trust_env = False
    acked_at = {}  # message_id -> monotonic time of its ack
    seen_at = {}
    done = threading.Event()

    def poll():
        # from just below the oldest acknowledged message not seen yet, oldest first: the
        # partitions are indexed in no common order, so "newer than the last seen" would miss
        low = 0
        while True:
            r = http.post(f"{OS}/{alias}/_search", params={"ignore_unavailable": "true"},
                          json={"size": 10000, "_source": False, "sort": [{"message_id": "asc"}],
                                "query": {"range": {"message_id": {"gt": low}}}}, timeout=30)
            now = time.monotonic()
            if r.status_code == 200:
                for h in r.json()["hits"]["hits"]:
                    seen_at.setdefault(h["_id"], now)
            unseen = [int(m) for m in list(acked_at) if m not in seen_at]
            if unseen:
                low = min(unseen) - 1
            elif seen_at:
                low = max(int(m) for m in seen_at)
            if done.is_set() and (not unseen or time.monotonic() > deadline):
                return
            time.sleep(0.05)

    deadline = float("inf")
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    conns = [ws_connect(f"ws://127.0.0.1:{port}/ws/chat/lag{i}?token={mint_token(secret, 'u')}")
             for i in range(CONNS)]
    # a reader per connection; senders paced in 10 ms ticks
    def reader(ws, want):
        got = 0
        while got < want:
            ev = json.loads(ws.recv(timeout=120))
            if ev.get("event") == "message:message":
                acked_at[ev["message_id"]] = time.monotonic()
                got += 1
    per = N // CONNS
    readers = [threading.Thread(target=reader, args=(ws, per)) for ws in conns]
    for t in readers:
        t.start()
    t0 = time.monotonic()
    sent = 0
    while sent < per * CONNS:
        due = int((time.monotonic() - t0) * RATE)
        while sent < min(due, per * CONNS):
            conns[sent % CONNS].send(json.dumps({"event": "message:message",
                                                 "message": f"lag probe {sent} with some words"}))
            sent += 1
        time.sleep(0.01)
    send_s = time.monotonic() - t0
    for t in readers:
        t.join()
    deadline = time.monotonic() + 120
    done.set()
    poller.join()
    lags = sorted(seen_at[m] - a for m, a in acked_at.items() if m in seen_at)
    missing = len(acked_at) - len(lags)
    m = {}
    for line in http.get(f"http://127.0.0.1:{mport}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            m[k] = float(v)
    first = min(seen_at.values())
    last = max(seen_at.values())
    q = lambda p: lags[min(len(lags) - 1, int(p * len(lags)))] * 1000
    print(f"sent {len(acked_at)} in {send_s:.1f} s ({len(acked_at) / send_s:.0f} msg/s acknowledged)")
    print(f"ack -> searchable: p50 {q(0.5):.0f} ms, p99 {q(0.99):.0f} ms, max {lags[-1] * 1000:.0f} ms"
          f"; never seen: {missing}")
    print(f"indexer: {m.get('chat_indexer_docs_indexed_total', 0):.0f} docs, "
          f"{len(seen_at) / max(last - first, 1e-9):.0f} docs/s from the first seen to the last, "
          f"{m.get('chat_indexer_bulk_requests_total', 0):.0f} bulks, mean bulk "
          f"{1000 * m['chat_indexer_bulk_latency_seconds_sum'] / max(1, m['chat_indexer_bulk_latency_seconds_count']):.0f} ms")
finally:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)
