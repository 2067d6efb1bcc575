"""Durable before delivery: what was acknowledged survives a clean restart, a kill -9, and
SIGTERM closes members with 1001."""

from helpers import OP_CLOSE


def test_history_intact_after_clean_restart(server):
    alice = server.client("general", "alice")
    acks = [alice.say(f"before restart {i}", client_id=f"r{i}") for i in range(30)]
    alice.send({"event": "message:edit", "message": "edited", "message_id": acks[3]["message_id"]})
    assert alice.recv()["event"] == "message:edit"
    alice.send({"event": "message:delete", "message_id": acks[4]["message_id"]})
    assert alice.recv()["event"] == "message:delete"
    before = server.all_history("general")
    other = server.all_history("elsewhere")

    server.restart()

    after = server.all_history("general")
    assert after == before
    assert len(after) == 30
    by_id = {m["message_id"]: m for m in after}
    assert by_id[acks[3]["message_id"]]["message"] == "edited"
    assert by_id[acks[4]["message_id"]]["deleted"] is True
    assert "message" not in by_id[acks[4]["message_id"]]
    assert server.all_history("elsewhere") == other

    # new ids keep increasing after a restart
    alice = server.client("general", "alice")
    new = alice.say("after restart")
    assert int(new["message_id"]) > max(int(a["message_id"]) for a in acks)
    assert len(server.all_history("general")) == 31


def test_acked_messages_survive_kill_9(server):
    alice = server.client("general", "alice")
    acks = [alice.say(f"durable {i}", client_id=f"k{i}") for i in range(200)]
    server.kill9()  # right after the last ack

    server.start()
    hist = server.all_history("general")
    assert len(hist) == 200
    assert [m["message_id"] for m in hist] == [a["message_id"] for a in reversed(acks)]
    assert [m["message"] for m in hist] == [f"durable {i}" for i in range(199, -1, -1)]
    assert all(m["user_from"] == "alice" and m["deleted"] is False for m in hist)


def test_acked_rest_posts_survive_kill_9(server):
    ids = []
    for i in range(50):
        r = server.post("/api/chats/general/messages", user="bot", json={"message": f"p{i}"})
        assert r.status_code == 201, r.text
        ids.append(r.json()["message_id"])
    server.kill9()
    server.start()
    assert [m["message_id"] for m in server.all_history("general")] == ids[::-1]


def test_edits_and_deletes_survive_kill_9(server):
    alice = server.client("general", "alice")
    a = alice.say("to edit")
    b = alice.say("to delete")
    alice.send({"event": "message:edit", "message": "edited!", "message_id": a["message_id"]})
    assert alice.recv()["event"] == "message:edit"
    alice.send({"event": "message:delete", "message_id": b["message_id"]})
    assert alice.recv()["event"] == "message:delete"
    server.kill9()
    server.start()
    hist = {m["message_id"]: m for m in server.all_history("general")}
    assert hist[a["message_id"]]["message"] == "edited!" and "edited_at" in hist[a["message_id"]]
    assert hist[b["message_id"]]["deleted"] is True and "message" not in hist[b["message_id"]]


def test_sigterm_closes_members_1001_and_exits_0(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    raw = server.raw("other", "carol")
    acks = [alice.say(f"before sigterm {i}") for i in range(10)]
    for _ in acks:
        bob.recv()
    raw_ack = raw.ack_after("carol's")

    rc = server.stop(close_clients=False)
    assert rc == 0, f"exit code {rc}\n{server.log}"

    for c in (alice, bob):
        code, _ = c.expect_close()
        assert code == 1001
    f = raw.recv_frame()
    while f.opcode != OP_CLOSE:
        f = raw.recv_frame()
    assert f.close_code()[0] == 1001
    for c in (alice, bob, raw):
        c.close()

    server.start()
    assert [m["message_id"] for m in server.all_history("general")] == [
        a["message_id"] for a in reversed(acks)]
    assert [m["message_id"] for m in server.all_history("other")] == [raw_ack["message_id"]]


def test_sigterm_with_no_clients_exits_0(server):
    server.stop_ok()


def test_sigint_exits_0(server):
    import signal
    alice = server.client("general", "alice")
    alice.say("x")
    server.proc.p.send_signal(signal.SIGINT)
    assert server.proc.wait(5) == 0
    code, _ = alice.expect_close()
    assert code == 1001
