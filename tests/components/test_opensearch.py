"""The OpenSearch that scripts/opensearch starts does what the search pipeline will ask of
it: an index template with an accent-folding analyzer (so "cafe" finds "café"), an alias
to search through, _bulk writes with external versions (a replayed older write never
overwrites a newer one), match queries, and a stop that really ends the node.

Client: plain HTTP (requests), as the C indexer and the search API will speak to it.
"""

import json

import pytest
import requests

from conftest import assert_stops

TEMPLATE = {
    "index_patterns": ["chat-messages-*"],
    "template": {
        "settings": {
            "number_of_shards": 1,
            "number_of_replicas": 0,
            "analysis": {
                "analyzer": {
                    "folding": {
                        "type": "custom",
                        "tokenizer": "standard",
                        "filter": ["lowercase", "asciifolding"],
                    }
                }
            },
        },
        "mappings": {
            "properties": {
                "chat_id": {"type": "keyword"},
                "text": {"type": "text", "analyzer": "folding"},
                "created_at": {"type": "date", "format": "epoch_millis"},
            }
        },
        "aliases": {"chat-messages": {}},
    },
}


class OS:
    """A requests session on the node's HTTP port; every call returns (status, json)."""

    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"
        self.s = requests.Session()
        self.s.trust_env = False

    def call(self, method, path, body=None, data=None, **params):
        headers = {"Content-Type": "application/x-ndjson"} if data is not None else {}
        r = self.s.request(method, self.base + path, json=body, data=data, params=params,
                           headers=headers, timeout=30)
        return r.status_code, r.json()


def bulk_lines(actions):
    """The NDJSON body of a _bulk request: (action, doc-or-None) pairs."""
    out = []
    for action, doc in actions:
        out.append(json.dumps(action))
        if doc is not None:
            out.append(json.dumps(doc))
    return ("\n".join(out) + "\n").encode()


def index_action(index, doc_id, version, doc):
    return ({"index": {"_index": index, "_id": doc_id, "version": version,
                       "version_type": "external"}}, doc)


def search(os_, index, text):
    status, body = os_.call("POST", f"/{index}/_search",
                            {"query": {"match": {"text": text}}, "size": 50})
    assert status == 200, body
    return sorted(h["_id"] for h in body["hits"]["hits"])


@pytest.fixture(scope="module")
def node(opensearch):
    os_ = OS(opensearch.port)
    status, body = os_.call("PUT", "/_index_template/chat-messages", TEMPLATE)
    assert status == 200 and body["acknowledged"], body
    status, body = os_.call("PUT", "/chat-messages-000001")
    assert status == 200, body
    return os_


def test_cluster_health_is_green_or_yellow(node):
    status, body = node.call("GET", "/_cluster/health")
    assert status == 200
    assert body["status"] in ("green", "yellow")
    assert body["number_of_nodes"] == 1


def test_template_gives_the_index_its_analyzer_and_alias(node):
    status, body = node.call("GET", "/chat-messages-000001")
    assert status == 200, body
    idx = body["chat-messages-000001"]
    assert idx["settings"]["index"]["analysis"]["analyzer"]["folding"]["filter"] == \
        ["lowercase", "asciifolding"]
    assert "chat-messages" in idx["aliases"]
    status, body = node.call("POST", "/chat-messages-000001/_analyze",
                             {"analyzer": "folding", "text": "Café CRÈME brûlée"})
    assert status == 200, body
    assert [t["token"] for t in body["tokens"]] == ["cafe", "creme", "brulee"]


def test_bulk_with_external_versions_and_folded_search_through_the_alias(node):
    index = "chat-messages-000001"
    docs = [
        index_action(index, "m1", 10, {"chat_id": "c1", "text": "On se voit au café ?",
                                       "created_at": 1700000000000}),
        index_action(index, "m2", 11, {"chat_id": "c1", "text": "Cafe society tonight",
                                       "created_at": 1700000001000}),
        index_action(index, "m3", 12, {"chat_id": "c2", "text": "tea, not coffee",
                                       "created_at": 1700000002000}),
    ]
    status, body = node.call("POST", "/_bulk", data=bulk_lines(docs), refresh="wait_for")
    assert status == 200, body
    assert not body["errors"], body
    assert [i["index"]["_version"] for i in body["items"]] == [10, 11, 12]

    # "cafe" finds "café" and "Cafe", through the alias as through the index
    assert search(node, "chat-messages", "cafe") == ["m1", "m2"]
    assert search(node, index, "CAFÉ") == ["m1", "m2"]
    assert search(node, "chat-messages", "coffee") == ["m3"]


def test_a_replayed_older_write_does_not_overwrite(node):
    index = "chat-messages-000001"
    edit = [index_action(index, "e1", 7, {"chat_id": "c3", "text": "edited: crème brûlée",
                                          "created_at": 1700000003000})]
    status, body = node.call("POST", "/_bulk", data=bulk_lines(edit), refresh="wait_for")
    assert status == 200 and not body["errors"], body

    # the indexer replays the original (version 5) and a duplicate of the edit (version 7)
    replay = [
        index_action(index, "e1", 5, {"chat_id": "c3", "text": "original: creme caramel",
                                      "created_at": 1700000003000}),
        index_action(index, "e1", 7, {"chat_id": "c3", "text": "duplicate of the edit",
                                      "created_at": 1700000003000}),
    ]
    status, body = node.call("POST", "/_bulk", data=bulk_lines(replay), refresh="wait_for")
    assert status == 200, body
    assert body["errors"] is True
    for item in body["items"]:
        assert item["index"]["status"] == 409, item
        assert item["index"]["error"]["type"] == "version_conflict_engine_exception", item

    status, doc = node.call("GET", f"/{index}/_doc/e1")
    assert status == 200
    assert doc["_version"] == 7
    assert doc["_source"]["text"] == "edited: crème brûlée"
    assert search(node, "chat-messages", "creme brulee") == ["e1"]
    assert search(node, "chat-messages", "caramel") == []

    # a newer version does win
    newer = [index_action(index, "e1", 9, {"chat_id": "c3", "text": "edited again: caramel",
                                           "created_at": 1700000003000})]
    status, body = node.call("POST", "/_bulk", data=bulk_lines(newer), refresh="wait_for")
    assert status == 200 and not body["errors"], body
    assert search(node, "chat-messages", "caramel") == ["e1"]


def test_alias_can_move_to_a_new_index(node):
    # an index leaves the alias in one request; searches through it no longer see its data
    status, body = node.call("PUT", "/chat-messages-000002")
    assert status == 200, body
    docs = [index_action("chat-messages-000002", "n1", 1,
                         {"chat_id": "c9", "text": "déjà vu", "created_at": 1700000009000})]
    status, body = node.call("POST", "/_bulk", data=bulk_lines(docs), refresh="wait_for")
    assert status == 200 and not body["errors"], body
    # the template put both indices under the alias
    assert search(node, "chat-messages", "deja") == ["n1"]
    status, body = node.call("POST", "/_aliases", {"actions": [
        {"remove": {"index": "chat-messages-000002", "alias": "chat-messages"}},
    ]})
    assert status == 200 and body["acknowledged"], body
    assert search(node, "chat-messages", "deja") == []
    assert search(node, "chat-messages-000002", "deja") == ["n1"]
    status, body = node.call("GET", "/_alias/chat-messages")
    assert status == 200 and sorted(body) == ["chat-messages-000001"], body


def test_stop_ends_the_node(opensearch):
    assert_stops(opensearch)
