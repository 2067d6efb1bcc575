#!/usr/bin/env python3
"""bench/search_cost.py [N]: what one search request costs.

Starts build/chatd on a fresh SQLite file (or CHAT_STORE) with --search CHAT_SEARCH (default:
the store's own default, sqlite for SQLite), stores N messages in one chat (default 20,000,
over one WebSocket, 1,000 in flight), then times ROUNDS (default 100) requests of each kind:
a search for a term no message holds (the scan reads its whole budget of 5,000 messages),
a search for words every message holds (a first page of 20), a search for a phrase one old
message holds (message number N/10), and history pages of 50 for comparison. Prints p50
and p99 of each, with what the first answer held. Run from the repository root after `make`.
SEEDED=1 with CHAT_STORE: the store holds them from an earlier run; nothing is sent.
CHATD_ARGS: more chatd flags (e.g. "--kafka H:P --kafka-topic T" while a chat-indexer fills
the index that CHAT_SEARCH=opensearch://... names); with an opensearch:// CHAT_SEARCH the
timing waits until the last message can be found (the indexer has caught up).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "functional"))
import requests  # noqa: E402
from helpers import mint_token, ws_connect  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
ROUNDS = int(os.environ.get("ROUNDS", "100"))
SEARCH = os.environ.get("CHAT_SEARCH")
tmp = tempfile.mkdtemp(prefix="search-cost.")
store = os.environ.get("CHAT_STORE", f"sqlite:{tmp}/chat.db")
secret = os.urandom(16).hex()
chatd = subprocess.Popen(["build/chatd", "--host", "127.0.0.1", "--port", "0", "--store", store,
                          "--jwt-secret", secret] + (["--search", SEARCH] if SEARCH else []) +
                         os.environ.get("CHATD_ARGS", "").split(),
                         stderr=subprocess.PIPE, text=True)
try:
    port = None
    while port is None:
        line = chatd.stderr.readline()
        if not line:
            sys.exit("chatd did not start")
        m = re.search(r"listening.* port=(\d+)", line)
        port = int(m.group(1)) if m else None
    tok = mint_token(secret, "alice")
    ws = ws_connect(f"ws://127.0.0.1:{port}/ws/chat/big?token={tok}")
    # 1,000 in flight at most: unread acknowledgements past --max-outbound-bytes would make
    # this client a slow consumer, and the server would drop it
    acked = 0
    # SEEDED=1: the store (CHAT_STORE) already holds the N messages of an earlier run
    for i in range(0 if os.environ.get("SEEDED") == "1" else N):
        ws.send(json.dumps({"event": "message:message", "client_id": f"c{i}",
                            "message": f"an ordinary chat line, number {i}, with a few words"}))
        while i + 1 - acked >= 1000 or (i + 1 == N and acked < N):
            if json.loads(ws.recv(timeout=60)).get("event") == "message:message":
                acked += 1
    http = requests.Session()
    auth = {"Authorization": f"Bearer {tok}"}

    def timed(path, params):
        ms, first = [], None
        for _ in range(ROUNDS):
            t = time.perf_counter()
            r = http.get(f"http://127.0.0.1:{port}{path}", params=params, headers=auth)
            ms.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
            first = first or r.json()
        ms.sort()
        return ms[len(ms) // 2], ms[min(len(ms) - 1, (len(ms) * 99) // 100)], first

    if SEARCH and "://" in SEARCH:
        t = time.monotonic()
        while not http.get(f"http://127.0.0.1:{port}/api/chats/big/search", headers=auth,
                           params={"q": f'"number {N - 1},"'}).json().get("messages"):
            time.sleep(1)
        print(f"(the index caught up {time.monotonic() - t:.0f} s after the last acknowledgement)")
    old = N // 10
    print(f"{N} messages in one chat, --search {SEARCH or 'default'}, {ROUNDS} requests each:")
    for what, q in [("absent term", "zebra"), ("words in every message", "ordinary chat"),
                    (f"phrase of message {old}", f'"number {old},"')]:
        p50, p99, b = timed("/api/chats/big/search", {"q": q})
        print(f"  search {what:24} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  "
              f"(hits {len(b['messages'])}, scanned {b['scanned']}, "
              f"next_before {'set' if b['next_before'] else 'null'})")
    p50, p99, b = timed("/api/chats/big/messages", {"limit": 50})
    print(f"  history page of 50              p50 {p50:7.2f} ms  p99 {p99:7.2f} ms")
finally:
    chatd.terminate()
    chatd.wait()
    shutil.rmtree(tmp, ignore_errors=True)
