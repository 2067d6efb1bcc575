#!/usr/bin/env bash
# bench/outbox_cost.sh [ROUNDS]: what the Kafka outbox costs chatd's write path.
#
# Starts a real Kafka (scripts/kafka, a free port, a fresh directory), creates the topic
# (chatctl migrate --kafka), then runs bench/run's ingest and chat scenarios (quick, chatd
# only) ROUNDS times (default 3), each round once without --kafka and once with it, turns
# about: the two sides of a ratio always run back to back, so the noise of a shared machine
# falls on both. Prints each run's summary line and, at the end, the median of each figure
# with and without and their ratio. Run from the repository root after `make`.
# OUTBOX_CASSANDRA=HOST:PORT: chatd on that Cassandra instead of SQLite, each run on a fresh
# keyspace made by `chatctl migrate` (dropped afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
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
run() { # label scenario extra-args
    local out args=$3
    if [ -n "${OUTBOX_CASSANDRA:-}" ]; then
        N=$((N + 1))
        local ks="outbox_cost_$$_$N" url="cassandra://$OUTBOX_CASSANDRA/outbox_cost_$$_$N"
        echo "$ks" >>"$DIR/keyspaces"
        build/chatctl migrate --store "$url" >/dev/null
        args="$args --store $url"
    fi
    out=$(BENCH_PEERS=none BENCH_CHATD_ARGS="$args" BENCH_OUT="$DIR/results" bench/run "$2" 2>&1 |
        grep -E "^$2-quick" | head -1) || true
    echo "$1 $out"
}
{
    for r in $(seq "$ROUNDS"); do
        if ((r % 2)); then
            run off ingest ""; run on ingest "--kafka 127.0.0.1:$PORT"
            run off chat ""; run on chat "--kafka 127.0.0.1:$PORT"
        else
            run on ingest "--kafka 127.0.0.1:$PORT"; run off ingest ""
            run on chat "--kafka 127.0.0.1:$PORT"; run off chat ""
        fi
    done
} | tee "$DIR/lines"
python3 - "$DIR/lines" <<'PY'
import re, statistics, sys
vals = {}
for line in open(sys.argv[1]):
    side, rest = line.split(" ", 1)
    if rest.startswith("ingest"):
        m = re.search(r"([\d.]+) durable sends/s", rest)
        if m: vals.setdefault(("ingest sends/s", side), []).append(float(m.group(1)))
    elif rest.startswith("chat"):
        m = re.search(r"p99=([\d.]+)ms", rest)
        if m: vals.setdefault(("chat p99 ms", side), []).append(float(m.group(1)))
for name in ("ingest sends/s", "chat p99 ms"):
    off, on = vals.get((name, "off"), []), vals.get((name, "on"), [])
    if not off or not on:
        print(f"{name}: missing runs (off={off} on={on})"); continue
    mo, mn = statistics.median(off), statistics.median(on)
    print(f"{name}: outbox off median {mo:.1f}, on median {mn:.1f}, on/off = {mn / mo:.3f}"
          f"  (off {off}, on {on})")
PY
