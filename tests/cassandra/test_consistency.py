"""The consistency level is configuration, and Cassandra's refusals reach the logs as
readable errors: on a one-node cluster, THREE cannot be met, so a send fails with
store_unavailable and the log names the Unavailable error; ALL and ONE work. Durable
before delivery: a write that Cassandra did not acknowledge is never delivered."""

from conftest import keyspace_of


def test_consistency_all_and_one_work(store_url, chatd_factory):
    for cl in ("all", "one", "local_one", "quorum"):
        srv = chatd_factory(store_url + f"?consistency={cl}")
        assert f"consistency={cl.upper()}" in srv.log
        ack = srv.client("cl", "alice").say(f"at {cl}")
        assert ack["message"] == f"at {cl}"
        srv.stop()


def test_unmet_consistency_is_a_clear_error(store_url, chatd_factory, driver_session):
    srv = chatd_factory(store_url + "?consistency=three")
    alice = srv.client("cl3", "alice")
    bob = srv.client("cl3", "bob")
    alice.send({"event": "message:message", "message": "needs three replicas", "client_id": "x"})
    ev = alice.wait_for(lambda e: e.get("event") in ("error", "message:message"), timeout=15)
    assert ev["event"] == "error" and ev["code"] == "store_unavailable", ev
    bob.expect_quiet(0.5)  # not delivered: it was not stored
    assert "Unavailable (0x1000)" in srv.log
    assert "consistency=THREE required=3 alive=1" in srv.log
    r = srv.post("/api/chats/cl3/messages", "alice", {"message": "rest too"})
    assert r.status_code == 503
    ks = keyspace_of(store_url)
    assert driver_session.execute(
        f"SELECT count(*) FROM {ks}.messages_by_chat WHERE chat_id = 'cl3' ALLOW FILTERING"
    ).one()[0] == 0
