#!/usr/bin/env bash
# bench/outbox_cost.sh [ROUNDS]: what the Kafka outbox costs chatd's write path.
#
# Starts a real Kafka (scripts/kafka, a free port, a fresh directory), creates the topic
# (chatctl migrate --kafka), then runs bench/run's ingest and chat scenarios (quick, chatd
# only) ROUNDS times (default 3), each round once without --kafka and once with it, turns
# about: the two sides of a ratio always run back to back, so the noise of a shared machine
# falls on both. With CHATD_BEFORE=path (another build of chatd, e.g. the last release) each
# round also runs that binary with --kafka, so that before and after come from one run.
# OUTBOX_CASSANDRA=HOST:PORT: chatd on that Cassandra instead of SQLite, each run on a fresh
# keyspace made by `chatctl migrate` (dropped afterwards).
#
# Prints each run's summary line and, at the end, the median of each figure per side and
# its ratio to "off": durable sends/s and the chat scenario's p99 (what users get), and CPU
# per acknowledged send in the ingest runs, chatd's own (its server_cpu over the sends) and
# the Kafka broker's (its JVM's CPU time over the same runs: on this machine the broker
# shares chatd's cores). Run from the repository root after `make`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
BEFORE=${CHATD_BEFORE:+$(realpath "$CHATD_BEFORE")}
N=0
DIR=$(mktemp -d /tmp/outbox-cost.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
drop_keyspaces() { # the per-run keyspaces of OUTBOX_CASSANDRA (runs happen in a subshell)
    [ -s "$DIR/keyspaces" ] || return 0
    python3 - "$OUTBOX_CASSANDRA" "$DIR/keyspaces" <<'PY' || true
import sys
sys.path.insert(0, "tests")
from cassandra_support import MiniCQL
host, port = sys.argv[1].rsplit(":", 1)
c = MiniCQL(int(port), host=host, timeout=120)
for ks in open(sys.argv[2]).read().split():
    c.query(f"DROP KEYSPACE IF EXISTS {ks}")
PY
}
trap 'drop_keyspaces; scripts/kafka stop --dir "$DIR/kafka" >/dev/null 2>&1 || true; rm -rf "$DIR"' EXIT
scripts/kafka start --port "$PORT" --dir "$DIR/kafka" >&2
build/chatctl migrate --store "sqlite:$DIR/topic.db" --kafka "127.0.0.1:$PORT" >&2
KPID=$(cat "$DIR/kafka/kafka.pid")
jvm_ticks() { awk '{print $14 + $15}' "/proc/$KPID/stat"; }
run() { # side scenario
    local side=$1 scenario=$2 args="" bin=build/chatd out t0 t1
    [ "$side" = off ] || args="--kafka 127.0.0.1:$PORT"
    [ "$side" = before ] && bin=$BEFORE
    if [ -n "${OUTBOX_CASSANDRA:-}" ]; then
        N=$((N + 1))
        local ks="outbox_cost_$$_$N" url="cassandra://$OUTBOX_CASSANDRA/outbox_cost_$$_$N"
        echo "$ks" >>"$DIR/keyspaces"
        build/chatctl migrate --store "$url" >/dev/null
        args="$args --store $url"
    fi
    t0=$(jvm_ticks)
    out=$(CHATD="$bin" BENCH_PEERS=none BENCH_CHATD_ARGS="$args" BENCH_OUT="$DIR/results" \
        bench/run "$scenario" 2>&1 | grep -E "^$scenario-quick" | head -1) || true
    t1=$(jvm_ticks)
    echo "$side broker_ticks=$((t1 - t0)) $out"
}
SIDES=(off on)
[ -z "$BEFORE" ] || SIDES+=(before)
{
    for r in $(seq "$ROUNDS"); do
        order=("${SIDES[@]}")
        ((r % 2)) || order=($(printf '%s\n' "${SIDES[@]}" | tac))
        for s in "${order[@]}"; do run "$s" ingest; done
        for s in "${order[@]}"; do run "$s" chat; done
    done
} | tee "$DIR/lines"
python3 - "$DIR/lines" "$(getconf CLK_TCK)" <<'PY'
import re, statistics, sys
hz = float(sys.argv[2])
vals = {}
def add(name, side, v):
    vals.setdefault(name, {}).setdefault(side, []).append(v)
for line in open(sys.argv[1]):
    side, ticks, rest = line.rstrip("\n").split(" ", 2)
    ticks = int(ticks.split("=")[1])
    if rest.startswith("ingest"):
        m = re.search(r"([\d.]+) durable sends/s", rest)
        c = re.search(r"server_cpu=([\d.]+)%", rest)
        if not m or not float(m.group(1)):
            continue
        sps = float(m.group(1))
        add("ingest sends/s", side, sps)
        if c:
            add("ingest: chatd CPU us/send", side, float(c.group(1)) / 100 / sps * 1e6)
        # the broker's CPU over the whole run; what it burns idle (the "off" runs) is taken
        # off below, and the rest divided by the events of the warm-up and the window (12 s)
        add("broker ticks", side, ticks)
        add("sps", side, sps)
    elif rest.startswith("chat"):
        m = re.search(r"p99=([\d.]+)ms", rest)
        if m:
            add("chat p99 ms", side, float(m.group(1)))
ticks, sps = vals.pop("broker ticks", {}), vals.pop("sps", {})
idle = statistics.median(ticks["off"]) if "off" in ticks else 0
for side in ticks:
    for t, v in zip(ticks[side], sps[side]):
        add("ingest: broker CPU us/send (less its idle)", side, max(t - idle, 0) / hz / (v * 12) * 1e6)
for name, sides in vals.items():
    if "off" not in sides:
        print(f"{name}: no outbox-off run"); continue
    mo = statistics.median(sides["off"])
    parts = [f"off {mo:.1f}"]
    for side in ("on", "before"):
        if side in sides:
            mn = statistics.median(sides[side])
            ratio = f"{mn / mo:.3f}" if mo else "-"
            parts.append(f"{side} {mn:.1f} ({side}/off {ratio})")
    print(f"{name}: medians " + ", ".join(parts) + "   all: " +
          "; ".join(f"{s} {[round(v, 1) for v in vs]}" for s, vs in sides.items()))
PY
