#!/usr/bin/env python3
"""bench/presence_cost.py [N]: what presence costs when N members (default 10,000) join one chat.

For each setting, a fresh build/chatd (SQLite in a temp dir, local bus) and build/chat-bench
--idle opening N connections to one chat, held HOLD seconds (default 20) so that every event
is delivered:

  untracked   no client asks for presence events (what a seed-shaped client sees); the node
              still tracks who is online, for presence:get and the REST endpoint
  default     every client asks (?presence=1), --presence-max-members 1000 (the default):
              joins are broadcast until 1,000 users are online, not beyond
  unlimited   every client asks, --presence-max-members 0 replaced by a cap above N: every
              join goes to every member already there, N*(N+1)/2 events

Prints, per setting: the time to connect all N, the server's CPU seconds over the whole run,
its RSS per connection once connected, and the presence events (and bytes of JSON) the
clients received. Run from the repository root after `make`. CHATD=path runs another build
(e.g. one from before presence existed); ONLY=untracked runs one setting.
"""

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
HOLD = os.environ.get("HOLD", "20")
CHATD = os.environ.get("CHATD", "build/chatd")
SETTINGS = [
    ("untracked", [], None),
    ("default", [], "presence=1"),
    ("unlimited", ["--presence-max-members", str(N + 1)], "presence=1"),
]

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
if hard < N + 256:
    sys.exit(f"the open-file limit ({hard}) is too low for {N} connections on both ends")


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(name, args, query):
    tmp = tempfile.mkdtemp(prefix="presence-cost.")
    secret = os.urandom(16).hex()
    log = open(f"{tmp}/chatd.log", "w+")  # a file, not a pipe: nobody reads it while it runs
    chatd = subprocess.Popen([CHATD, "--host", "127.0.0.1", "--port", "0", "--store",
                              f"sqlite:{tmp}/chat.db", "--jwt-secret", secret] + args,
                             stdout=log, stderr=subprocess.STDOUT)
    port = None
    try:
        deadline = time.monotonic() + 10
        while port is None:
            if chatd.poll() is not None or time.monotonic() > deadline:
                sys.exit("chatd did not start:\n" + open(log.name).read())
            m = re.search(r"listening.* port=(\d+)", open(log.name).read())
            port = int(m.group(1)) if m else None
            time.sleep(0.05)
        argv = ["build/chat-bench", "--port", str(port), "--secret", secret, "--idle",
                "--connections", str(N), "--chats", "1", "--publishers", "0", "--hold", HOLD,
                "--server-pid", str(chatd.pid), "--json-only", "--label", name]
        if query:
            argv += ["--query", query]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        r = json.loads(out)
        total_cpu = cpu_s(chatd.pid)
    finally:
        chatd.terminate()
        chatd.wait(30)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    c, srv, tot = r["connect"], r["server"], r["totals"]
    print(f"{name:10} connect {c['ok']}/{c['attempted']} in {c['time_s']:.2f} s, "
          f"server CPU {total_cpu:.2f} s (connect phase {srv['connect_cpu_s']:.2f} s), "
          f"RSS/conn {srv.get('rss_per_conn_bytes_connected')} B, "
          f"events {tot['other_messages']:,} ({tot['other_bytes'] / 1e6:.1f} MB of JSON), "
          f"closes {r['closes']}, errors {r['errors']['by_kind']}", flush=True)


for name, args, query in SETTINGS:
    if os.environ.get("ONLY", name) == name:
        run(name, args, query)
