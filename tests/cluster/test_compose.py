"""The Docker deployment, checked without a Docker engine: docker-compose.yml passes
`docker compose config` (or docker-compose's), its services, ports and CHAT_* environment
match what chatd reads (`chatd --help` is the reference), the search pipeline (Kafka,
OpenSearch, chat-indexer) is wired to the nodes, the Dockerfile's runtime stage runs as
non-root with a HEALTHCHECK, and deploy/haproxy.cfg passes `haproxy -c`."""

import os
import re
import shutil
import subprocess

import pytest
import yaml

from clusterlib import CHATD, REPO, clean_env

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
ENV_EXAMPLE = REPO / "deploy" / ".env.example"
SECRET = "compose-test-secret"
NODES = ["chatd1", "chatd2", "chatd3"]


def compose_cmd():
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run(
                cmd + ["version"], capture_output=True).returncode == 0:
            return cmd
    pytest.fail("neither `docker compose` nor `docker-compose` runs here "
                "(Debian: apt-get install docker-compose)")


def compose_config(env_extra):
    env = clean_env(env_extra)
    return subprocess.run(
        compose_cmd() + ["--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config"],
        capture_output=True, text=True, env=env, cwd=str(REPO), timeout=60)


@pytest.fixture(scope="module")
def config():
    r = compose_config({"CHAT_JWT_SECRET": SECRET})
    assert r.returncode == 0, f"compose config failed:\n{r.stderr}"
    return yaml.safe_load(r.stdout)


@pytest.fixture(scope="module")
def chatd_vars():
    out = subprocess.run([str(CHATD), "--help"], capture_output=True, text=True,
                         env=clean_env(), timeout=10)
    assert out.returncode == 0, out.stderr
    names = set(re.findall(r"\bCHAT_[A-Z_]+\b", out.stdout))
    assert {"CHAT_PORT", "CHAT_STORE", "CHAT_BUS", "CHAT_JWT_SECRET", "CHAT_NODE_ID"} <= names
    return names


def env_of(service):
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def published(service):
    """[(host_ip, published, target)] whatever the compose version's long/short form."""
    out = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out.append((p.get("host_ip", ""), int(p["published"]), int(p["target"])))
        else:
            m = re.fullmatch(r"(?:([\d.]+):)?(\d+):(\d+)(?:/tcp)?", str(p))
            assert m, p
            out.append((m.group(1) or "", int(m.group(2)), int(m.group(3))))
    return out


def depends(service):
    d = service.get("depends_on") or {}
    if isinstance(d, list):
        return {k: "service_started" for k in d}
    return {k: (v or {}).get("condition", "service_started") for k, v in d.items()}


def test_every_chat_variable_is_one_chatd_reads(chatd_vars):
    for path in (COMPOSE, ENV_EXAMPLE, DOCKERFILE):
        used = set(re.findall(r"\bCHAT_[A-Z_]+\b", path.read_text()))
        unknown = used - chatd_vars
        assert not unknown, f"{path.name} uses {sorted(unknown)}, which chatd does not read"


