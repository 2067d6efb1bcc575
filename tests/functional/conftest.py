"""Fixtures for the black-box tests: start the real build/chatd on a free port with its own
SQLite file and JWT secret, and stop it cleanly afterwards.

The one idea: each test gets a real server process, and teardown insists that the server
stops with exit code 0 on SIGTERM, so a crash or a hang anywhere in a test is a failure.
"""

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import Client, RawWS, mint_token  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# CHATD_BIN runs the suite against another build (e.g. build/asan/chatd)
CHATD = Path(os.environ.get("CHATD_BIN", REPO / "build" / "chatd")).resolve()
CHATCTL = REPO / "build" / "chatctl"
# CHAT_TEST_STORE=cassandra runs the whole suite on a real Cassandra (one fresh keyspace per
# server); the default is the embedded SQLite store.
TEST_STORE = os.environ.get("CHAT_TEST_STORE", "sqlite")
LISTEN_RE = re.compile(r"listening.*\bport=(\d+)")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def clean_env(extra=None):
    """The test environment without any CHAT_* variable (they would configure the server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    if extra:
        env.update(extra)
    return env


def require_binary(path):
    if not path.exists():
        pytest.fail(f"{path} does not exist: run `make` first")


class Proc:
    """A child process whose merged stdout+stderr is drained into a buffer by a thread."""

    def __init__(self, argv, env=None, cwd=REPO):
        self.argv = [str(a) for a in argv]
        self.p = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=clean_env(env),
            cwd=str(cwd),
        )
        self._chunks = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._eof = False
        self._t = threading.Thread(target=self._drain, daemon=True)
        self._t.start()

    def _drain(self):
        fd = self.p.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if not chunk:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._chunks.append(chunk)
                self._cond.notify_all()

    @property
    def output(self):
        with self._lock:
            return b"".join(self._chunks).decode("utf-8", "replace")

    def wait_output(self, regex, timeout):
        """Wait until regex matches the output; returns the match, or None on timeout/EOF."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = regex.search(b"".join(self._chunks).decode("utf-8", "replace"))
                if m:
                    return m
                if self._eof:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def wait(self, timeout):
        rc = self.p.wait(timeout=timeout)
        self._t.join(timeout=2)
        return rc


