#!/usr/bin/env python3
"""Cross-node vs same-node delivery latency of a chatd cluster.

One sender on node 1 sends at a fixed rate (open loop: every message has a scheduled send
time, and latency counts from that time, so a stall of the server is not hidden by the
sender waiting for it). One receiver of the same chat sits on node 1 (same node: store
commit, then local delivery) and one on node 2 (cross node: store commit, Redis PUBLISH,
node 2's delivery). The sender's own copy is its acknowledgement: its latency is reported
too. The first second is warm-up and not counted.

By default it starts what it measures: redis-server on a free loopback port and two chatd
nodes (ids 1 and 2) sharing one SQLite file in a temporary directory, and stops them at the
end. With --node1/--node2/--secret it measures a running cluster instead (e.g. the one of
scripts/cluster: --node1 ws://127.0.0.1:8001 --node2 ws://127.0.0.1:8002 --secret
"$(cat data/cluster/jwt_secret)").

Prints a markdown table (header, separator, one row; --no-header for the row alone).

    python3 bench/cluster_latency.py --rate 500 --duration 20
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

REPO = Path(__file__).resolve().parents[1]
WARMUP_S = 1.0
DRAIN_S = 5.0


def token(secret, user):
    def b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": user, "iat": now, "exp": now + 3600}).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def free_port():
    """A free port below the ephemeral range, so no outgoing connection takes it between
    now and the listen."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(500):
        port = random.randrange(10000, max(10001, low - 1000))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    sys.exit("no free port")


def wait_port(port, proc, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port} within {timeout}s")


class LocalCluster:
    """redis-server + two chatd nodes on one shared SQLite file, all in a temp dir."""

    def __init__(self, chatd):
        self.dir = tempfile.mkdtemp(prefix="cluster-latency-")
        self.secret = os.urandom(24).hex()
        self.procs = []
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
        rport = free_port()
        log = open(os.path.join(self.dir, "redis.log"), "wb")
        redis = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(rport), "--save", "",
             "--appendonly", "no", "--dir", self.dir], stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(redis)
        wait_port(rport, redis, "redis-server")
        self.urls = []
        for i in (1, 2):
            port = free_port()
            url = f"ws://127.0.0.1:{port}"
            log = open(os.path.join(self.dir, f"chatd{i}.log"), "wb")
            p = subprocess.Popen(
                [chatd, "--host", "127.0.0.1", "--port", str(port), "--public-url", url,
                 "--node-id", str(i), "--store", f"sqlite:{self.dir}/chat.db",
                 "--bus", f"redis://127.0.0.1:{rport}", "--jwt-secret", self.secret,
                 "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, env=env)
            self.procs.append(p)
            wait_port(port, p, f"chatd{i}")
            self.urls.append(url)

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def pct(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


async def measure(node1, node2, secret, rate, duration):
    chat = f"latency-{os.getpid()}-{int(time.time())}"
    opts = dict(open_timeout=10, ping_interval=None, compression=None, proxy=None,
                max_size=None)

    def url(base, user):
        return f"{base}/ws/chat/{chat}?token={token(secret, user)}"

    sender = await connect(url(node1, "sender"), **opts)
    same = await connect(url(node1, "same-node"), **opts)
    cross = await connect(url(node2, "cross-node"), **opts)
    n = int(rate * duration)
    sched = {}  # seq -> scheduled send time (perf_counter)
    got = {"ack": {}, "same": {}, "cross": {}}

    async def reader(ws, key):
        async for raw in ws:
            t = time.perf_counter()
            ev = json.loads(raw)
            cid = ev.get("client_id", "")
            if ev.get("event") == "message:message" and cid.startswith("b"):
                got[key].setdefault(int(cid[1:]), t)

    tasks = [asyncio.create_task(reader(sender, "ack")),
             asyncio.create_task(reader(same, "same")),
             asyncio.create_task(reader(cross, "cross"))]
    # Let both nodes' subscriptions settle: a probe must cross before the clock starts.
    await sender.send(json.dumps({"event": "message:message", "message": "probe",
                                  "client_id": "b-1"}))
    deadline = time.monotonic() + 10
    while -1 not in got["cross"] and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if -1 not in got["cross"]:
        sys.exit("the probe did not reach node 2 within 10 s: is the bus up?")

    t0 = time.perf_counter() + 0.1
    for seq in range(n):
        at = t0 + seq / rate
        now = time.perf_counter()
        if at > now:
            await asyncio.sleep(at - now)
        sched[seq] = at
        await sender.send(json.dumps({"event": "message:message", "message": f"m{seq}",
                                      "client_id": f"b{seq}"}))
    end = time.perf_counter() + DRAIN_S
    while time.perf_counter() < end and any(len(got[k]) < n + 1 for k in got):
        await asyncio.sleep(0.05)
    for ws in (sender, same, cross):
        await ws.close()
    for t in tasks:
        t.cancel()

    counted = [s for s in range(n) if sched[s] - t0 >= WARMUP_S]
    out = {}
    for key in got:
        lat = [(got[key][s] - sched[s]) * 1000.0 for s in counted if s in got[key]]
        out[key] = (pct(lat, 50), pct(lat, 99), len(counted) - len(lat))
    return out, len(counted)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=500.0, help="messages per second (500)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of sending (20)")
    ap.add_argument("--node1", help="ws://host:port of a running node (the sender's)")
    ap.add_argument("--node2", help="ws://host:port of another running node")
    ap.add_argument("--secret", help="the running cluster's JWT secret")
    ap.add_argument("--chatd", default=str(REPO / "build" / "chatd"))
    ap.add_argument("--no-header", action="store_true", help="print the row only")
    a = ap.parse_args()

    local = None
    if a.node1 or a.node2 or a.secret:
        if not (a.node1 and a.node2 and a.secret):
            ap.error("--node1, --node2 and --secret go together")
        node1, node2, secret, store = a.node1, a.node2, a.secret, "running cluster"
    else:
        local = LocalCluster(a.chatd)
        node1, node2, secret = local.urls[0], local.urls[1], local.secret
        store = "sqlite (shared file), redis bus"
    try:
        res, counted = asyncio.run(measure(node1, node2, secret, a.rate, a.duration))
    finally:
        if local:
            local.stop()

    def ms(v):
        return f"{v:.2f}"

    if not a.no_header:
        print("| setup | rate (msg/s) | duration (s) | messages | same-node p50 / p99 (ms) "
              "| cross-node p50 / p99 (ms) | sender ack p50 / p99 (ms) | lost |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    lost = max(v[2] for v in res.values())
    print(f"| {store} | {a.rate:g} | {a.duration:g} | {counted} "
          f"| {ms(res['same'][0])} / {ms(res['same'][1])} "
          f"| {ms(res['cross'][0])} / {ms(res['cross'][1])} "
          f"| {ms(res['ack'][0])} / {ms(res['ack'][1])} | {lost} |")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
