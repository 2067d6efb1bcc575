"""scripts/cluster on the shared SQLite store, on free ports in a tmp dir: start brings up
Redis, three nodes and HAProxy, a repeated start changes nothing, a message sent through
HAProxy reaches a member on a node, status tells what runs, a dead node is brought back
alone by the next start, and stop ends every process (and is a no-op the second time)."""

import asyncio
import os
import re
import subprocess

import pytest

from clusterlib import REPO, Member, clean_env, free_port, wait_until

SCRIPT = REPO / "scripts" / "cluster"


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of a process we did not start is not ours to reap; count it as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.fixture
def script_env(tmp_path):
    env = clean_env({
        "CLUSTER_DIR": str(tmp_path / "cluster"),
        "CLUSTER_STORE": "sqlite",
        "CLUSTER_SEARCH": "none",  # the search pipeline: test_cluster_search.py
        "CLUSTER_PORT": str(free_port()),
        # nodes on NODE_PORT_BASE+1..3
        "NODE_PORT_BASE": str(free_port(block=4)),
        "REDIS_PORT": str(free_port()),
        "CLUSTER_STATS_PORT": str(free_port()),
    })
    yield env
    subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def run(env, cmd):
    return subprocess.run([str(SCRIPT), cmd], env=env, capture_output=True, text=True,
                          timeout=120, cwd=str(REPO))


def pids(env):
    run_dir = os.path.join(env["CLUSTER_DIR"], "run")
    out = {}
    for name in sorted(os.listdir(run_dir)):
        if name.endswith(".pid"):
            with open(os.path.join(run_dir, name)) as f:
                out[name[:-4]] = int(f.read())
    return out


def test_cluster_script_start_status_stop(script_env):
    env = script_env
    r = run(env, "start")
    assert r.returncode == 0, r.stdout + r.stderr
    proxy = int(env["CLUSTER_PORT"])
    assert f"http://127.0.0.1:{proxy}/" in r.stdout
    assert "chatctl token --user" in r.stdout
    started = pids(env)
    assert set(started) == {"redis", "chatd1", "chatd2", "chatd3", "haproxy"}, started
    assert all(pid_alive(p) for p in started.values())

    again = run(env, "start")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == 5, again.stdout
    assert pids(env) == started, "a second start must not start anything"

    # status and stop find the cluster from CLUSTER_DIR alone (start recorded the ports)
    bare = {k: v for k, v in env.items()
            if k not in ("CLUSTER_STORE", "CLUSTER_PORT", "NODE_PORT_BASE", "REDIS_PORT",
                         "CLUSTER_STATS_PORT")}
    st = run(bare, "status")
    assert st.returncode == 0, st.stdout + st.stderr
    for name in ("redis", "chatd1", "chatd2", "chatd3", "haproxy"):
        assert re.search(rf"^{name}\s+running pid={started[name]}\b", st.stdout, re.M), st.stdout
    assert "3 node(s)" in st.stdout, st.stdout

    secret_file = os.path.join(env["CLUSTER_DIR"], "jwt_secret")
    assert oct(os.stat(secret_file).st_mode & 0o777) == "0o600"
    secret = open(secret_file).read().strip()
    base = int(env["NODE_PORT_BASE"])

    async def through_proxy():
        receiver = Member(secret, "via-proxy", "bob")
        await receiver.connect(f"ws://127.0.0.1:{base + 2}")
        sender = Member(secret, "via-proxy", "alice")
        await sender.connect(f"ws://127.0.0.1:{proxy}")
        await sender.send("hello through haproxy", "c1")
        await sender.wait_for(lambda m: "c1" in m.acks, 10, "ack through haproxy")
        await receiver.wait_ids([sender.acks["c1"]], 10)
        await sender.close()
        await receiver.close()

    asyncio.run(through_proxy())

    # a node dies: start brings back that one alone
    os.kill(started["chatd2"], 9)
    wait_until(lambda: not pid_alive(started["chatd2"]), 10, "chatd2 to die")
    st = run(bare, "status")
    assert st.returncode == 1 and re.search(r"^chatd2\s+stopped", st.stdout, re.M), st.stdout
    again = run(env, "start")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "started chatd2" in again.stdout and again.stdout.count("already running") == 4
    now = pids(env)
    assert now["chatd2"] != started["chatd2"] and pid_alive(now["chatd2"])
    assert {k: v for k, v in now.items() if k != "chatd2"} == \
        {k: v for k, v in started.items() if k != "chatd2"}
    started = now

    stop = run(bare, "stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not any(pid_alive(p) for p in started.values()), "stop left processes behind"
    st = run(env, "status")
    assert st.returncode == 3, st.stdout
    again = run(env, "stop")
    assert again.returncode == 0 and "not running" in again.stdout, again.stdout
