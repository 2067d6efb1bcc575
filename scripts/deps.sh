#!/usr/bin/env bash
# Install what is needed and not there yet: Debian packages (as root, or with sudo) and,
# for the tests, the Python test packages. Idempotent and quiet when all is present.
#
#   scripts/deps.sh run    what building and running chatd need (`make run`)
#   scripts/deps.sh [test] that, and every tool the test suites use (`make test`)
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-test}
case $what in
    run | test) ;;
    *) echo "usage: scripts/deps.sh [run|test]" >&2; exit 2 ;;
esac

# building and running: the compiler, the -dev libraries (libcurl: chatd's --jwks-url), openssl
# for `make run`'s dev secret
debs=(gcc libc6-dev make pkg-config openssl
      libuv1-dev libjansson-dev libhttp-parser-dev libsqlite3-dev libssl-dev zlib1g-dev
      libhiredis-dev libcurl4-openssl-dev librdkafka-dev)
# testing: sanitizers and fuzzers, Redis, HAProxy, the browser, the Docker checks; the JDK
# (with javac, for the OpenSearch launcher) and Maven for Cassandra, Kafka and OpenSearch,
# curl for OpenSearch's readiness (the Python Kafka client is in tests/requirements.txt),
# certutil (libnss3-tools) to make Chromium trust the TLS test's CA, clang-format-14 for
# make format-check
[ "$what" = test ] &&
    debs+=(clang libclang-rt-14-dev llvm redis-server haproxy chromium openjdk-17-jdk-headless
           maven docker-compose curl libnss3-tools clang-format-14)
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "deps: installing Debian packages: ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

[ "$what" = run ] && exit 0

# Node.js (for the browser tests) comes with this kind of machine; Debian's is older.
command -v node >/dev/null && command -v npm >/dev/null ||
    { echo "deps: node and npm are required for the browser tests" >&2; exit 1; }

py=${PYTHON:-python3}
if ! $py - <<'PY' 2>/dev/null
import importlib.metadata as m, pathlib, re, sys
for line in pathlib.Path("tests/requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, _, ver = line.partition("==")
    if m.version(name.strip()) != ver.strip():
        sys.exit(1)
PY
then
    echo "deps: installing Python test packages from tests/requirements.txt"
    $py -m pip install -q -r tests/requirements.txt 2>&1 | grep -v "Running pip as the 'root' user" || true
fi
