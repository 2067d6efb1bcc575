"""Fixtures for the search pipeline suite: chatd (Kafka source) -> Kafka -> chat-indexer ->
OpenSearch -> chatd's search API, every part real.

The one idea: reuse, as tests/stream does. chatd comes from the functional suite's fixture,
Kafka and OpenSearch from the components suite's Component class (their project scripts),
each started once for the whole suite; every test has a topic, a consumer group and an index
alias of its own, so tests never see each other's documents.
"""

import importlib.util
import json
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS / "functional"))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


functional = _load("functional_conftest_search", TESTS / "functional" / "conftest.py")
components = _load("components_conftest_search", TESTS / "components" / "conftest.py")

chatd = functional.chatd
pytest_runtest_makereport = functional.pytest_runtest_makereport
CHATCTL = functional.CHATCTL
clean_env = functional.clean_env
# CHAT_INDEXER_BIN: another build to test (e.g. build/asan/chat-indexer)
INDEXER = Path(os.environ.get("CHAT_INDEXER_BIN") or REPO / "build" / "chat-indexer").resolve()


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    node = components.Component("kafka", tmp_path_factory.mktemp("kafka"))
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def opensearch(tmp_path_factory):
    node = components.Component("opensearch", tmp_path_factory.mktemp("opensearch"))
    try:
        node.start()
        yield node
    finally:
        node.stop()


class Engine:
    """OpenSearch through one alias: what the index holds, asked directly."""

    def __init__(self, node, alias):
        self.node = node
        self.alias = alias
        self.base = f"http://127.0.0.1:{node.port}"
        self.s = requests.Session()
        self.s.trust_env = False

    @property
    def url(self):
        return f"opensearch://127.0.0.1:{self.node.port}/{self.alias}"

    def docs(self):
        """{message_id: (version, source)} of every document behind the alias."""
        r = self.s.post(f"{self.base}/{self.alias}/_refresh", params={"ignore_unavailable": "true"},
                        timeout=30)
        if r.status_code == 404:
            return {}
        end = time.monotonic() + 30
        while True:
            r = self.s.post(f"{self.base}/{self.alias}/_search",
                            params={"ignore_unavailable": "true"},
                            json={"size": 10000, "version": True, "query": {"match_all": {}}},
                            timeout=30)
            # 503: a month's index just created, its shard not started yet
            if r.status_code != 503 or time.monotonic() > end:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text
        hits = r.json()["hits"]["hits"]
        out = {}
        for h in hits:
            assert h["_id"] not in out, f"document {h['_id']} twice (in {h['_index']})"
            out[h["_id"]] = (h["_version"], h["_source"])
        return out


class Indexer:
    """One build/chat-indexer process."""

    def __init__(self, kafka, engine, topic, group, *extra):
        functional.require_binary(INDEXER)
        self.metrics_port = components.free_port()
        self.argv = [INDEXER, "--kafka", f"127.0.0.1:{kafka.port}", "--search", engine.url,
                     "--topic", topic, "--group", group, "--replicas", "0",
                     "--metrics-port", str(self.metrics_port), "--linger-ms", "20", *extra]
        self.logs = []
        self.proc = None
        self.start()

    def start(self):
        if self.proc:
            self.logs.append(self.proc.output)
        self.proc = functional.Proc(self.argv)
        if not self.proc.wait_output(re.compile(r"indexer_started"), 90):
            raise AssertionError(f"chat-indexer did not start:\n{self.proc.output}")

    def kill9(self):
        self.proc.p.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc.p.poll() is not None:
            return self.proc.p.returncode
        self.proc.p.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    @property
    def log(self):
        return "".join(self.logs) + (self.proc.output if self.proc else "")

    def metrics(self):
        r = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30)
        assert r.status_code == 200
        out = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def metric(self, name):
        return self.metrics().get(name, 0)

    def lag(self):
        return sum(v for k, v in self.metrics().items() if k.startswith("chat_indexer_consumer_lag{"))


@pytest.fixture
def pipeline(kafka, opensearch, chatd, tmp_path, request):
    """Factory: a fresh topic (made by chatctl migrate), alias and group; returns an object
    with .engine, .topic, .brokers, .chatd(*args) and .indexer(*args)."""
    indexers = []

    class P:
        pass

    p = P()
    tag = uuid.uuid4().hex[:10]
    p.topic = f"chat.events.s{tag}"
    p.group = f"indexer-{tag}"
    p.brokers = f"127.0.0.1:{kafka.port}"
    p.engine = Engine(opensearch, f"chat-s{tag}")
    import subprocess
    r = subprocess.run([str(CHATCTL), "migrate", "--store", f"sqlite:{tmp_path}/migrate.db",
                        "--kafka", p.brokers, "--kafka-topic", p.topic],
                       capture_output=True, text=True, timeout=120, env=clean_env())
    assert r.returncode == 0, r.stdout + r.stderr

    def start_chatd(*args):
        return chatd("--kafka", p.brokers, "--kafka-topic", p.topic, "--search", p.engine.url,
                     *args)

    def start_indexer(*args):
        ix = Indexer(kafka, p.engine, p.topic, p.group, *args)
        indexers.append(ix)
        return ix

    p.chatd = start_chatd
    p.indexer = start_indexer
    yield p
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for ix in indexers:
        rc = ix.stop()
        if failed:
            print(f"--- chat-indexer log ---\n{ix.log[-20000:]}")
        elif rc not in (0, -9):
            pytest.fail(f"chat-indexer exited {rc} on SIGTERM\n{ix.log[-5000:]}")


def wait_until(pred, timeout=60, what="condition"):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.2)


def dumps(x):
    return json.dumps(x, ensure_ascii=False, sort_keys=True)
