"""`chatctl migrate` (what `make create-models` runs) creates the keyspace with the
replication asked for and its tables, idempotently, and chatd refuses a keyspace that
was never migrated with a message that says what to do."""

import os
import subprocess

import cassandra_support as cs

from conftest import REPO, Chatd, clean_env

TABLES = ["chat_buckets", "message_client_ids", "messages_by_chat", "outbox", "outbox_depth",
          "outbox_done", "outbox_lease", "read_positions"]


def keyspace_row(session, ks):
    return session.execute(
        "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = %s", (ks,)).one()


def tables(session, ks):
    return sorted(r.table_name for r in session.execute(
        "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", (ks,)))


def drop(session, ks):
    session.execute(f"DROP KEYSPACE IF EXISTS {ks}")


def test_simple_strategy_idempotent(cassandra_port, driver_session):
    ks = f"mig_simple_{os.getpid()}"
    url = f"cassandra://127.0.0.1:{cassandra_port}/{ks}?replication=simple:1"
    try:
        for _ in range(2):  # the second run changes nothing and succeeds
            p = cs.migrate(url)
            assert p.returncode == 0, p.stdout
            assert f"schema up to date: {url}" in p.stdout
        rep = keyspace_row(driver_session, ks).replication
        assert rep["class"] == "org.apache.cassandra.locator.SimpleStrategy"
        assert rep["replication_factor"] == "1"
        assert tables(driver_session, ks) == TABLES
    finally:
        drop(driver_session, ks)


def test_network_topology_strategy(cassandra_port, driver_session):
    ks = f"mig_nts_{os.getpid()}"
    # SimpleSnitch puts the node in datacenter1; a second DC may be named before it exists
    url = f"cassandra://127.0.0.1:{cassandra_port}/{ks}?replication=nts:datacenter1=1,dc2=0"
    try:
        p = cs.migrate(url)
        assert p.returncode == 0, p.stdout
        rep = keyspace_row(driver_session, ks).replication
        assert rep["class"] == "org.apache.cassandra.locator.NetworkTopologyStrategy"
        assert rep["datacenter1"] == "1"
        assert tables(driver_session, ks) == TABLES
    finally:
        drop(driver_session, ks)


def test_create_models_reads_chat_store(cassandra_port, driver_session):
    """`make create-models` runs `chatctl migrate` with CHAT_STORE from the environment."""
    ks = f"mig_env_{os.getpid()}"
    url = f"cassandra://127.0.0.1:{cassandra_port}/{ks}"
    try:
        p = subprocess.run([cs.chatctl_bin(), "migrate"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60,
                           env=clean_env({"CHAT_STORE": url}))
        assert p.returncode == 0, p.stdout
        assert tables(driver_session, ks) == TABLES
        # the default replication: SimpleStrategy, one replica
        assert keyspace_row(driver_session, ks).replication["replication_factor"] == "1"
    finally:
        drop(driver_session, ks)


def test_bad_replication_and_unreachable(cassandra_port):
    p = cs.migrate(f"cassandra://127.0.0.1:{cassandra_port}/x?replication=simple:zero")
    assert p.returncode != 0
    assert 'bad value "simple:zero" for replication' in p.stdout
    p = cs.migrate("cassandra://127.0.0.1:1/x")
    assert p.returncode != 0
    assert "cannot connect to Cassandra" in p.stdout and "connection refused" in p.stdout


def test_chatd_refuses_an_unmigrated_keyspace(cassandra_port):
    s = Chatd(f"cassandra://127.0.0.1:{cassandra_port}/never_migrated", expect_start=False)
    rc = s.wait_exit(20)
    assert rc != 0
    assert "has no table messages_by_chat" in s.log
    assert "chatctl migrate" in s.log
    assert REPO.exists()