def test_compose_services(config, chatd_vars):
    services = config["services"]
    assert set(services) >= {"redis", "cassandra", "kafka", "opensearch", "migrate",
                             "chat-indexer", "haproxy", *NODES}

    cas = services["cassandra"]
    assert cas["image"] == "cassandra:5.0"
    check = " ".join(cas["healthcheck"]["test"])
    assert "cqlsh" in check or "nodetool" in check, check
    assert ("127.0.0.1", 9042, 9042) in published(cas), "CQL on the host's loopback only"

    assert "redis-cli" in " ".join(services["redis"]["healthcheck"]["test"])

    mig = services["migrate"]
    assert "chatctl" in " ".join(mig["command"]) and "migrate" in " ".join(mig["command"])
    assert depends(mig) == {"cassandra": "service_healthy", "kafka": "service_healthy"}
    assert env_of(mig)["CHAT_STORE"].startswith("cassandra://cassandra:9042/")
    # migrate also creates the topic the nodes produce to
    assert env_of(mig)["CHAT_KAFKA"] == "kafka:9092"

    node_ids, public = set(), {}
    for name in NODES:
        svc = services[name]
        env = env_of(svc)
        assert set(env) <= chatd_vars, name
        assert env["CHAT_PORT"] == "8000" and env["CHAT_HOST"] == "0.0.0.0"
        assert env["CHAT_BUS"] == "redis://redis:6379"
        assert env["CHAT_STORE"] == env_of(mig)["CHAT_STORE"], "nodes and migrate: one store"
        assert env["CHAT_KAFKA"] == env_of(mig)["CHAT_KAFKA"], "nodes and migrate: one Kafka"
        assert env["CHAT_SEARCH"] == "opensearch://opensearch:9200"
        assert env["CHAT_JWT_SECRET"] == SECRET, "the secret comes from the environment"
        node_ids.add(int(env["CHAT_NODE_ID"]))
        ports = published(svc)
        assert len(ports) == 1 and ports[0][2] == 8000, ports
        public[name] = ports[0][1]
        assert env["CHAT_PUBLIC_URL"] == f"ws://localhost:{ports[0][1]}", \
            "a node announces the URL it is published on"
        assert depends(svc) == {"redis": "service_healthy",
                                "migrate": "service_completed_successfully"}
        assert "deploy/Dockerfile" in str(svc["build"].get("dockerfile")), svc["build"]
    assert node_ids == {1, 2, 3}, "each node its own id"
    assert sorted(public.values()) == [8001, 8002, 8003]

    kafka = services["kafka"]
    kenv = env_of(kafka)
    assert kafka["image"].startswith("apache/kafka:")
    assert "broker" in kenv["KAFKA_PROCESS_ROLES"] and "controller" in kenv["KAFKA_PROCESS_ROLES"]
    assert "PLAINTEXT://kafka:9092" in kenv["KAFKA_ADVERTISED_LISTENERS"], \
        "the broker announces the name the other containers reach it by"
    assert kenv["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "a typo must not make a topic"
    assert "kafka-broker-api-versions" in " ".join(kafka["healthcheck"]["test"])

    osearch = services["opensearch"]
    assert osearch["image"].startswith("opensearchproject/opensearch:2.")
    assert env_of(osearch)["discovery.type"] == "single-node"
    assert "_cluster/health" in " ".join(osearch["healthcheck"]["test"])

    ix = services["chat-indexer"]
    cmd = ix["command"]
    assert cmd[0] == "chat-indexer"
    assert cmd[cmd.index("--kafka") + 1] == "kafka:9092"
    assert cmd[cmd.index("--search") + 1] == env_of(services["chatd1"])["CHAT_SEARCH"], \
        "the indexer fills the index the nodes search"
    mport = int(cmd[cmd.index("--metrics-port") + 1])
    assert ("127.0.0.1", mport, mport) in published(ix), "/metrics on the host's loopback"
    assert depends(ix) == {"migrate": "service_completed_successfully",
                           "opensearch": "service_healthy"}
    assert f"127.0.0.1:{mport}/metrics" in " ".join(ix["healthcheck"]["test"]), \
        "its own healthcheck, not the image's chatd one"
    assert ix["image"] == services["chatd1"]["image"]

    hap = services["haproxy"]
    assert any(t == 8000 and p == 8000 for _, p, t in published(hap))
    assert set(depends(hap)) == set(NODES)
    vols = " ".join(str(v) if not isinstance(v, dict) else f"{v['source']}:{v['target']}"
                    for v in hap["volumes"])
    assert "deploy/haproxy.cfg" in vols and "/usr/local/etc/haproxy/haproxy.cfg" in vols


def test_compose_needs_a_secret():
    r = compose_config({})
    assert r.returncode != 0, "compose must refuse to run without CHAT_JWT_SECRET"
    assert "CHAT_JWT_SECRET" in r.stderr


def dockerfile_stages():
    stages, cur = [], None
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            cur = {"from": rest.split()[0], "lines": []}
            stages.append(cur)
        elif cur is not None:
            cur["lines"].append((word, rest.strip()))
    return stages


def test_dockerfile_runtime_stage():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build, then runtime"
    build, runtime = stages[0], stages[-1]
    build_text = " ".join(r for _, r in build["lines"])
    for pkg in ("gcc", "make", "pkg-config", "libuv1-dev", "libjansson-dev", "libhttp-parser-dev",
                "libsqlite3-dev", "libssl-dev", "zlib1g-dev", "libhiredis-dev"):
        assert re.search(rf"(?<![\w-]){re.escape(pkg)}(?![\w-])", build_text), pkg

    assert runtime["from"] == "debian:bookworm-slim"
    instr = runtime["lines"]
    run_text = " ".join(r for w, r in instr if w == "RUN")
    assert not re.search(r"\b[\w.+]+-dev\b", run_text), "no -dev package at runtime"
    for pkg in ("libuv1", "libjansson4", "libhttp-parser2.9", "libsqlite3-0", "libssl3", "zlib1g",
                "libhiredis0.14"):
        assert re.search(rf"(?<![\w-]){re.escape(pkg)}(?![\w-])", run_text), pkg
    users = [r for w, r in instr if w == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"runs as {users[-1]}"
    health = [r for w, r in instr if w == "HEALTHCHECK"]
    assert health and "/healthz" in health[-1], health
    assert ("curl" in health[-1] and "curl" in run_text) or \
           ("wget" in health[-1] and "wget" in run_text), "the healthcheck's tool is installed"
    assert any(w == "EXPOSE" and "8000" in r.split() for w, r in instr)
    copies = " ".join(r for w, r in instr if w == "COPY")
    assert "--from=" in copies and "chatd" in copies and "chatctl" in copies
    assert "chat-indexer" in copies
    assert re.search(r"(^|\s)web/?\s", copies + " "), "the web client is in the image"


def test_dockerignore_keeps_the_context_small():
    text = (REPO / ".dockerignore").read_text()
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("#")]
    # everything is excluded except what the build stage copies
    assert lines[0] == "*"
    assert {"!Makefile", "!src/", "!schema/", "!web/"} <= set(lines)


def test_haproxy_config():
    if not shutil.which("haproxy"):
        pytest.fail("haproxy is not installed (Debian: haproxy)")
    text = HAPROXY_CFG.read_text()
    for want in (r"timeout\s+tunnel\s+1h", r"timeout\s+client\s+60s", r"timeout\s+server\s+60s",
                 r"option\s+httpchk", r"/healthz"):
        assert re.search(want, text), want
    # the defaults are compose's service names, the variables scripts/cluster's addresses
    servers = re.findall(r'^\s*server\s+(\S+)\s+"\$\{(CHATD\d)-([^}]+)\}"', text, re.M)
    assert [(s, d) for s, _, d in servers] == [(n, f"{n}:8000") for n in NODES], servers
    env = dict(os.environ, CHATD1="127.0.0.1:18001", CHATD2="127.0.0.1:18002",
               CHATD3="127.0.0.1:18003", HAPROXY_BIND="127.0.0.1:18000",
               HAPROXY_STATS="127.0.0.1:18404")
    r = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr, r.stdout + r.stderr
