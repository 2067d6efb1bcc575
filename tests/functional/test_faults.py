"""Faults an operator meets at start and while running: the port taken by another process, a
database that cannot be written (an immutable file, `chattr +i`), and a store that fails for
a while and comes back.

The one idea: each fault is made real (a socket holding the port, the kernel refusing writes
to the database or its WAL: root bypasses file modes but not the immutable flag), and the
test checks what an operator checks: the exit code and the message, /healthz, and that a
message sent after the fault is repaired is stored.
"""

import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CHATCTL, LISTEN_RE, REPO, Proc, clean_env, require_binary

ASAN_CHATD = REPO / "build" / "asan" / "chatd"
SANITIZER_REPORT = re.compile(r"AddressSanitizer|LeakSanitizer|runtime error:|Assertion")


def chattr(flag, *paths):
    subprocess.run(["chattr", flag, *[str(p) for p in paths]], check=True)


@pytest.fixture
def immutable():
    """chattr +i on paths; the flag is always taken off again (else pytest cannot clean up)."""
    marked = []

    def mark(*paths):
        for p in paths:
            chattr("+i", p)
            marked.append(p)

    def unmark():
        while marked:
            p = marked.pop()
            if Path(p).exists():
                chattr("-i", p)

    mark.undo = unmark
    yield mark
    unmark()


# ---- the port ------------------------------------------------------------------------------


def test_port_in_use_exits_with_a_clear_error_and_no_memory_error(tmp_path):
    """The sanitizer build: after the failed listen nothing may touch freed memory (the free
    fill turns libuv's read of a freed listener into a crash, as libuv is not instrumented)
    and nothing may leak (the web files were loaded before the listen)."""
    subprocess.run(["make", "-s", str(ASAN_CHATD.relative_to(REPO))], cwd=REPO, check=True,
                   capture_output=True)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        env = clean_env({
            "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1:max_free_fill_size=1048576",
            "UBSAN_OPTIONS": "print_stacktrace=1",
        })
        r = subprocess.run(
            [str(ASAN_CHATD), "--host", "127.0.0.1", "--port", str(port), "--jwt-secret", "s",
             "--store", f"sqlite:{tmp_path}/chat.db", "--web-root", str(REPO / "web")],
            capture_output=True, text=True, timeout=60, env=env, cwd=str(REPO))
    finally:
        holder.close()
    out = r.stdout + r.stderr
    assert r.returncode == 1, f"exit code {r.returncode}\n{out}"
    assert "address already in use" in out, out
    assert "cannot start" in out, out
    assert not SANITIZER_REPORT.search(out), out


# ---- a database that cannot be written -----------------------------------------------------


def make_db(tmp_path):
    """A migrated database, closed (no WAL left beside it)."""
    require_binary(CHATCTL)
    db = tmp_path / "chat.db"
    r = subprocess.run([str(CHATCTL), "migrate", "--store", f"sqlite:{db}"], capture_output=True,
                       text=True, timeout=30, env=clean_env(), cwd=str(REPO))
    assert r.returncode == 0, r.stdout + r.stderr
    assert db.exists() and not Path(f"{db}-wal").exists()
    return db


def start_chatd(db, extra=()):
    from conftest import CHATD

    require_binary(CHATD)
    return Proc([CHATD, "--port", "0", "--host", "127.0.0.1", "--store", f"sqlite:{db}",
                 "--jwt-secret", "s", *extra])


def exit_code(proc):
    """The exit code of a chatd expected to refuse to start; fails the test if it listens."""
    if proc.wait_output(LISTEN_RE, 20):
        proc.p.kill()
        proc.wait(5)
        pytest.fail("chatd started on a database it cannot write\n" + proc.output)
    return proc.wait(10)


def test_read_only_database_refuses_to_start(tmp_path, immutable):
    db = make_db(tmp_path)
    immutable(db)
    proc = start_chatd(db)
    rc = exit_code(proc)
    out = proc.output
    assert rc != 0, out
    assert LISTEN_RE.search(out) is None, out
    assert "cannot start" in out and "not writable" in out and str(db) in out, out
    assert not SANITIZER_REPORT.search(out), out


def test_database_that_cannot_be_created_refuses_to_start(tmp_path, immutable):
    """The directory is immutable: the database (or its WAL) cannot be created there."""
    d = tmp_path / "ro"
    d.mkdir()
    immutable(d)
    proc = start_chatd(d / "chat.db")
    rc = exit_code(proc)
    out = proc.output
    assert rc != 0 and "cannot start" in out and str(d / "chat.db") in out, out


def post(server, text):
    return server.post("/api/chats/ops/messages", user="alice", json={"message": text})


def health(server):
    r = server.get("/healthz")
    return r.status_code, r.json()


def test_healthz_reports_a_failing_store_and_its_recovery(chatd, tmp_path, immutable):
    """The WAL becomes immutable while chatd runs: sends fail, /healthz says 503 and names the
    store; once the flag is gone chatd writes again without a restart, /healthz says ok, and
    what is sent then is stored. (SQLite whatever CHAT_TEST_STORE says: the fault is its.)"""
    server = chatd(store=f"sqlite:{tmp_path}/chat.db")
    assert post(server, "before").status_code == 201
    assert health(server) == (200, {"status": "ok"})

    wal = tmp_path / "chat.db-wal"
    assert wal.exists()
    immutable(wal)
    r = post(server, "during")
    assert r.status_code == 503 and r.json()["error"] == "store_unavailable", r.text
    status, body = health(server)
    assert status == 503, body
    assert body["status"] == "unavailable" and body["error"] == "store_unavailable", body
    assert "sqlite" in body["detail"] and body["detail"], body
    # still failing a while later: the state is the store's, not the last request's
    time.sleep(1.5)
    assert health(server)[0] == 503

    immutable.undo()
    deadline = time.monotonic() + 15
    while health(server) != (200, {"status": "ok"}):
        assert time.monotonic() < deadline, f"/healthz still {health(server)}\n{server.log}"
        time.sleep(0.2)
    assert post(server, "after").status_code == 201
    texts = [m["message"] for m in server.all_history("ops")]
    assert texts == ["after", "before"], texts
