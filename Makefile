# Scalable-Chat. `make` builds build/chatd, build/chatctl and build/chat-indexer; `make run` installs what
# building and running need if it is missing, builds, and starts a chat on the embedded store;
# `make test` installs what is missing, builds, and runs every test.

CC      ?= gcc
CLANG   ?= clang
PYTHON  ?= python3
PORT    ?= 8000
# where `make run` keeps its database and dev secret: make run DATA_DIR=/tmp/chat
DATA_DIR ?= ./data
STORE   ?= sqlite:$(DATA_DIR)/chat.db

WARN    := -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter -Wstrict-prototypes
CFLAGS  ?= -O2 -g
BASEFLAGS := -std=c11 -D_GNU_SOURCE -Isrc $(WARN) -pthread -MMD -MP
LDLIBS  := -luv -ljansson -lhttp_parser -lsqlite3 -lhiredis -lcurl -lrdkafka -lssl -lcrypto -lz -lpthread -lm

LIB_SRC := $(sort $(wildcard src/core/*.c src/http/*.c src/ws/*.c src/chat/*.c src/cql/*.c \
                              src/store/*.c src/bus/*.c src/stream/*.c \
                              src/search/*.c src/indexer/*.c))
UNIT_SRC := $(sort $(wildcard tests/unit/test_*.c))
FUZZ_SRC := $(sort $(wildcard tests/fuzz/fuzz_*.c))

# ---- release build ----------------------------------------------------------------------
B := build
LIB_OBJ := $(LIB_SRC:%.c=$(B)/obj/%.o)
UNITS := $(UNIT_SRC:tests/unit/%.c=$(B)/tests/%)

all: $(B)/chatd $(B)/chatctl $(B)/chat-indexer $(B)/chat-bench

$(B)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(BASEFLAGS) $(CFLAGS) -c $< -o $@

$(B)/libchat.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(B)/chatd: $(B)/obj/src/main.o $(B)/libchat.a
	$(CC) $(CFLAGS) -pthread -o $@ $^ $(LDLIBS)

$(B)/chatctl: $(B)/obj/src/chatctl.o $(B)/libchat.a
	$(CC) $(CFLAGS) -pthread -o $@ $^ $(LDLIBS)

# the Kafka -> OpenSearch/Elasticsearch sink (README, "Search at scale")
$(B)/chat-indexer: $(B)/obj/src/chat_indexer.o $(B)/libchat.a
	$(CC) $(CFLAGS) -pthread -o $@ $^ $(LDLIBS)

# the load generator (bench/README.md)
$(B)/chat-bench: $(B)/obj/bench/chat_bench.o $(B)/libchat.a
	$(CC) $(CFLAGS) -pthread -o $@ $^ $(LDLIBS)

$(B)/tests/%: $(B)/obj/tests/unit/%.o $(B)/libchat.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -pthread -o $@ $^ $(LDLIBS)

# ---- sanitizer build (ASan + UBSan) of the library and the unit tests --------------------
SB := build/asan
SAN := -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
SAN_OBJ := $(LIB_SRC:%.c=$(SB)/obj/%.o)
SAN_UNITS := $(UNIT_SRC:tests/unit/%.c=$(SB)/tests/%)

$(SB)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(BASEFLAGS) $(SAN) -c $< -o $@

$(SB)/libchat.a: $(SAN_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(SB)/tests/%: $(SB)/obj/tests/unit/%.o $(SB)/libchat.a
	@mkdir -p $(dir $@)
	$(CC) $(SAN) -pthread -o $@ $^ $(LDLIBS)

$(SB)/chatd: $(SB)/obj/src/main.o $(SB)/libchat.a
	$(CC) $(SAN) -pthread -o $@ $^ $(LDLIBS)

$(SB)/chatctl: $(SB)/obj/src/chatctl.o $(SB)/libchat.a
	$(CC) $(SAN) -pthread -o $@ $^ $(LDLIBS)

$(SB)/chat-indexer: $(SB)/obj/src/chat_indexer.o $(SB)/libchat.a
	$(CC) $(SAN) -pthread -o $@ $^ $(LDLIBS)

# The functional suite against the sanitizer build of the server: every error, and any leak
# at exit, fails the server's exit code and so the test. A small quarantine keeps RSS
# meaningful for the memory checks.
functional-asan: $(SB)/chatd $(SB)/chatctl
	CHATD_BIN=$(SB)/chatd ASAN_OPTIONS=detect_leaks=1:quarantine_size_mb=8:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests/functional

# ---- libFuzzer harnesses (clang) --------------------------------------------------------
FB := build/fuzz
FUZZFLAGS := -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
FUZZ_LIB_OBJ := $(LIB_SRC:%.c=$(FB)/obj/%.o)
FUZZERS := $(FUZZ_SRC:tests/fuzz/%.c=$(FB)/%)
FUZZ_SECONDS ?= 60

$(FB)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CLANG) -std=c11 -D_GNU_SOURCE -Isrc $(WARN) -Wno-unused-command-line-argument -pthread -MMD -MP \
	    -O1 -g -fsanitize=fuzzer-no-link,address,undefined -c $< -o $@

$(FB)/libchat.a: $(FUZZ_LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(FB)/%: $(FB)/obj/tests/fuzz/%.o $(FB)/libchat.a
	$(CLANG) $(FUZZFLAGS) -pthread -o $@ $^ $(LDLIBS)

# ---- targets ----------------------------------------------------------------------------
.PHONY: all run test deps deps-run format-check unit unit-asan fuzz fuzz-replay functional functional-asan browser bench \
        bench-full cluster cluster-stop cluster-tests create-models test-suites \
        functional-cassandra cassandra-tests components-tests soak stream-tests search-tests \
        clean format

# No secret configured: dev mode, which prints the secret and how to mint a token. The
# secret is generated once into $(DATA_DIR)/dev-secret, so tokens survive a restart. The
# dependencies come first, and the build after them (not beside them as a prerequisite
# would, under -j): on a fresh machine the compiler needs the -dev packages.
run: deps-run
	$(MAKE) all
	@mkdir -p "$(DATA_DIR)"
	@[ -n "$${CHAT_JWT_SECRET:-}" ] || [ -s "$(DATA_DIR)/dev-secret" ] || \
	    (umask 077; openssl rand -hex 32 > "$(DATA_DIR)/dev-secret")
	CHAT_PORT=$${CHAT_PORT:-$(PORT)} CHAT_STORE=$${CHAT_STORE:-$(STORE)} \
	    CHAT_JWT_SECRET=$${CHAT_JWT_SECRET:-$$(cat "$(DATA_DIR)/dev-secret")} \
	    ./$(B)/chatd $$([ -n "$${CHAT_JWT_SECRET:-}" ] || echo --dev)

create-models: $(B)/chatctl
	@mkdir -p "$(DATA_DIR)"
	./$(B)/chatctl migrate --store "$${CHAT_STORE:-$(STORE)}"

# everything `make test` uses; deps-run: only what building and running need
deps:
	@bash scripts/deps.sh test

deps-run:
	@bash scripts/deps.sh run

unit: $(UNITS)
	@set -e; for t in $(UNITS); do echo "== $$t"; $$t; done

unit-asan: $(SAN_UNITS)
	@set -e; for t in $(SAN_UNITS); do echo "== $$t (asan+ubsan)"; \
	    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 $$t; done

fuzz-replay: $(FUZZERS)
	@set -e; for f in $(FUZZERS); do n=$$(basename $$f); echo "== $$n: corpus replay"; \
	    $$f -runs=0 tests/fuzz/corpus/$$n >/dev/null 2>$(FB)/$$n.log || { tail -40 $(FB)/$$n.log; exit 1; }; \
	    grep -E 'Done [0-9]+ runs|INITED' $(FB)/$$n.log | tail -1; done

fuzz: $(FUZZERS)
	@set -e; for f in $(FUZZERS); do n=$$(basename $$f); mkdir -p $(FB)/corpus/$$n; \
	    echo "== $$n for $(FUZZ_SECONDS)s"; \
	    dict=; [ -f tests/fuzz/$$n.dict ] && dict=-dict=tests/fuzz/$$n.dict; \
	    $$f -max_total_time=$(FUZZ_SECONDS) $$dict $(FB)/corpus/$$n tests/fuzz/corpus/$$n 2>&1 | tail -3; done

functional: all
	$(PYTHON) -m pytest -q tests/functional

# A cluster on loopback: Redis, the store, Kafka, OpenSearch, three chatd nodes, a
# chat-indexer, HAProxy on :8000 (CLUSTER_SEARCH=none: without the search pipeline).
cluster: all
	scripts/cluster start

cluster-stop:
	scripts/cluster stop

# Several nodes over a real Redis: fan-out, failover, resume, discovery, the Docker files.
cluster-tests: all
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/cluster

# Benchmarks: quick versions of every scenario (a few minutes), or the full ones.
bench: all
	bench/run quick

bench-full: all
	bench/run full

# The web client in Debian's Chromium, driven by playwright-core, against the real chatd.
browser: all
	cd tests/browser && npm ci --no-audit --no-fund --silent && node --test

# One real Cassandra node serves every suite of a `make test` run (the unit tests, the
# functional suite on Cassandra, tests/cassandra); it is stopped however the run ends.
CASSANDRA_PORT ?= 19042
CASSANDRA_DIR  ?= /tmp/scalable-chat-cassandra-$(CASSANDRA_PORT)
export CHAT_TEST_CASSANDRA_PORT := $(CASSANDRA_PORT)
export CHAT_TEST_CASSANDRA_DIR := $(CASSANDRA_DIR)

test: deps
	$(MAKE) all
	scripts/cassandra start --port $(CASSANDRA_PORT) --dir $(CASSANDRA_DIR)
	$(MAKE) test-suites; rc=$$?; \
	    scripts/cassandra stop --port $(CASSANDRA_PORT) --dir $(CASSANDRA_DIR); \
	    rm -rf $(CASSANDRA_DIR); exit $$rc

# The functional suite runs twice: on SQLite under the sanitizers, and on Cassandra with the
# release build (the build `make run` starts; browser, cluster and stream suites use it too).
# A third pass (release on SQLite) found nothing the two did not and cost 3 of 15 minutes.
test-suites: format-check unit unit-asan fuzz-replay functional-asan browser cluster-tests \
             functional-cassandra cassandra-tests components-tests stream-tests search-tests

# the functional suite again, each server on a fresh keyspace of the real Cassandra. Files
# that never reach the store (frames, handshakes, HTTP bounds, TLS, tokens and keys, the CLI,
# logs) ran on SQLite already and are not repeated: they cost 95 of this pass's 235 s.
FUNCTIONAL_STORE_FREE := test_frames test_handshake test_http_bounds test_tls test_deflate \
                         test_token_expiry test_identity test_cli test_logs test_accept_oom \
                         test_bench_smoke
functional-cassandra: all
	CHAT_TEST_STORE=cassandra $(PYTHON) -m pytest -q -p no:cacheprovider tests/functional \
	    $(foreach f,$(FUNCTIONAL_STORE_FREE),--ignore=tests/functional/$(f).py)

# Cassandra itself: cross-checks with the DataStax driver, outages, auth, buckets
cassandra-tests: all
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/cassandra

# The search pipeline's components alone: a real Kafka (scripts/kafka) and OpenSearch
# (scripts/opensearch), each started on a free port for its module and stopped after.
components-tests:
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/components

# The long fault soak (tests/cluster/test_soak.py; `make cluster-tests` runs a short one):
# SOAK_SECONDS of kill -9 / drain / Redis restart, 40 msg/s in each of 4 chats, on a real
# Cassandra (the one on CASSANDRA_PORT, started and stopped here when none runs there).
SOAK_SECONDS ?= 90
soak: all
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_RATES=40,40,40,40 SOAK_STORE=cassandra SOAK_REPLAY_LIMIT= \
	    $(PYTHON) -m pytest -q -p no:cacheprovider tests/cluster/test_soak.py

# chatd as a Kafka source (src/stream/): one real Kafka (scripts/kafka) for the whole suite,
# stopped and started again by the outage tests; real chatd and chatctl (about a minute).
stream-tests: all
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/stream

# the cost of sealing a flush with TLS, CPU only (bench/tls_compare runs it)
$(B)/tls_seal: $(B)/obj/bench/tls_seal.o $(B)/libchat.a
	$(CC) $(CFLAGS) -pthread -o $@ $^ $(LDLIBS)

# The search pipeline end to end (tests/search/): chatd -> Kafka -> chat-indexer ->
# OpenSearch -> chatd's search API, one real Kafka and one real OpenSearch for the suite,
# stopped and started again by the outage tests (about a minute and a half).
search-tests: all
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/search

# store throughput and history latency, SQLite and Cassandra side by side (bench/RESULTS.md)
$(B)/store_bench: $(B)/obj/bench/store_bench.o $(B)/libchat.a
	$(CC) $(CFLAGS) -pthread -o $@ $^ $(LDLIBS)

# what permessage-deflate costs per event, alone (bench/RESULTS.md, "Compression")
$(B)/zip_bench: $(B)/obj/bench/zip_bench.o $(B)/libchat.a
	$(CC) $(CFLAGS) -pthread -o $@ $^ $(LDLIBS)

# .clang-format holds the style; Debian 12 installs the binary as clang-format-14
CLANG_FORMAT ?= $(shell command -v clang-format || command -v clang-format-14 || echo clang-format)
FORMAT_FILES = src/*.c src/*/*.c src/*/*.h tests/unit/*.c tests/unit/*.h tests/fuzz/*.c bench/*.c
format:
	$(CLANG_FORMAT) -i $(FORMAT_FILES)

# make test's first step: the tree is in the style of .clang-format (`make format` fixes it)
format-check:
	$(CLANG_FORMAT) --dry-run -Werror $(FORMAT_FILES)

clean:
	rm -rf build

-include $(shell find build -name '*.d' 2>/dev/null)
