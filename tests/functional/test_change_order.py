"""Changes to one message sent back to back apply in the order they were sent.

A member sees the edits and the delete in send order, so the stored message must end as the
last of them says: the history and the live view may never disagree (on Cassandra each change
is a lightweight transaction; two in flight at once could apply in either order).
"""


def test_back_to_back_edits_end_with_the_last(server):
    alice = server.client("general", "alice")
    bob = server.client("general", "bob")
    ack = alice.say("v0")
    bob.recv()
    mid = ack["message_id"]
    n = 30
    for i in range(1, n + 1):
        alice.send({"event": "message:edit", "message": f"v{i}", "message_id": mid})
    for c in (alice, bob):
        seen = [c.recv(timeout=20)["message"] for _ in range(n)]
        assert seen == [f"v{i}" for i in range(1, n + 1)]
    hist = server.history("general")["messages"]
    assert [m["message"] for m in hist] == [f"v{n}"]


def test_edit_then_delete_back_to_back_both_apply(server):
    alice = server.client("general", "alice")
    for round_ in range(10):
        ack = alice.say(f"doomed {round_}")
        mid = ack["message_id"]
        alice.send({"event": "message:edit", "message": f"edited {round_}", "message_id": mid})
        alice.send({"event": "message:delete", "message_id": mid})
        edit = alice.recv(timeout=20)
        assert edit["event"] == "message:edit", edit
        assert edit["message"] == f"edited {round_}"
        gone = alice.recv(timeout=20)
        assert gone["event"] == "message:delete", gone
        assert gone["message_id"] == mid
    hist = server.history("general")["messages"]
    assert len(hist) == 10 and all(m["deleted"] for m in hist)
    assert all("message" not in m or not m["message"] for m in hist)