class Chatd:
    """One chatd under test. restart() keeps the store; the port may change."""

    def __init__(self, tmp_path, args=(), secret=None, env=None, store=None):
        require_binary(CHATD)
        self.tmp_path = Path(tmp_path)
        self.secret = secret or secrets.token_hex(24)
        self.owned_store = None
        if store is None and TEST_STORE == "cassandra":
            sys.path.insert(0, str(REPO / "tests"))
            import cassandra_support  # noqa: E402

            store = self.owned_store = cassandra_support.new_store_url()
        self.store = store or f"sqlite:{self.tmp_path}/chat.db"
        self.args = [str(a) for a in args]
        self.env = env
        self.proc = None
        self.port = None
        self.logs = []  # output of previous incarnations
        self.clients = []
        self.killed = False
        self.session = requests.Session()
        self.session.trust_env = False
        self._start()

    # ---- lifecycle ----
    def argv(self):
        return [
            CHATD, "--port", "0", "--host", "127.0.0.1", "--store", self.store,
            "--jwt-secret", self.secret, *self.args,
        ]

    def _start(self):
        self.killed = False
        self.proc = Proc(self.argv(), env=self.env)
        m = self.proc.wait_output(LISTEN_RE, START_TIMEOUT)
        if not m:
            rc = self.proc.p.poll()
            if rc is None:
                self.proc.p.kill()
                self.proc.wait(5)
            pytest.fail(
                f"chatd did not report `listening ... port=N` within {START_TIMEOUT}s "
                f"(exit code {rc}); argv={self.proc.argv}\n--- log ---\n{self.proc.output}"
            )
        self.port = int(m.group(1))

    @property
    def pid(self):
        return self.proc.p.pid

    def close_clients(self):
        for c in self.clients:
            c.close()
        self.clients = []
        # idle keep-alive connections of the REST session, too: chatd gives them a grace
        # period on shutdown, which would only slow the suite down
        self.session.close()

    def stop(self, close_clients=True):
        """SIGTERM and wait; returns the exit code (asserted to be 0 by callers)."""
        if close_clients:
            self.close_clients()
        p = self.proc.p
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            self.proc.wait(5)
            pytest.fail(f"chatd did not exit within {STOP_TIMEOUT}s of SIGTERM\n--- log ---\n{self.log}")
        return rc

    def stop_ok(self, close_clients=True):
        rc = self.stop(close_clients)
        assert rc == 0, f"chatd exited with {rc} after SIGTERM\n--- log ---\n{self.log}"

    def restart(self):
        self.stop_ok()
        self.start()

    def start(self):
        """Start again on the same store after stop() or kill9()."""
        assert self.proc.p.poll() is not None, "chatd is still running"
        self.logs.append(self.proc.output)
        self._start()

    def kill9(self):
        self.close_clients()
        self.proc.p.kill()
        self.proc.wait(5)
        self.killed = True

    def kill9_then_restart(self):
        self.kill9()
        self.start()

    @property
    def log(self):
        return "".join(self.logs) + (self.proc.output if self.proc else "")

    # ---- addresses and credentials ----
    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, chat, token=None, user=None, suffix=""):
        if token is None and user is not None:
            token = self.token(user)
        url = f"ws://127.0.0.1:{self.port}/ws/chat/{chat}{suffix}"
        if token is not None:
            url += f"?token={token}"
        return url

    def token(self, user, chats=None, ttl=3600):
        return mint_token(self.secret, user, chats=chats, ttl=ttl)

    def auth(self, user, chats=None):
        return {"Authorization": f"Bearer {self.token(user, chats=chats)}"}

    # ---- clients (closed before the server is stopped) ----
    def client(self, chat, user, chats=None, **kw):
        c = Client(self.ws_url(chat, token=self.token(user, chats=chats)), user=user, **kw)
        self.clients.append(c)
        return c

    def raw(self, chat, user=None, path=None, headers=None, **kw):
        if path is None:
            path = f"/ws/chat/{chat}?token={self.token(user)}"
        r = RawWS(self.port, path, headers=headers, **kw)
        self.clients.append(r)
        return r

    # ---- REST ----
    def get(self, path, user=None, **kw):
        headers = kw.pop("headers", {})
        if user is not None:
            headers.update(self.auth(user))
        return self.session.get(self.base_url + path, headers=headers, timeout=10, **kw)

    def post(self, path, user=None, **kw):
        headers = kw.pop("headers", {})
        if user is not None:
            headers.update(self.auth(user))
        return self.session.post(self.base_url + path, headers=headers, timeout=10, **kw)

    def history(self, chat, user="reader", **params):
        r = self.get(f"/api/chats/{chat}/messages", user=user, params=params)
        assert r.status_code == 200, (r.status_code, r.text)
        return r.json()

    def all_history(self, chat, user="reader"):
        """Every message of the chat, newest first, walking the pages."""
        out, before = [], None
        for _ in range(10000):
            params = {"limit": 200}
            if before is not None:
                params["before"] = before
            page = self.history(chat, user=user, **params)
            out.extend(page["messages"])
            before = page["next_before"]
            if before is None:
                return out
        raise AssertionError("history paging does not end")

    def metrics_text(self):
        r = self.session.get(self.base_url + "/metrics", timeout=10)
        assert r.status_code == 200, r.text
        return r.text

    def rss_kb(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def chatd(tmp_path, request):
    """Factory: chatd(*extra_args, secret=None, env=None) -> a running Chatd."""
    servers = []

    def start(*args, secret=None, env=None, store=None, subdir=None):
        d = tmp_path / (subdir or f"srv{len(servers)}")
        d.mkdir(exist_ok=True)
        s = Chatd(d, args=args, secret=secret, env=env, store=store)
        servers.append(s)
        return s

    yield start

    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    errors = []
    for s in servers:
        if not s.killed:
            rc = s.stop()
            if rc != 0:
                errors.append(f"chatd exited with {rc} after SIGTERM at teardown\n--- log ---\n{s.log[-20000:]}")
        if s.owned_store:
            import cassandra_support  # noqa: E402

            cassandra_support.drop_store(s.owned_store)
    if failed:
        for s in servers:
            print(f"--- chatd log (port {s.port}) ---\n{s.log[-20000:]}")
    if errors:
        pytest.fail("\n".join(errors))


@pytest.fixture
def server(chatd):
    """A chatd with default options."""
    return chatd()
