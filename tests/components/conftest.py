"""Fixtures for the components suite: a real Kafka (scripts/kafka) and a real OpenSearch
(scripts/opensearch), each started by its project script on a free loopback port in the
suite's own temporary directory, as the search pipeline's tests will start them.

The one idea: these tests stand on the scripts, not beside them. A component that cannot
start fails the test that asked for it, with the script's output (and so the log's tail);
nothing here skips. Each node is stopped when its module is done, whatever happened, and
its directory removed.
"""

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Component:
    """One node run by scripts/NAME in its own directory, on its own port."""

    def __init__(self, name, base):
        self.name = name
        self.script = REPO / "scripts" / name
        self.port = free_port()
        self.dir = Path(base) / f"{name}-{self.port}"

    def run(self, cmd, timeout=600, env=None):
        """scripts/NAME CMD --port --dir; the CompletedProcess, stdout and stderr merged."""
        return subprocess.run(
            [str(self.script), cmd, "--port", str(self.port), "--dir", str(self.dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=timeout, cwd=str(REPO), env={**os.environ, **(env or {})})

    def start(self, env=None):
        p = self.run("start", env=env)
        if p.returncode != 0:
            pytest.fail(f"scripts/{self.name} start failed (exit {p.returncode}):\n{p.stdout}")
        return p.stdout

    def stop(self):
        return self.run("stop", timeout=120)

    def pid(self):
        """The node's pid as `status` reports it, or None when it says stopped."""
        p = self.run("status", timeout=30)
        if p.returncode == 3:
            return None
        assert p.returncode == 0, p.stdout
        fields = dict(f.split("=", 1) for f in p.stdout.split() if "=" in f)
        return int(fields["pid"])


@pytest.fixture(scope="session")
def component_base():
    base = tempfile.mkdtemp(prefix="chat-components-")
    yield base
    shutil.rmtree(base, ignore_errors=True)


# The cluster id the session's Kafka is formatted with: one that starts with "-", as one in
# 64 random ones would, which the storage tool must not take for an option.
KAFKA_CLUSTER_ID = "-GNoYXQtaW5kZXhlci0wMQ"


def _node(name, base, env=None):
    c = Component(name, base)
    try:
        c.start(env)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def kafka(component_base):
    yield from _node("kafka", component_base, {"KAFKA_CLUSTER_ID": KAFKA_CLUSTER_ID})


@pytest.fixture(scope="module")
def opensearch(component_base):
    yield from _node("opensearch", component_base)


def running(pid):
    """The process exists and is no zombie: an exited node that PID 1 has not reaped yet
    (which some inits do late, or never) has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def assert_stops(c):
    """`stop` ends the node's process, frees its port, and `status` then says stopped."""
    pid = c.pid()
    assert pid is not None, f"{c.name} is not running before the stop"
    p = c.stop()
    assert p.returncode == 0, p.stdout
    assert not running(pid), f"{c.name} pid {pid} still runs after stop"
    assert not port_open(c.port), f"port {c.port} still accepts connections after stop"
    assert c.pid() is None
    # stopping a stopped node is a no-op, not an error
    assert c.stop().returncode == 0
