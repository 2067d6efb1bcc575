"""The command lines: chatd --dev/--help/env configuration, chatctl token and migrate, and
`make run` as a new user runs it."""

import os
import re
import shlex
import signal
import socket
import subprocess
import time

import pytest
import requests

from conftest import CHATCTL, CHATD, LISTEN_RE, REPO, Proc, clean_env, require_binary
from helpers import Client, HttpConn, build_frame, mint_token, upgrade_headers, verify_jwt


def run(argv, env=None, timeout=20):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(env), cwd=str(REPO))


def stop(proc):
    if proc.p.poll() is None:
        proc.p.terminate()
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.p.kill()
        proc.wait(5)
        pytest.fail("did not exit within 5s of SIGTERM\n" + proc.output)


def started(proc):
    m = proc.wait_output(LISTEN_RE, 10)
    if not m:
        stop(proc)
        pytest.fail("chatd did not start\n" + proc.output)
    return int(m.group(1))


def handshake_status(port, token, chat="general"):
    c = HttpConn(port)
    try:
        return c.request("GET", f"/ws/chat/{chat}?token={token}", upgrade_headers()).status
    finally:
        c.close()


# ---- chatd --dev and configuration --------------------------------------------------------


def test_dev_mode_prints_secret_and_working_token_command(tmp_path):
    require_binary(CHATD)
    require_binary(CHATCTL)
    proc = Proc([CHATD, "--dev", "--port", "0", "--host", "127.0.0.1",
                 "--store", f"sqlite:{tmp_path}/dev.db"])
    try:
        port = started(proc)
        out = proc.output
        m = re.search(r"(\S*chatctl token[^\n]*)", out)
        assert m, f"no chatctl token command in the output:\n{out}"
        argv = shlex.split(m.group(1).strip().strip("`'\""))
        assert "--secret" in argv, argv
        secret = argv[argv.index("--secret") + 1]
        assert secret in out.replace(m.group(1), ""), "the secret itself is not printed"
        if "--user" in argv:
            argv[argv.index("--user") + 1] = "devuser"
        else:
            argv += ["--user", "devuser"]
        exe = argv[0]
        if not exe.startswith("/"):
            exe = str(REPO / exe)
        res = run([exe] + argv[1:])
        assert res.returncode == 0, res.stderr
        token = res.stdout.strip()
        _, payload = verify_jwt(token, secret)
        assert payload["sub"] == "devuser"

        c = Client(f"ws://127.0.0.1:{port}/ws/chat/general?token={token}", user="devuser")
        ack = c.say("dev hello")
        assert ack["user_from"] == "devuser"
        c.close()
        assert handshake_status(port, mint_token("not-the-secret", "devuser")) == 401
    finally:
        rc = stop(proc)
    assert rc == 0, proc.output


def test_no_secret_and_no_dev_exits_2(tmp_path):
    require_binary(CHATD)
    proc = Proc([CHATD, "--port", "0", "--host", "127.0.0.1", "--store", f"sqlite:{tmp_path}/x.db"])
    try:
        rc = proc.wait(10)
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail("chatd started without a secret:\n" + proc.output)
    assert rc == 2, proc.output
    assert proc.output.strip(), "no message explaining why"
    assert "listening" not in proc.output


def test_configuration_from_environment(tmp_path):
    require_binary(CHATD)
    env = {"CHAT_PORT": "0", "CHAT_HOST": "127.0.0.1", "CHAT_STORE": f"sqlite:{tmp_path}/env.db",
           "CHAT_JWT_SECRET": "env-secret-123", "CHAT_MAX_MESSAGE_BYTES": "1024"}
    proc = Proc([CHATD], env=env)
    try:
        port = started(proc)
        assert handshake_status(port, mint_token("env-secret-123", "alice")) == 101
        assert handshake_status(port, mint_token("other", "alice")) == 401
        # CHAT_MAX_MESSAGE_BYTES applies
        c = HttpConn(port)
        assert c.request("GET", f"/ws/chat/g?token={mint_token('env-secret-123', 'a')}",
                         upgrade_headers()).status == 101
        c.send(build_frame(0x1, b"x" * 2000))
        hdr = c.read_exact(2, time.monotonic() + 5)
        assert hdr[0] == 0x88, hdr
        code = c.read_exact(hdr[1] & 0x7F, time.monotonic() + 5)[:2]
        assert int.from_bytes(code, "big") == 1009
        c.close()
    finally:
        rc = stop(proc)
    assert rc == 0, proc.output
    assert (tmp_path / "env.db").exists()


def test_flags_win_over_environment(tmp_path):
    require_binary(CHATD)
    env = {"CHAT_PORT": "1", "CHAT_JWT_SECRET": "env-secret", "CHAT_STORE": "sqlite:/nonexistent/x.db"}
    proc = Proc([CHATD, "--port", "0", "--host", "127.0.0.1", "--store", f"sqlite:{tmp_path}/f.db",
                 "--jwt-secret", "flag-secret"], env=env)
    try:
        port = started(proc)
        assert port != 1
        assert handshake_status(port, mint_token("flag-secret", "alice")) == 101
        assert handshake_status(port, mint_token("env-secret", "alice")) == 401
    finally:
        rc = stop(proc)
    assert rc == 0, proc.output


def test_help_lists_every_option_with_defaults():
    require_binary(CHATD)
    res = run([CHATD, "--help"])
    assert res.returncode == 0, res.stderr
    text = res.stdout + res.stderr
    for opt in ["--port", "--host", "--store", "--jwt-secret", "--dev", "--max-message-bytes",
                "--max-outbound-bytes", "--idle-timeout", "--node-id", "--web-root", "--log-level"]:
        assert opt in text, f"{opt} missing from --help:\n{text}"
    for default in ["8000", "0.0.0.0", "sqlite:./data/chat.db", "65536", "4194304", "60"]:
        assert default in text, f"default {default} missing from --help:\n{text}"


