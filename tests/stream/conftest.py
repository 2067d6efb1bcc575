"""Fixtures for the Kafka source tests: one real Kafka (scripts/kafka) for the whole suite,
on a free loopback port in a temporary directory, and the real chatd of the functional suite.

The one idea: reuse, not copy. chatd is started by the functional suite's Chatd class and
fixture, Kafka by the components suite's Component class (both loaded from their files), so
these tests start both exactly as the other suites do. Kafka is started once (about 20 s)
and stopped and started again only by the tests that need an outage; every test uses a topic
of its own, created by `chatctl migrate`, the way an operator would. The contract tests run
on both stores (the `store` fixture): SQLite, and the shared Cassandra node of
tests/cassandra_support.py (the Makefile's, or one it starts), a fresh keyspace per chatd.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
sys.path.insert(0, str(TESTS / "functional"))
sys.path.insert(0, str(TESTS))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


functional = _load("functional_conftest", TESTS / "functional" / "conftest.py")
components = _load("components_conftest", TESTS / "components" / "conftest.py")

# the functional suite's chatd factory and its report hook (teardown prints logs on failure)
chatd = functional.chatd
pytest_runtest_makereport = functional.pytest_runtest_makereport
CHATCTL = functional.CHATCTL
clean_env = functional.clean_env


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    node = components.Component("kafka", tmp_path_factory.mktemp("kafka"))
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture(params=["sqlite", "cassandra"])
def store(request):
    """A factory of --store URLs: None (chatd's own SQLite file) or a fresh keyspace of the
    shared Cassandra, given back after the test. Name it before `chatd` in a test's
    arguments, so that the servers stop before their keyspaces are recycled."""
    if request.param == "sqlite":
        yield lambda: None
        return
    import cassandra_support

    urls = []

    def new():
        urls.append(cassandra_support.new_store_url(outbox=True))
        return urls[-1]

    yield new
    for u in urls:
        cassandra_support.drop_store(u)