def test_unknown_option_fails():
    require_binary(CHATD)
    res = run([CHATD, "--no-such-option"])
    assert res.returncode != 0
    assert (res.stdout + res.stderr).strip()


# ---- chatctl ------------------------------------------------------------------------------


def test_chatctl_token_verifies_independently():
    require_binary(CHATCTL)
    now = int(time.time())
    res = run([CHATCTL, "token", "--user", "alice", "--secret", "s3cret", "--ttl", "120",
               "--chats", "general,random"])
    assert res.returncode == 0, res.stderr
    token = res.stdout.strip()
    assert "\n" not in token
    header, payload = verify_jwt(token, "s3cret")
    assert header["alg"] == "HS256"
    assert payload["sub"] == "alice"
    assert now + 110 <= payload["exp"] <= now + 130, payload
    assert payload["chats"] == ["general", "random"]


def test_chatctl_token_secret_from_env():
    require_binary(CHATCTL)
    res = run([CHATCTL, "token", "--user", "bob"], env={"CHAT_JWT_SECRET": "from-env"})
    assert res.returncode == 0, res.stderr
    _, payload = verify_jwt(res.stdout.strip(), "from-env")
    assert payload["sub"] == "bob"
    assert "chats" not in payload
    assert payload["exp"] > time.time()


def test_chatctl_token_is_accepted_by_chatd(server):
    res = run([CHATCTL, "token", "--user", "carol", "--secret", server.secret])
    assert res.returncode == 0, res.stderr
    c = Client(server.ws_url("general", token=res.stdout.strip()), user="carol")
    server.clients.append(c)
    assert c.say("minted by chatctl")["user_from"] == "carol"


def test_chatctl_token_chats_claim_is_enforced(server):
    res = run([CHATCTL, "token", "--user", "dave", "--secret", server.secret, "--chats", "a,b"])
    assert res.returncode == 0, res.stderr
    tok = res.stdout.strip()
    assert handshake_status(server.port, tok, chat="b") == 101
    assert handshake_status(server.port, tok, chat="c") == 403


def test_chatctl_token_requires_user():
    require_binary(CHATCTL)
    res = run([CHATCTL, "token", "--secret", "x"])
    assert res.returncode != 0


def test_chatctl_migrate_is_idempotent(tmp_path, chatd):
    require_binary(CHATCTL)
    store = f"sqlite:{tmp_path}/x.db"
    for _ in range(2):
        res = run([CHATCTL, "migrate", "--store", store])
        assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "x.db").exists()
    srv = chatd(store=store)
    c = srv.client("general", "alice")
    c.say("on a migrated store")
    srv.stop_ok()
    res = run([CHATCTL, "migrate", "--store", store])
    assert res.returncode == 0, res.stdout + res.stderr
    srv.start()
    assert [m["message"] for m in srv.all_history("general")] == ["on a migrated store"]


# ---- make run: the first run on a fresh machine -------------------------------------------


def make_env(extra=None):
    """The environment of a user at a shell: no CHAT_*, and not inside another make."""
    env = clean_env(extra)
    for k in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"):
        env.pop(k, None)
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_run_installs_dependencies_before_it_builds():
    # -B: every target counts as out of date, so the compiler lines show however fresh build/ is
    r = subprocess.run(["make", "-n", "-B", "run"], capture_output=True, text=True, timeout=60,
                       env=make_env(), cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    deps = [i for i, x in enumerate(lines) if "scripts/deps.sh" in x]
    compiles = [i for i, x in enumerate(lines) if re.search(r"\s-c\s+src/\S+\.c\b", x)]
    assert deps, "make run does not install dependencies:\n" + r.stdout
    assert compiles, "make run does not build:\n" + r.stdout
    assert deps[0] < compiles[0], "dependencies come after the compiler:\n" + r.stdout
    # run installs what building and running need, not the test tools
    assert not re.search(r"scripts/deps\.sh\s*$", lines[deps[0]]), lines[deps[0]]


def test_make_run_serves_the_chat_and_installs_nothing_when_all_is_present(tmp_path):
    port = free_port()
    data = tmp_path / "data"
    log = tmp_path / "make-run.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(["make", "run", f"DATA_DIR={data}"], cwd=str(REPO),
                             env=make_env({"CHAT_PORT": str(port)}), stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # bounded wait for the server (make may have to build first)
        deadline = time.monotonic() + 300
        while not re.search(r"listening.*\bport=%d\b" % port, log.read_text(errors="replace")):
            assert p.poll() is None, "make run ended:\n" + log.read_text(errors="replace")
            assert time.monotonic() < deadline, "make run did not start:\n" + log.read_text()
            time.sleep(0.2)
        s = requests.Session()
        s.trust_env = False
        h = s.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert h.status_code == 200, h.text
        page = s.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.status_code == 200 and "<html" in page.text.lower(), page.text[:200]
        # dev mode, its secret and the store in the data directory given
        assert (data / "dev-secret").stat().st_size > 0
        assert (data / "chat.db").exists()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)  # Ctrl-C at the terminal
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
            pytest.fail("make run did not stop on Ctrl-C:\n" + log.read_text(errors="replace"))
    out = log.read_text(errors="replace")
    assert "dev mode" in out, out
    assert re.search(r"\binfo stopped\b", out), "chatd did not stop cleanly:\n" + out
    assert "deps: installing" not in out, "make run reinstalled what is present:\n" + out
