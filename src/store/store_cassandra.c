/* store_cassandra: the message store on Apache Cassandra, through our CQL client (src/cql).
 *
 *   cassandra://[user:pass@]host1:9042,host2:9042/keyspace?consistency=local_quorum
 *
 * Query options: consistency (default local_quorum), serial_consistency (serial, or
 * local_serial), replication (what migrate creates: "simple:N" or
 * "nts:dc1=3,dc2=3"; replication_factor=N is short for simple:N), timeout_ms (per request,
 * default 12000), connect_timeout_ms (5000), pool (connections per host, 2),
 * reconnect_max_ms (5000).
 *
 * Data model (schema/cassandra.cql): messages_by_chat is partitioned by (chat_id, bucket),
 * bucket = the message id's time / 10 days, so a partition holds at most ten days of one
 * chat. chat_buckets lists, per chat, the buckets that have messages, newest first: history
 * reads it to walk buckets backwards without probing the empty ones. message_client_ids
 * maps (chat, user, client_id) to the message id, for idempotent sends. The Kafka outbox's
 * four tables (chatd --kafka) are described at "the outbox" below.
 *
 * The one idea: every request is a small state machine of CQL calls, and the store's
 * callback reports success only after each write it made was acknowledged at the configured
 * consistency, so "durable before delivery" holds as it does with SQLite.
 *
 * Idempotent append, and what it costs. Without a client_id an append is one row write, alone
 * or in a batch (plus, once per chat and bucket per process, one write to chat_buckets, issued
 * before the rows and remembered). With a client_id it first claims (chat, user, client_id)
 * with a lightweight transaction, INSERT ... IF NOT EXISTS at the serial consistency: a Paxos
 * round (on Cassandra 5.0 with the default Paxos v1, four replica round trips: prepare, read,
 * propose, commit) that decides, for the whole cluster and for concurrent retries, who owns the
 * client_id. The winner writes the message row with its own id. A loser reads the claimed id
 * and created_at, then the message row: if it exists, that is the duplicate's answer; if it
 * does not (the first sender crashed, or its message write failed, between the two writes), the
 * loser writes the message with the claimed id and time, so a retry always ends with exactly
 * one message under the original id (and it is delivered then, as the first delivery). So an
 * idempotent send costs one LWT + one write, about 3-4x a plain send in latency; a retried one
 * costs one LWT + one read. Retries of the same key in flight on this node at the same time are
 * also folded in memory, so they do not race each other between the claim and the message
 * write. The claim rows never expire (the SQLite store forgets no client_id either); a TTL
 * would bound them if that ever matters.
 *
 * Order of visibility. chatd relies on "a node stores and publishes a chat's messages in id
 * order": the rooms' duplicate marks and the resume cursors keep, per origin node, the newest
 * id seen, so a reader (a catch-up after a bus outage, a resume's read on another node) that
 * saw message 10 stored while 9 was still being written would let a client skip 9 for good.
 * Concurrent writes become visible in any order, so per chat this node keeps at most ONE
 * write of message rows in flight; the rows that become ready meanwhile wait in the chat's
 * queue (chatq_t) and go together as the next write, in submission order (the node's id
 * order): one INSERT alone, or one UNLOGGED BATCH when several fall in the same partition
 * (chat, bucket). Cassandra applies a single-partition batch as one mutation, atomically and
 * in isolation, so a reader sees all of its rows or none, and the next batch is sent only
 * after this one was acknowledged; a bucket boundary splits them into consecutive batches.
 * The throughput stays: under load each write carries every row queued behind the previous
 * one (bench/RESULTS.md, "Store"). An idempotent send's claim (the LWT) still runs at once and
 * concurrently; only its row waits for its turn, and a row whose claim is still in flight
 * holds back the rows behind it (it may turn out to be a duplicate, with no row). If a batch
 * fails, every message in it fails (each callback reports the error; none is reported
 * stored), and the rows queued behind it go on. With a consistency below a quorum a reader
 * may still meet a replica that missed a row it already acknowledged: the order is a
 * quorum's.
 *
 * Edits and deletes read the row (author, deleted), then update it with a lightweight
 * transaction conditioned on the author and "not deleted", so a delete racing an edit can
 * never bring the text back.
 */
#include "store.h"
#include "store_internal.h"

#include <ctype.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "cql/cql.h"

#define BUCKET_MS (10LL * 24 * 3600 * 1000)
#define BUCKETS_PER_QUERY 64
#define READ_PAGE_ROWS 1000
#define BUCKET_CACHE_MAX 65536
#define CLAIM_SLOTS 1024
/* One batch of a chat's message rows: what Cassandra applies as one mutation. Single-
 * partition batches are exempt from its batch size warn/fail thresholds; these bounds keep
 * one request's size and latency modest (a larger message still goes, alone). */
#define BATCH_MAX_ROWS 256
#define BATCH_MAX_BYTES (1u << 20)
#define MAX_HOSTS 16

/* ---- configuration ------------------------------------------------------------------- */

typedef struct cass_cfg {
    char *hosts[MAX_HOSTS];
    size_t n_hosts;
    char *user, *password;
    char keyspace[49];
    int consistency, serial;
    char replication[512]; /* the CQL map for CREATE KEYSPACE */
    unsigned timeout_ms, connect_timeout_ms, pool, reconnect_max_ms;
} cass_cfg_t;

static void cfg_free(cass_cfg_t *c) {
    for (size_t i = 0; i < c->n_hosts; i++) free(c->hosts[i]);
    free(c->user);
    if (c->password) memset(c->password, 0, strlen(c->password));
    free(c->password);
    memset(c, 0, sizeof *c);
}

static int hexval(int ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* Percent-decode s[0..n) into a new string; NULL on a bad escape or OOM. */
static char *pct_decode(const char *s, size_t n) {
    char *out = malloc(n + 1), *o = out;
    if (!out) return NULL;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '%') {
            *o++ = s[i];
            continue;
        }
        int hi = i + 1 < n ? hexval((unsigned char)s[i + 1]) : -1;
        int lo = i + 2 < n ? hexval((unsigned char)s[i + 2]) : -1;
        if (hi < 0 || lo < 0) {
            free(out);
            return NULL;
        }
        *o++ = (char)(hi * 16 + lo);
        i += 2;
    }
    *o = '\0';
    return out;
}

static bool parse_uint(const char *s, size_t n, unsigned lo, unsigned hi, unsigned *out) {
    if (n == 0 || n > 9) return false;
    unsigned v = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isdigit((unsigned char)s[i])) return false;
        v = v * 10 + (unsigned)(s[i] - '0');
    }
    if (v < lo || v > hi) return false;
    *out = v;
    return true;
}

/* "simple:N", "SimpleStrategy:N", "nts:dc1=3,dc2=2", "NetworkTopologyStrategy:dc1=3". */
static bool parse_replication(const char *v, size_t n, char *out, size_t outn) {
    const char *colon = memchr(v, ':', n);
    if (!colon) return false;
    size_t cn = (size_t)(colon - v);
    const char *rest = colon + 1;
    size_t rn = n - cn - 1;
    if ((cn == 6 && strncasecmp(v, "simple", 6) == 0) ||
        (cn == 14 && strncmp(v, "SimpleStrategy", 14) == 0)) {
        unsigned rf;
        if (!parse_uint(rest, rn, 1, 100, &rf)) return false;
        snprintf(out, outn, "{'class': 'SimpleStrategy', 'replication_factor': %u}", rf);
        return true;
    }
    if (!((cn == 3 && strncasecmp(v, "nts", 3) == 0) ||
          (cn == 23 && strncmp(v, "NetworkTopologyStrategy", 23) == 0))) {
        return false;
    }
    size_t len = (size_t)snprintf(out, outn, "{'class': 'NetworkTopologyStrategy'");
    const char *p = rest, *end = rest + rn;
    int ndc = 0;
    while (p < end) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *item_end = comma ? comma : end;
        const char *eq = memchr(p, '=', (size_t)(item_end - p));
        if (!eq || eq == p) return false;
        for (const char *q = p; q < eq; q++) {
            if (!isalnum((unsigned char)*q) && *q != '_' && *q != '-' && *q != '.') return false;
        }
        unsigned rf;
        if (!parse_uint(eq + 1, (size_t)(item_end - eq - 1), 0, 100, &rf)) return false;
        int k =
            snprintf(out + len, outn > len ? outn - len : 0, ", '%.*s': %u", (int)(eq - p), p, rf);
        if (k < 0 || len + (size_t)k + 2 >= outn) return false;
        len += (size_t)k;
        ndc++;
        p = comma ? comma + 1 : end;
    }
    if (!ndc) return false;
    snprintf(out + len, outn - len, "}");
    return true;
}

static int parse_url(const char *url, cass_cfg_t *c, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    c->consistency = CQL_LOCAL_QUORUM;
    c->serial = CQL_SERIAL;
    c->timeout_ms = 12000;
    c->connect_timeout_ms = 5000;
    c->pool = 2;
    c->reconnect_max_ms = 5000;
    snprintf(c->keyspace, sizeof c->keyspace, "chat");
    snprintf(c->replication, sizeof c->replication,
             "{'class': 'SimpleStrategy', 'replication_factor': 1}");
    if (strncmp(url, "cassandra://", 12) != 0) {
        store__set_err(err, errlen, "not a cassandra:// URL");
        return CHAT_EINVAL;
    }
    const char *p = url + 12;
    const char *auth_end = p + strcspn(p, "/?");
    const char *at = NULL;
    for (const char *q = p; q < auth_end; q++) {
        if (*q == '@') at = q; /* the last @: a password may hold an encoded one */
    }
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        size_t un = colon ? (size_t)(colon - p) : (size_t)(at - p);
        c->user = pct_decode(p, un);
        c->password = colon ? pct_decode(colon + 1, (size_t)(at - colon - 1)) : strdup("");
        if (!c->user || !c->password || !*c->user) {
            store__set_err(err, errlen, "cassandra URL: bad user:password before @");
            goto fail;
        }
        p = at + 1;
    }
    /* hosts */
    while (p < auth_end) {
        const char *comma = memchr(p, ',', (size_t)(auth_end - p));
        const char *e = comma ? comma : auth_end;
        if (e == p) {
            store__set_err(err, errlen, "cassandra URL: empty host");
            goto fail;
        }
        if (c->n_hosts == MAX_HOSTS) {
            store__set_err(err, errlen, "cassandra URL: more than %d hosts", MAX_HOSTS);
            goto fail;
        }
        /* host, host:port or [v6]:port; a port must be 1..65535 */
        const char *rb = memchr(p, ']', (size_t)(e - p));
        const char *pc = memchr(rb ? rb : p, ':', (size_t)(e - (rb ? rb : p)));
        if (pc && !rb && memchr(pc + 1, ':', (size_t)(e - pc - 1))) pc = NULL; /* bare v6 */
        if (pc) {
            long port = 0;
            const char *d = pc + 1;
            for (; d < e && isdigit((unsigned char)*d) && port <= 65535; d++)
                port = port * 10 + (*d - '0');
            if (d != e || d == pc + 1 || port < 1 || port > 65535) {
                store__set_err(err, errlen, "cassandra URL: bad port in \"%.*s\"", (int)(e - p), p);
                goto fail;
            }
        }
        if (!(c->hosts[c->n_hosts] = strndup(p, (size_t)(e - p)))) goto oom;
        c->n_hosts++;
        p = comma ? comma + 1 : e;
    }
    if (!c->n_hosts) {
        store__set_err(err, errlen,
                       "cassandra URL without a host (cassandra://HOST:9042/KEYSPACE)");
        goto fail;
    }
    if (*p == '/') {
        p++;
        size_t kn = strcspn(p, "?");
        if (kn) {
            if (kn > 48 || !islower((unsigned char)p[0])) goto bad_ks;
            for (size_t i = 0; i < kn; i++) {
                if (!islower((unsigned char)p[i]) && !isdigit((unsigned char)p[i]) && p[i] != '_')
                    goto bad_ks;
            }
            snprintf(c->keyspace, sizeof c->keyspace, "%.*s", (int)kn, p);
        }
        p += kn;
    }
    if (*p == '?') p++;
    while (*p) {
        size_t n = strcspn(p, "&");
        const char *eq = memchr(p, '=', n);
        if (!eq) {
            store__set_err(err, errlen, "cassandra URL: option \"%.*s\" without a value", (int)n,
                           p);
            goto fail;
        }
        size_t kn = (size_t)(eq - p), vn = n - kn - 1;
        const char *v = eq + 1;
        char val[256];
        snprintf(val, sizeof val, "%.*s", (int)(vn < 255 ? vn : 255), v);
#define KEY(s) (kn == strlen(s) && strncmp(p, s, kn) == 0)
        bool ok = true;
        if (KEY("consistency")) {
            int cl = cql_consistency_parse(val);
            ok = cl >= 0 && cl != CQL_SERIAL && cl != CQL_LOCAL_SERIAL;
            c->consistency = cl;
        } else if (KEY("serial_consistency")) {
            int cl = cql_consistency_parse(val);
            ok = cl == CQL_SERIAL || cl == CQL_LOCAL_SERIAL;
            c->serial = cl;
        } else if (KEY("replication")) {
            ok = parse_replication(v, vn, c->replication, sizeof c->replication);
        } else if (KEY("replication_factor")) {
            unsigned rf;
            ok = parse_uint(v, vn, 1, 100, &rf);
            if (ok) {
                snprintf(c->replication, sizeof c->replication,
                         "{'class': 'SimpleStrategy', 'replication_factor': %u}", rf);
            }
        } else if (KEY("timeout_ms")) {
            ok = parse_uint(v, vn, 1, 600000, &c->timeout_ms);
        } else if (KEY("connect_timeout_ms")) {
            ok = parse_uint(v, vn, 1, 600000, &c->connect_timeout_ms);
        } else if (KEY("pool")) {
            ok = parse_uint(v, vn, 1, 64, &c->pool);
        } else if (KEY("reconnect_max_ms")) {
            ok = parse_uint(v, vn, 1, 600000, &c->reconnect_max_ms);
        } else {
            store__set_err(err, errlen,
                           "cassandra URL: unknown option \"%.*s\" (known: consistency, "
                           "serial_consistency, replication, replication_factor, timeout_ms, "
                           "connect_timeout_ms, pool, reconnect_max_ms)",
                           (int)kn, p);
            goto fail;
        }
#undef KEY
        if (!ok) {
            store__set_err(err, errlen, "cassandra URL: bad value \"%s\" for %.*s", val, (int)kn,
                           p);
            goto fail;
        }
        p += n;
        if (*p == '&') p++;
    }
    return 0;
bad_ks:
    store__set_err(err, errlen,
                   "cassandra URL: the keyspace must be 1 to 48 lowercase letters, digits or _, "
                   "starting with a letter");
    goto fail;
oom:
    cfg_free(c);
    return CHAT_ENOMEM;
fail:
    cfg_free(c);
    return CHAT_EINVAL;
}

/* ---- the store ----------------------------------------------------------------------------- */

enum {
    S_INSERT_BUCKET,
    S_INSERT_MSG,
    S_CLAIM,
    S_GET,
    S_EDIT,
    S_DELETE,
    S_BUCKETS_DESC,
    S_BUCKETS_ASC,
    S_HISTORY,
    S_AFTER,
    S_READ_POS,
    S_READ_MOVE,
    S_UNREAD,
    S_OB_INSERT,
    S_OB_FETCH,
    S_OB_KEYS,
    S_OB_DONE_GET,
    S_OB_DONE_SET,
    S_OB_ACQUIRE,
    S_OB_RENEW,
    S_OB_DEPTH_SET,
    S_OB_DEPTH_ALL,
    S_OB_RELEASE,
    S_COUNT
};

/* A shard's relay lease, in seconds: how long a crashed node's shards wait for a new owner. */
#define OB_LEASE_TTL_S 8
#define OB_LEASE_TTL_STR "8"

#define MSG_COLS \
    "message_id, user_from, message, client_id, created_at, edited_at, deleted, deleted_at"

static const char *const STMT_SQL[S_COUNT] = {
    [S_INSERT_BUCKET] = "INSERT INTO %s.chat_buckets (chat_id, bucket) VALUES (?, ?)",
    [S_INSERT_MSG] = "INSERT INTO %s.messages_by_chat (chat_id, bucket, message_id, user_from,"
                     " message, client_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
    [S_CLAIM] = "INSERT INTO %s.message_client_ids (chat_id, user_from, client_id, message_id,"
                " created_at) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS",
    [S_GET] = "SELECT " MSG_COLS " FROM %s.messages_by_chat"
              " WHERE chat_id = ? AND bucket = ? AND message_id = ?",
    [S_EDIT] = "UPDATE %s.messages_by_chat SET message = ?, edited_at = ?"
               " WHERE chat_id = ? AND bucket = ? AND message_id = ?"
               " IF user_from = ? AND deleted != true",
    [S_DELETE] = "UPDATE %s.messages_by_chat SET message = null, deleted = true, deleted_at = ?"
                 " WHERE chat_id = ? AND bucket = ? AND message_id = ?"
                 " IF user_from = ? AND deleted != true",
    [S_BUCKETS_DESC] = "SELECT bucket FROM %s.chat_buckets WHERE chat_id = ? AND bucket <= ?"
                       " LIMIT ?",
    [S_BUCKETS_ASC] = "SELECT bucket FROM %s.chat_buckets WHERE chat_id = ? AND bucket >= ?"
                      " ORDER BY bucket ASC LIMIT ?",
    [S_HISTORY] = "SELECT " MSG_COLS " FROM %s.messages_by_chat"
                  " WHERE chat_id = ? AND bucket = ? AND message_id < ? LIMIT ?",
    [S_AFTER] = "SELECT " MSG_COLS " FROM %s.messages_by_chat"
                " WHERE chat_id = ? AND bucket = ? AND message_id > ?"
                " ORDER BY message_id ASC LIMIT ?",
    /* Read positions (see the SCHEMA comment): the position is the largest message_id of
     * the (user, chat) slice; a move inserts the new id and drops the smaller ones, in one
     * single-partition batch, so it is atomic and the largest id ever written survives
     * whatever the order in which concurrent moves land. */
    [S_READ_POS] = "SELECT message_id FROM %s.read_positions WHERE user_id = ? AND chat_id = ?"
                   " LIMIT 1",
    [S_READ_MOVE] = "BEGIN UNLOGGED BATCH"
                    " INSERT INTO %1$s.read_positions (user_id, chat_id, message_id, updated_at)"
                    " VALUES (?, ?, ?, ?);"
                    " DELETE FROM %1$s.read_positions WHERE user_id = ? AND chat_id = ?"
                    " AND message_id < ?;"
                    " APPLY BATCH",
    [S_UNREAD] = "SELECT user_from, deleted FROM %s.messages_by_chat"
                 " WHERE chat_id = ? AND bucket = ? AND message_id > ? LIMIT ?",
    /* The outbox (see "the outbox" below). */
    [S_OB_INSERT] = "INSERT INTO %s.outbox (shard, bucket, seq, writer, chat_id, message_id, at,"
                    " event) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    [S_OB_FETCH] = "SELECT seq, writer, chat_id, message_id, at, event FROM %s.outbox"
                   " WHERE shard = ? AND bucket = ? AND (seq, writer) > (?, ?) AND seq < ?"
                   " LIMIT ?",
    [S_OB_KEYS] = "SELECT seq, writer FROM %s.outbox"
                  " WHERE shard = ? AND bucket = ? AND (seq, writer) > (?, ?) AND seq < ? LIMIT ?",
    [S_OB_DONE_GET] = "SELECT seq, writer FROM %s.outbox_done WHERE shard = ?",
    [S_OB_DONE_SET] = "UPDATE %s.outbox_done SET seq = ?, writer = ? WHERE shard = ?",
    [S_OB_ACQUIRE] = "INSERT INTO %s.outbox_lease (shard, owner) VALUES (?, ?) IF NOT EXISTS"
                     " USING TTL " OB_LEASE_TTL_STR,
    [S_OB_RENEW] = "UPDATE %s.outbox_lease USING TTL " OB_LEASE_TTL_STR
                   " SET owner = ? WHERE shard = ? IF owner = ?",
    [S_OB_DEPTH_SET] = "UPDATE %s.outbox_depth USING TTL 60 SET rows = ? WHERE shard = ?",
    [S_OB_DEPTH_ALL] = "SELECT shard, rows FROM %s.outbox_depth",
    [S_OB_RELEASE] = "DELETE FROM %s.outbox_lease WHERE shard = ? IF owner = ?",
};

/* The schema, applied in order by migrate; %1$s is the keyspace, %2$s the replication map.
 * schema/cassandra.cql holds the same statements for people and cqlsh (the tests create a
 * keyspace from each and compare the two). */
static const char *const SCHEMA[] = {
    "CREATE KEYSPACE IF NOT EXISTS %1$s WITH replication = %2$s",
    "CREATE TABLE IF NOT EXISTS %1$s.messages_by_chat ("
    " chat_id text, bucket int, message_id bigint,"
    " user_from text, message text, client_id text,"
    " created_at timestamp, edited_at timestamp, deleted boolean, deleted_at timestamp,"
    " PRIMARY KEY ((chat_id, bucket), message_id)"
    ") WITH CLUSTERING ORDER BY (message_id DESC)",
    "CREATE TABLE IF NOT EXISTS %1$s.chat_buckets ("
    " chat_id text, bucket int,"
    " PRIMARY KEY (chat_id, bucket)"
    ") WITH CLUSTERING ORDER BY (bucket DESC)",
    "CREATE TABLE IF NOT EXISTS %1$s.message_client_ids ("
    " chat_id text, user_from text, client_id text,"
    " message_id bigint, created_at timestamp,"
    " PRIMARY KEY ((chat_id, user_from, client_id))"
    ")",
    /* A read position is a max-register: each move adds its id as a row and removes the
     * smaller ones (S_READ_MOVE), the position is the largest row. A row is only ever
     * removed together with the write of a larger one, so the largest id written survives
     * any interleaving of two tabs on two nodes, with no lightweight transaction: no Paxos
     * round trips, and any consistency level. One partition per user: their chats side by
     * side, one slice each. */
    "CREATE TABLE IF NOT EXISTS %1$s.read_positions ("
    " user_id text, chat_id text, message_id bigint, updated_at timestamp,"
    " PRIMARY KEY ((user_id), chat_id, message_id)"
    ") WITH CLUSTERING ORDER BY (chat_id ASC, message_id DESC)",
    /* The Kafka outbox (see "the outbox" in store_cassandra.c and the README's architecture
     * section): events by (shard, minute), in seq order; each shard's relay progress; the
     * relaying node of each shard (a lease: a row with a TTL); each shard's depth as its
     * relay last counted it. Rows expire after 30 days, far past any refusal limit. */
    "CREATE TABLE IF NOT EXISTS %1$s.outbox ("
    " shard int, bucket bigint, seq bigint, writer bigint,"
    " chat_id text, message_id bigint, at timestamp, event blob,"
    " PRIMARY KEY ((shard, bucket), seq, writer)"
    ") WITH default_time_to_live = 2592000",
    "CREATE TABLE IF NOT EXISTS %1$s.outbox_done ("
    " shard int PRIMARY KEY, seq bigint, writer bigint)",
    "CREATE TABLE IF NOT EXISTS %1$s.outbox_lease ("
    " shard int PRIMARY KEY, owner bigint)",
    "CREATE TABLE IF NOT EXISTS %1$s.outbox_depth ("
    " shard int PRIMARY KEY, rows bigint)",
};
#define N_SCHEMA (sizeof SCHEMA / sizeof SCHEMA[0])
static const char *const TABLES[] = {"messages_by_chat", "chat_buckets", "message_client_ids",
                                     "read_positions",   "outbox",       "outbox_done",
                                     "outbox_lease",     "outbox_depth"};
#define N_TABLES (sizeof TABLES / sizeof TABLES[0])

typedef struct cass_op cass_op_t;
typedef struct ob ob_t;

/* An append's message row: ROW_WAIT while its id is not settled (the client_id claim is in
 * flight; it may turn out a duplicate with no row to write), ROW_READY to be written,
 * ROW_SENT in the batch in flight. Everything else is ROW_NONE: no row to write (any more). */
enum { ROW_NONE, ROW_WAIT, ROW_READY, ROW_SENT };

/* The writes of one chat in flight, in submission order. The callbacks go out in this
 * order, as the SQLite store's single writer does, so every member sees a chat's events in id
 * order and a sender's acknowledgements in the order it sent; and the message rows are
 * written from the front of it one batch at a time (chatq_pump), so they also become visible
 * in this order. */
typedef struct chatq {
    char *chat;
    uint32_t hash;
    queue_t ops;        /* cass_op_t.qlink */
    bool writing;       /* one write of message rows (a batch) of this chat is in flight */
    struct chatq *next; /* same hash slot */
} chatq_t;

#define CHATQ_SLOTS 1024

typedef struct cass_store {
    store_t base;
    cass_cfg_t cfg;
    cql_client_t *cql;
    cql_stmt_t *st[S_COUNT];
    size_t n_ops;                   /* in flight */
    cass_op_t *claims[CLAIM_SLOTS]; /* in-flight client_id claims, chained by claim_next */
    chatq_t *chatqs[CHATQ_SLOTS];
    /* (chat, bucket) pairs known to be in chat_buckets: "bucket\tchat" in a hash set */
    char **bcache;
    size_t bcache_n, bcache_cap;
    bool closing;
    void (*done)(void *);
    void *done_arg;
    ob_t *ob; /* the outbox, once enabled */
} cass_store_t;

struct cass_op {
    cass_store_t *s;
    store_req_t *req;
    bool in_submit;   /* the first step runs inside submit: a failure there is returned */
    bool finished;    /* outcome recorded, waiting for earlier writes of the chat */
    chatq_t *q;       /* writes only */
    queue_t qlink;    /* on q->ops */
    uint8_t row_at;   /* append: where its message row is (ROW_*) */
    cass_op_t *bnext; /* the next op of the same batch */
    int sync_fail;
    /* append */
    uint64_t id;
    int64_t created_at;
    int32_t bucket;
    char *claim_key;
    uint32_t claim_hash;
    cass_op_t *claim_next; /* the next claim in the same hash slot */
    cass_op_t *dups;       /* same key, waiting for this one to finish */
    cass_op_t *dup_next;
    /* the outbox: this change's event seq (0: none); a deferred answer (ob_defer) */
    int64_t ob_seq;
    int ob_then; /* the answer once its outbox row is written (0: the change's own) */
    queue_t dlink;
    int defer_status;
    /* edit/delete: the row before the change */
    store_msg_t row;
    cass_op_t *change_next; /* a later change of the same message, started when this ends */
    /* reads */
    int32_t buckets[BUCKETS_PER_QUERY];
    int n_buckets, bucket_i;
    bool more_buckets;
    int32_t bucket_bound;
    uint8_t *paging;
    int32_t paging_len;
    int limit;
    store_msg_t *msgs;
    size_t n_msgs, cap_msgs;
};

static int32_t bucket_of(uint64_t id) {
    int64_t t = id_time_ms(id);
    int64_t b = t >= 0 ? t / BUCKET_MS : -((-t + BUCKET_MS - 1) / BUCKET_MS);
    return (int32_t)b;
}

static uint32_t hash_str(const char *s) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

/* ---- the bucket cache ------------------------------------------------------------------------ */

static char *bucket_key(const char *chat, int32_t bucket) {
    size_t n = strlen(chat) + 16;
    char *k = malloc(n);
    if (k) snprintf(k, n, "%" PRId32 "\t%s", bucket, chat);
    return k;
}

static bool bcache_has(cass_store_t *s, const char *chat, int32_t bucket) {
    if (!s->bcache_n) return false;
    char *k = bucket_key(chat, bucket);
    if (!k) return false;
    size_t i = hash_str(k) & (s->bcache_cap - 1);
    bool found = false;
    for (; s->bcache[i]; i = (i + 1) & (s->bcache_cap - 1)) {
        if (strcmp(s->bcache[i], k) == 0) {
            found = true;
            break;
        }
    }
    free(k);
    return found;
}

static void bcache_clear(cass_store_t *s) {
    for (size_t i = 0; i < s->bcache_cap; i++) free(s->bcache[i]);
    free(s->bcache);
    s->bcache = NULL;
    s->bcache_n = s->bcache_cap = 0;
}

/* Remember a pair written to chat_buckets. Forgetting is always safe (one more idempotent
 * write), so a full cache is simply emptied. */
static void bcache_add(cass_store_t *s, const char *chat, int32_t bucket) {
    if (s->bcache_n >= BUCKET_CACHE_MAX) bcache_clear(s);
    if (!s->bcache) {
        s->bcache_cap = 1024;
        s->bcache = calloc(s->bcache_cap, sizeof *s->bcache);
        if (!s->bcache) {
            s->bcache_cap = 0;
            return;
        }
    }
    if ((s->bcache_n + 1) * 2 > s->bcache_cap) {
        size_t ncap = s->bcache_cap * 2;
        char **nt = calloc(ncap, sizeof *nt);
        if (!nt) return;
        for (size_t i = 0; i < s->bcache_cap; i++) {
            if (!s->bcache[i]) continue;
            size_t j = hash_str(s->bcache[i]) & (ncap - 1);
            while (nt[j]) j = (j + 1) & (ncap - 1);
            nt[j] = s->bcache[i];
        }
        free(s->bcache);
        s->bcache = nt;
        s->bcache_cap = ncap;
    }
    char *k = bucket_key(chat, bucket);
    if (!k) return;
    size_t i = hash_str(k) & (s->bcache_cap - 1);
    for (; s->bcache[i]; i = (i + 1) & (s->bcache_cap - 1)) {
        if (strcmp(s->bcache[i], k) == 0) {
            free(k);
            return;
        }
    }
    s->bcache[i] = k;
    s->bcache_n++;
}

/* ---- per-chat write order -------------------------------------------------------------------- */

static chatq_t *chatq_get(cass_store_t *s, const char *chat) {
    uint32_t h = hash_str(chat);
    chatq_t *q = s->chatqs[h % CHATQ_SLOTS];
    for (; q; q = q->next) {
        if (q->hash == h && strcmp(q->chat, chat) == 0) return q;
    }
    q = calloc(1, sizeof *q);
    if (!q || !(q->chat = strdup(chat))) {
        free(q);
        return NULL;
    }
    q->hash = h;
    queue_init(&q->ops);
    q->next = s->chatqs[h % CHATQ_SLOTS];
    s->chatqs[h % CHATQ_SLOTS] = q;
    return q;
}

static void chatq_free(cass_store_t *s, chatq_t *q) {
    chatq_t **pp = &s->chatqs[q->hash % CHATQ_SLOTS];
    while (*pp != q) pp = &(*pp)->next;
    *pp = q->next;
    free(q->chat);
    free(q);
}

/* Take op off its queue before it was delivered (a submit that failed at once). */
static void chatq_remove(cass_store_t *s, cass_op_t *op) {
    chatq_t *q = op->q;
    if (!q) return;
    queue_remove(&op->qlink);
    op->q = NULL;
    /* op was the tail (just added), so it held nothing back: no flush is due */
    if (queue_empty(&q->ops)) chatq_free(s, q);
}

/* ---- ops --------------------------------------------------------------------------------- */

static void store_finish_close(cass_store_t *s);
static void chatq_pump(cass_store_t *s, chatq_t *q);
static void append_bucket(cass_op_t *op);
static void append_start_claim(cass_op_t *op);
static void change_start(cass_op_t *op);

static void claim_unlink(cass_op_t *op) {
    if (!op->claim_key) return;
    cass_op_t **pp = &op->s->claims[op->claim_hash % CLAIM_SLOTS];
    while (*pp && *pp != op) pp = &(*pp)->claim_next;
    if (*pp) *pp = op->claim_next;
    op->claim_next = NULL;
}

static void op_free(cass_op_t *op) {
    free(op->claim_key);
    free(op->paging);
    store_msg_clear(&op->row);
    for (size_t i = 0; i < op->n_msgs; i++) store_msg_clear(&op->msgs[i]);
    free(op->msgs);
    free(op);
}

static int msg_copy(store_msg_t *dst, const store_msg_t *src) {
    memset(dst, 0, sizeof *dst);
    *dst = *src;
    dst->chat_id = dst->user_from = dst->message = dst->client_id = NULL;
    if ((src->chat_id && !(dst->chat_id = strdup(src->chat_id))) ||
        (src->user_from && !(dst->user_from = strdup(src->user_from))) ||
        (src->message && !(dst->message = strdup(src->message))) ||
        (src->client_id && !(dst->client_id = strdup(src->client_id)))) {
        store_msg_clear(dst);
        return CHAT_ENOMEM;
    }
    return 0;
}

/* Finish op: hand the outcome to the caller, then release what waited on it. */
/* Hand a finished op to its caller; the op is gone after this. */
static void op_deliver(cass_op_t *op) {
    cass_store_t *s = op->s;
    store_req_t *r = op->req;
    s->n_ops--;
    op_free(op);
    r->cb(r); /* may free r, submit more, or close the store */
}

/* Deliver, in submission order, the finished writes at the front of q. */
static void chatq_flush(cass_store_t *s, chatq_t *q) {
    while (!queue_empty(&q->ops)) {
        cass_op_t *op = queue_data(queue_head(&q->ops), cass_op_t, qlink);
        if (!op->finished) return;
        queue_remove(&op->qlink);
        bool last = queue_empty(&q->ops);
        if (last) chatq_free(s, q); /* a write submitted from the callback gets a new one */
        op->q = NULL;
        op_deliver(op);
        if (last) return;
    }
}

/* An op's outcome is known: record it, deliver it (a write waits for the earlier writes of
 * its chat), then answer the same-client_id sends that waited for it. */
static void op_done(cass_op_t *op, int status) {
    cass_store_t *s = op->s;
    store_req_t *r = op->req;
    claim_unlink(op);
    if (op->row_at == ROW_WAIT || op->row_at == ROW_READY) {
        /* no row to write after all (a duplicate, a failed claim): the rows behind it go */
        op->row_at = ROW_NONE;
        if (op->q) chatq_pump(s, op->q);
    }
    r->status = status;
    if (status) {
        store_msg_clear(&r->msg);
        r->duplicate = false;
    }
    if ((r->op == STORE_HISTORY || r->op == STORE_AFTER) && status == 0) {
        r->msgs = op->msgs;
        r->n_msgs = op->n_msgs;
        op->msgs = NULL;
        op->n_msgs = 0;
    }
    /* copied before delivery: the caller owns r once its callback runs */
    cass_op_t *dups = op->dups;
    op->dups = NULL;
    cass_op_t *next_change = op->change_next;
    op->change_next = NULL;
    store_msg_t orig = {0};
    bool have_orig = dups && status == 0 && msg_copy(&orig, &r->msg) == 0;
    op->finished = true;
    if (op->q) {
        chatq_flush(s, op->q);
    } else {
        op_deliver(op);
    }
    while (dups) {
        cass_op_t *d = dups;
        dups = d->dup_next;
        d->dup_next = NULL;
        if (have_orig && msg_copy(&d->req->msg, &orig) == 0) {
            d->req->duplicate = true;
            op_done(d, 0);
        } else {
            append_start_claim(d); /* the first one failed: this one tries for itself */
        }
    }
    store_msg_clear(&orig);
    if (next_change) change_start(next_change);
    if (s->closing && !s->n_ops) store_finish_close(s);
}

static void op_fail_cql(cass_op_t *op, const cql_result_t *res, const char *what) {
    store_req_t *r = op->req;
    log_error("store_cassandra_failed op=%s chat=%s id=%" PRIu64 " err=%s", what, r->chat_id, r->id,
              LOG_STR(res->message ? res->message : chat_strerror(res->status)));
    op_done(op, res->status == CHAT_ENOMEM ? CHAT_ENOMEM : CHAT_EIO);
}

/* Submit an EXECUTE for op; a synchronous failure finishes op with CHAT_EIO. */
static void op_exec(cass_op_t *op, int stmt, const cql_value_t *v, size_t n, const cql_params_t *p,
                    cql_cb cb) {
    int rc = cql_execute(op->s->cql, op->s->st[stmt], v, n, p, cb, op);
    if (rc && op->in_submit) {
        op->sync_fail = rc == CHAT_ENOMEM ? CHAT_ENOMEM : CHAT_EIO;
        return;
    }
    if (rc) {
        log_error("store_cassandra_submit_failed chat=%s err=%s", op->req->chat_id,
                  chat_strerror(rc));
        op_done(op, rc == CHAT_ENOMEM ? CHAT_ENOMEM : CHAT_EIO);
    }
}

/* Row (in MSG_COLS order) into m; chat is the chat_id (not a selected column). */
static int row_to_msg(const cql_rows_t *rows, int32_t i, const char *chat, store_msg_t *m) {
    memset(m, 0, sizeof *m);
    int64_t v;
    bool deleted = false;
    if (cql_cell_bigint(cql_rows_cell(rows, i, 0), &v)) return CHAT_EIO;
    m->id = (uint64_t)v;
    if (cql_cell_bigint(cql_rows_cell(rows, i, 4), &m->created_at) == CHAT_EPROTO ||
        cql_cell_bigint(cql_rows_cell(rows, i, 5), &m->edited_at) == CHAT_EPROTO ||
        cql_cell_bool(cql_rows_cell(rows, i, 6), &deleted) == CHAT_EPROTO ||
        cql_cell_bigint(cql_rows_cell(rows, i, 7), &m->deleted_at) == CHAT_EPROTO) {
        return CHAT_EIO;
    }
    /* a row marked deleted by another writer without a time still reads as deleted */
    if (deleted && !m->deleted_at) m->deleted_at = m->created_at ? m->created_at : 1;
    if (!(m->chat_id = strdup(chat)) || cql_cell_strdup(cql_rows_cell(rows, i, 1), &m->user_from) ||
        (!m->deleted_at && cql_cell_strdup(cql_rows_cell(rows, i, 2), &m->message)) ||
        cql_cell_strdup(cql_rows_cell(rows, i, 3), &m->client_id)) {
        store_msg_clear(m);
        return CHAT_ENOMEM;
    }
    if (!m->user_from && !(m->user_from = strdup(""))) {
        store_msg_clear(m);
        return CHAT_ENOMEM;
    }
    return 0;
}

static bool rows_ok(const cql_result_t *res, int min_cols) {
    return res->resp && res->resp->kind == CQL_RESULT_ROWS && res->resp->rows.n_cols >= min_cols;
}

/* The [applied] column of a lightweight transaction's answer. */
static int lwt_applied(const cql_result_t *res, bool *applied) {
    if (!rows_ok(res, 1) || res->resp->rows.n_rows < 1) return CHAT_EIO;
    int col = cql_rows_col(&res->resp->rows, "[applied]");
    if (col < 0) col = 0;
    return cql_cell_bool(cql_rows_cell(&res->resp->rows, 0, col), applied) ? CHAT_EIO : 0;
}

/* ---- the outbox (chatd --kafka, src/stream/) ---------------------------------------------
 *
 * Every change that succeeds also leaves its event in the outbox table, durable before the
 * change is acknowledged: an append's event goes in the same LOGGED BATCH as its message row
 * (the batch log makes the pair all or nothing); an edit's or a delete's is written right
 * after its lightweight transaction applied (a conditional update cannot share a batch
 * with another partition), before the answer. The row's key is (shard, minute of seq),
 * seq, writer: shard = FNV-1a(chat_id) % OB_SHARDS keeps a chat's events in one shard;
 * seq is minted by this node at submit (milliseconds << 20 | a counter), so a chat's events
 * from one node are in submission order, which is the order its members get them; writer
 * (a random id per process) keeps two nodes' equal seqs apart.
 *
 * Relaying: a node relays the shards it holds a lease on (outbox_lease, INSERT IF NOT EXISTS
 * with a TTL, renewed by UPDATE IF owner = us), so a crashed node's shards move to another
 * one within OB_LEASE_TTL_S. It reads each shard's rows in key order from its progress
 * (outbox_done), but only those older than OB_HORIZON_MS: a write still in flight, on this
 * node or another, carries a seq from before it lands, and a reader must not pass it.
 * A write that took longer than the horizon allows is reported failed, never acknowledged.
 * Progress moves only over rows Kafka acknowledged: a crash or a lost lease produces
 * again (at least once), never skips.
 *
 * The relay (src/stream/) sees one sequence: its seq is a cursor local to this process
 * (rows handed out, in order, kept here until it deletes through them, so that it can ask
 * again after a failure), and the record's version is the row's seq, which orders the
 * changes of one message across runs and nodes. Depth (for --outbox-max-rows and
 * /metrics): each lease holder counts its shards' rows past their progress and publishes
 * the counts (outbox_depth); a node adds the others' counts and its own recent writes.
 */
#define OB_SHARDS 16
#define OB_BUCKET_MS 60000LL
#define OB_HORIZON_MS 5000
#define OB_WRITE_TIMEOUT_MS 2000
#define OB_CYCLE_MS 1000
#define OB_SWEEP_MS 500
#define OB_PAGE 512
#define OB_COUNT_PAGE 5000
#define OB_COUNT_PAGES 20
#define OB_START_BACK_MS 60000
#define OB_BATCH_MAX 32
#define OB_BATCH_BYTES (16u << 10)
#define OB_SEQ_SHIFT 20
#define OB_PUBLISH_MS 20000 /* a count is republished this often (its row's TTL: 60 s) */
#define OB_PAIR_VALS 15

typedef struct ob_key {
    int64_t seq, writer;
} ob_key_t;

typedef struct ob_row {
    ob_key_t key;
    int shard;
    uint64_t rseq; /* the relay's cursor, once handed out */
    int64_t message_id, at;
    char *chat_id;
    char *event;
    size_t event_len;
} ob_row_t;

/* A queue of rows: [head, head + n) of v. */
typedef struct ob_rows {
    ob_row_t **v;
    size_t head, n, cap;
} ob_rows_t;

typedef struct ob_shard {
    ob_t *ob;
    int idx;
    bool owned, leasing, fetching, counting;
    /* bumped when the lease is lost: the answers of reads and counts sent under the old one
     * (fetch_gen, count_gen) are dropped, not applied to the state of a new one */
    unsigned gen, fetch_gen, count_gen;
    int64_t lease_sent, lease_until;
    ob_key_t done; /* progress: every row up to it reached Kafka */
    ob_key_t scan; /* the last row read */
    int64_t scan_bucket;
    bool full; /* the last read stopped at a full page */
    size_t in_ready;
    ob_key_t count_key; /* rows after done up to it are counted in count_n */
    int64_t count_bucket, count_n, published_n, published_at;
    int count_pages;
    int64_t others_n; /* a shard we do not hold: its holder's published count */
} ob_shard_t;

struct ob {
    cass_store_t *s;
    store_outbox_opts_t o;
    int64_t writer, last_seq;
    uint64_t rseq;
    ob_shard_t sh[OB_SHARDS];
    ob_rows_t ready, handed;
    int sweeping, counting;
    int64_t horizon, last_sweep, count_bound, pass_bound;
    cass_op_t *parked; /* an OUTBOX_READ waiting for the sweep in flight */
    int64_t *recent;   /* seqs of this node's rows written since pass_bound */
    size_t n_recent, cap_recent;
    cql_stmt_t *pair[OB_BATCH_MAX + 1];
    uv_timer_t cycle, defer;
    int handles, releasing;
    bool handles_closing;
    queue_t deferred; /* cass_op_t.dlink: answers for the next loop turn */
    unsigned cycles;
    int64_t last_err_log;
    uint64_t refused, written, depth; /* read by outbox_stats: atomics */
};

static int64_t ob_floor(int64_t ms) { return (ms - ID_EPOCH_MS) << OB_SEQ_SHIFT; }
static int64_t ob_seq_ms(int64_t seq) { return (seq >> OB_SEQ_SHIFT) + ID_EPOCH_MS; }
static int64_t ob_bucket(int64_t seq) { return ob_seq_ms(seq) / OB_BUCKET_MS; }
static int ob_shard_of(const char *chat) { return (int)(hash_str(chat) % OB_SHARDS); }

static int ob_key_cmp(ob_key_t a, ob_key_t b) {
    if (a.seq != b.seq) return a.seq < b.seq ? -1 : 1;
    return a.writer < b.writer ? -1 : a.writer > b.writer;
}

/* The next seq of this node: never below the clock, strictly increasing. */
static int64_t ob_mint(ob_t *ob) {
    int64_t v = ob_floor(time_now_ms());
    if (v <= ob->last_seq) v = ob->last_seq + 1;
    ob->last_seq = v;
    return v;
}

static void ob_row_free(ob_row_t *r) {
    if (!r) return;
    free(r->chat_id);
    free(r->event);
    free(r);
}

static int ob_rows_push(ob_rows_t *q, ob_row_t *r) {
    if (q->head + q->n == q->cap) {
        if (q->head) {
            memmove(q->v, q->v + q->head, q->n * sizeof *q->v);
            q->head = 0;
        }
        if (q->n == q->cap) {
            size_t ncap = q->cap ? q->cap * 2 : 256;
            ob_row_t **nv = realloc(q->v, ncap * sizeof *nv);
            if (!nv) return CHAT_ENOMEM;
            q->v = nv;
            q->cap = ncap;
        }
    }
    q->v[q->head + q->n++] = r;
    return 0;
}

static ob_row_t *ob_rows_at(ob_rows_t *q, size_t i) { return q->v[q->head + i]; }

static ob_row_t *ob_rows_pop(ob_rows_t *q) {
    ob_row_t *r = q->v[q->head++];
    if (--q->n == 0) q->head = 0;
    return r;
}

static void ob_rows_free(ob_rows_t *q) {
    while (q->n) ob_row_free(ob_rows_pop(q));
    free(q->v);
    memset(q, 0, sizeof *q);
}

static void ob_depth_update(ob_t *ob) {
    int64_t d = (int64_t)ob->n_recent;
    for (int i = 0; i < OB_SHARDS; i++)
        d += ob->sh[i].owned ? ob->sh[i].count_n : ob->sh[i].others_n;
    __atomic_store_n(&ob->depth, (uint64_t)(d < 0 ? 0 : d), __ATOMIC_RELAXED);
}

static bool ob_full(ob_t *ob) {
    return ob->o.max_rows && __atomic_load_n(&ob->depth, __ATOMIC_RELAXED) >= ob->o.max_rows;
}

/* A row of ours is durable: counted until a count pass covers it. */
static void ob_written(ob_t *ob, int64_t seq) {
    __atomic_add_fetch(&ob->written, 1, __ATOMIC_RELAXED);
    if (seq < ob->pass_bound) return;
    if (ob->n_recent == ob->cap_recent) {
        size_t ncap = ob->cap_recent ? ob->cap_recent * 2 : 1024;
        int64_t *nv = realloc(ob->recent, ncap * sizeof *nv);
        if (!nv) return; /* the depth undercounts it for a moment: the count pass finds it */
        ob->recent = nv;
        ob->cap_recent = ncap;
    }
    ob->recent[ob->n_recent++] = seq;
    ob_depth_update(ob);
}

/* Log a failed internal request, at most once per 10 s. */
static void ob_log_err(ob_t *ob, const char *what, const cql_result_t *res) {
    int64_t now = time_now_ms();
    if (now - ob->last_err_log < 10000) return;
    ob->last_err_log = now;
    log_warn("store_cassandra_outbox_failed op=%s err=%s", what,
             LOG_STR(res->message ? res->message : chat_strerror(res->status)));
}

/* ---- deferred answers: a callback never runs inside submit ---- */

static void ob_on_defer(uv_timer_t *t) {
    ob_t *ob = t->data;
    while (!queue_empty(&ob->deferred)) {
        cass_op_t *op = queue_data(queue_head(&ob->deferred), cass_op_t, dlink);
        queue_remove(&op->dlink);
        op_done(op, op->defer_status);
    }
}

static void ob_defer(ob_t *ob, cass_op_t *op, int status) {
    op->defer_status = status;
    queue_insert_tail(&ob->deferred, &op->dlink);
    if (!uv_is_active((uv_handle_t *)&ob->defer)) uv_timer_start(&ob->defer, ob_on_defer, 0, 0);
}

/* ---- the writes' side ---- */

/* The statement that writes n message rows and their n outbox rows in one LOGGED BATCH. */
static cql_stmt_t *ob_pair_stmt(cass_store_t *s, size_t n) {
    ob_t *ob = s->ob;
    if (ob->pair[n]) return ob->pair[n];
    sbuf_t q = {0};
    sbuf_puts(&q, "BEGIN BATCH ");
    for (size_t i = 0; i < n; i++) {
        sbuf_printf(&q,
                    "INSERT INTO %1$s.messages_by_chat (chat_id, bucket, message_id, user_from,"
                    " message, client_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?);"
                    " INSERT INTO %1$s.outbox (shard, bucket, seq, writer, chat_id, message_id,"
                    " at, event) VALUES (?, ?, ?, ?, ?, ?, ?, ?); ",
                    s->cfg.keyspace);
    }
    sbuf_puts(&q, "APPLY BATCH");
    sbuf_put(&q, "", 1);
    if (!q.oom) ob->pair[n] = cql_stmt_new(s->cql, q.p);
    sbuf_free(&q);
    return ob->pair[n];
}

/* The 8 values of op's outbox row; event is the encoded event. */
static void ob_row_vals(cass_op_t *op, const store_msg_t *m, const char *event, size_t len,
                        cql_value_t *v) {
    ob_t *ob = op->s->ob;
    v[0] = cql_int(ob_shard_of(m->chat_id));
    v[1] = cql_bigint(ob_bucket(op->ob_seq));
    v[2] = cql_bigint(op->ob_seq);
    v[3] = cql_bigint(ob->writer);
    v[4] = cql_text(m->chat_id);
    v[5] = cql_bigint((int64_t)m->id);
    v[6] = cql_timestamp(op->req->op == STORE_APPEND ? m->created_at : op->req->at);
    v[7] = cql_blob(event, len);
}

/* A write carrying outbox rows minted at seq came back at status: too late for the relay's
 * horizon, it must not be acknowledged (a reader may have passed its seq). */
static int ob_write_status(ob_t *ob, int64_t seq, int status, const char **why) {
    if (status) return status;
    if (time_now_ms() - ob_seq_ms(seq) > OB_HORIZON_MS - 1000) {
        *why = "the write with its outbox row took longer than the relay's horizon";
        return CHAT_EIO;
    }
    (void)ob;
    return 0;
}

static void ob_on_change_written(const cql_result_t *res, void *data) {
    cass_op_t *op = data;
    ob_t *ob = op->s->ob;
    const char *why = res->message;
    int st = ob_write_status(ob, op->ob_seq, res->status ? CHAT_EIO : 0, &why);
    if (st) {
        log_error("store_cassandra_failed op=outbox chat=%s id=%" PRIu64 " err=%s",
                  op->req->chat_id, op->req->id, LOG_STR(why ? why : chat_strerror(st)));
        return op_done(op, st);
    }
    ob_written(ob, op->ob_seq);
    op_done(op, op->ob_then);
}

/* An edit or delete applied (kind: r->op), or a retried send answered with the stored
 * message (kind: its state): the event into the outbox, then the answer. */
static void ob_write_event(cass_op_t *op, store_op_t kind) {
    cass_store_t *s = op->s;
    store_req_t *r = op->req;
    sbuf_t ev = {0};
    s->ob->o.encode(&ev, kind, &r->msg);
    if (ev.oom) {
        sbuf_free(&ev);
        return op_done(op, CHAT_ENOMEM);
    }
    cql_value_t v[8];
    ob_row_vals(op, &r->msg, ev.p, ev.len, v);
    cql_params_t p = CQL_PARAMS_DEFAULT;
    p.timeout_ms = OB_WRITE_TIMEOUT_MS;
    int rc = cql_execute(s->cql, s->st[S_OB_INSERT], v, 8, &p, ob_on_change_written, op);
    sbuf_free(&ev);
    if (rc) op_done(op, rc == CHAT_ENOMEM ? CHAT_ENOMEM : CHAT_EIO);
}

/* ---- the relay's side: leases, reads, progress, counts ---- */

static void ob_lose(ob_shard_t *sh, const char *why) {
    ob_t *ob = sh->ob;
    if (!sh->owned) return;
    sh->owned = false;
    sh->gen++;
    sh->count_n = 0;
    /* rows read and not handed out go; handed ones stay with the relay (produced, they only
     * make duplicates for the next holder) */
    if (sh->in_ready) {
        ob_rows_t keep = {0};
        while (ob->ready.n) {
            ob_row_t *r = ob_rows_pop(&ob->ready);
            if (r->shard == sh->idx || ob_rows_push(&keep, r)) ob_row_free(r);
        }
        ob_rows_free(&ob->ready);
        ob->ready = keep;
        sh->in_ready = 0;
    }
    log_info("outbox_shard_released shard=%d reason=%s", sh->idx, why);
    ob_depth_update(ob);
}

static int ob_cell_key(const cql_rows_t *rows, int32_t i, ob_key_t *k) {
    return cql_cell_bigint(cql_rows_cell(rows, i, 0), &k->seq) ||
                   cql_cell_bigint(cql_rows_cell(rows, i, 1), &k->writer)
               ? CHAT_EIO
               : 0;
}

static void ob_sweep_done(ob_t *ob);
static void ob_fetch(ob_shard_t *sh);

static void ob_fetch_end(ob_shard_t *sh) {
    ob_t *ob = sh->ob;
    sh->fetching = false;
    if (--ob->sweeping == 0) ob_sweep_done(ob);
}

static void ob_on_fetched(const cql_result_t *res, void *data) {
    ob_shard_t *sh = data;
    ob_t *ob = sh->ob;
    if (ob->s->closing || res->status || !rows_ok(res, 6) || !sh->owned ||
        sh->fetch_gen != sh->gen) {
        if (res->status && !ob->s->closing) ob_log_err(ob, "read", res);
        return ob_fetch_end(sh);
    }
    const cql_rows_t *rows = &res->resp->rows;
    for (int32_t i = 0; i < rows->n_rows; i++) {
        ob_row_t *r = calloc(1, sizeof *r);
        cql_str_t ev;
        if (!r || ob_cell_key(rows, i, &r->key) ||
            cql_cell_strdup(cql_rows_cell(rows, i, 2), &r->chat_id) || !r->chat_id ||
            cql_cell_bigint(cql_rows_cell(rows, i, 3), &r->message_id) ||
            cql_cell_text(cql_rows_cell(rows, i, 5), &ev) || !(r->event = malloc(ev.n + 1))) {
            /* read again from the last good row next time */
            ob_row_free(r);
            return ob_fetch_end(sh);
        }
        cql_cell_bigint(cql_rows_cell(rows, i, 4), &r->at);
        memcpy(r->event, ev.p, ev.n);
        r->event[ev.n] = '\0';
        r->event_len = ev.n;
        r->shard = sh->idx;
        if (ob_rows_push(&ob->ready, r)) {
            ob_row_free(r);
            return ob_fetch_end(sh);
        }
        sh->scan = r->key;
        sh->in_ready++;
    }
    sh->full = rows->n_rows == OB_PAGE;
    if (!sh->full && sh->scan_bucket < ob_bucket(ob->horizon - 1)) {
        sh->scan_bucket++; /* a minute wholly behind the horizon is read to its end */
        return ob_fetch(sh);
    }
    ob_fetch_end(sh);
}

static void ob_fetch(ob_shard_t *sh) {
    ob_t *ob = sh->ob;
    cql_value_t v[] = {cql_int(sh->idx),         cql_bigint(sh->scan_bucket),
                       cql_bigint(sh->scan.seq), cql_bigint(sh->scan.writer),
                       cql_bigint(ob->horizon),  cql_int(OB_PAGE)};
    if (cql_execute(ob->s->cql, ob->s->st[S_OB_FETCH], v, 6, NULL, ob_on_fetched, sh))
        ob_fetch_end(sh);
}

/* Read the next rows of every shard held, up to the horizon. */
static void ob_sweep(ob_t *ob) {
    ob->horizon = ob_floor(time_now_ms() - OB_HORIZON_MS);
    ob->sweeping = 1; /* held while starting, so that a synchronous end does not finish it */
    for (int i = 0; i < OB_SHARDS; i++) {
        ob_shard_t *sh = &ob->sh[i];
        if (!sh->owned || sh->fetching || sh->in_ready >= OB_PAGE) continue;
        sh->fetching = true;
        sh->fetch_gen = sh->gen;
        ob->sweeping++;
        ob_fetch(sh);
    }
    if (--ob->sweeping == 0) ob_sweep_done(ob);
}

/* Answer an OUTBOX_READ (after r->id, up to r->limit rows) from what is here. */
static int ob_answer_read(ob_t *ob, store_req_t *r) {
    size_t limit = r->limit > 0 ? (size_t)r->limit : 1;
    size_t from = 0, n = 0;
    ob_rows_t *src;
    if (r->id < ob->rseq && ob->handed.n) {
        /* asked again (the relay restarts from its last acknowledged row): rows handed out
         * are consecutive in rseq */
        uint64_t first = ob_rows_at(&ob->handed, 0)->rseq;
        from = r->id + 1 > first ? (size_t)(r->id + 1 - first) : 0;
        src = &ob->handed;
        n = src->n > from ? src->n - from : 0;
    } else {
        src = &ob->ready;
        n = src->n;
    }
    if (n > limit) n = limit;
    if (!n) return 0;
    store_outbox_row_t *out = calloc(n, sizeof *out);
    if (!out) return CHAT_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        ob_row_t *x = ob_rows_at(src, from + i);
        out[i].chat_id = strdup(x->chat_id);
        out[i].event = malloc(x->event_len + 1);
        if (!out[i].chat_id || !out[i].event) {
            r->rows = out;
            r->n_rows = i + 1;
            return CHAT_ENOMEM; /* store_req_cleanup frees them */
        }
        memcpy(out[i].event, x->event, x->event_len + 1);
        out[i].event_len = x->event_len;
        out[i].message_id = (uint64_t)x->message_id;
        out[i].at = x->at;
        out[i].version = (uint64_t)x->key.seq;
    }
    if (src == &ob->ready) {
        for (size_t i = 0; i < n; i++) {
            ob_row_t *x = ob_rows_pop(&ob->ready);
            x->rseq = ++ob->rseq;
            ob->sh[x->shard].in_ready--;
            if (ob_rows_push(&ob->handed, x)) {
                ob_row_free(x); /* it was never handed: read again after a restart */
                ob->rseq--;
                n = i;
                break;
            }
        }
    }
    /* the seqs: consecutive from the first row's */
    uint64_t first = src == &ob->ready ? ob->rseq - n + 1 : ob_rows_at(src, from)->rseq;
    for (size_t i = 0; i < n; i++) out[i].seq = first + i;
    r->rows = out;
    r->n_rows = n;
    return 0;
}

static void ob_sweep_done(ob_t *ob) {
    ob->last_sweep = time_now_ms();
    cass_op_t *op = ob->parked;
    if (!op) return;
    /* a backlog: fill the relay's read (it asks again at once only after a full one) */
    bool more = false;
    for (int i = 0; i < OB_SHARDS; i++)
        more |= ob->sh[i].owned && ob->sh[i].full && ob->sh[i].in_ready < OB_PAGE;
    if (more && !ob->s->closing && ob->ready.n < (size_t)op->req->limit) return ob_sweep(ob);
    ob->parked = NULL;
    ob_defer(ob, op, ob_answer_read(ob, op->req));
}

static void ob_read(ob_t *ob, cass_op_t *op) {
    store_req_t *r = op->req;
    bool any_full = false;
    for (int i = 0; i < OB_SHARDS; i++) any_full |= ob->sh[i].owned && ob->sh[i].full;
    if ((r->id < ob->rseq && ob->handed.n) || ob->ready.n || ob->parked || ob->s->closing ||
        (!ob->sweeping && !any_full && time_now_ms() - ob->last_sweep < OB_SWEEP_MS)) {
        return ob_defer(ob, op, ob_answer_read(ob, r));
    }
    ob->parked = op;
    if (!ob->sweeping) ob_sweep(ob);
}

static void ob_on_done_set(const cql_result_t *res, void *data) {
    cass_op_t *op = data;
    if (res->status) {
        ob_log_err(op->s->ob, "progress", res);
        op->defer_status = CHAT_EIO;
    }
    if (--op->limit == 0) op_done(op, op->defer_status);
}

/* OUTBOX_DELETE through r->id: Kafka has every row handed out up to it. */
static void ob_delete(ob_t *ob, cass_op_t *op) {
    bool touched[OB_SHARDS] = {0};
    while (ob->handed.n && ob_rows_at(&ob->handed, 0)->rseq <= op->req->id) {
        ob_row_t *x = ob_rows_pop(&ob->handed);
        ob_shard_t *sh = &ob->sh[x->shard];
        if (ob_key_cmp(x->key, sh->done) > 0) sh->done = x->key;
        if (ob_key_cmp(x->key, sh->count_key) <= 0) {
            if (sh->count_n > 0) sh->count_n--;
        } else {
            sh->count_key = x->key; /* relayed before it was counted */
            sh->count_bucket = ob_bucket(x->key.seq);
        }
        touched[x->shard] = true;
        ob_row_free(x);
    }
    ob_depth_update(ob);
    op->limit = 1;
    op->defer_status = 0;
    for (int i = 0; i < OB_SHARDS; i++) {
        if (!touched[i]) continue;
        cql_value_t v[] = {cql_bigint(ob->sh[i].done.seq), cql_bigint(ob->sh[i].done.writer),
                           cql_int(i)};
        if (cql_execute(ob->s->cql, ob->s->st[S_OB_DONE_SET], v, 3, NULL, ob_on_done_set, op) == 0)
            op->limit++;
        else op->defer_status = CHAT_EIO;
    }
    if (--op->limit == 0) ob_defer(ob, op, op->defer_status);
}

static void ob_on_loaded(const cql_result_t *res, void *data) {
    ob_shard_t *sh = data;
    ob_t *ob = sh->ob;
    sh->leasing = false;
    if (ob->s->closing) return;
    ob_key_t done = {ob_floor(time_now_ms() - OB_START_BACK_MS), 0};
    if (res->status || !rows_ok(res, 2) ||
        (res->resp->rows.n_rows > 0 && ob_cell_key(&res->resp->rows, 0, &done))) {
        ob_log_err(ob, "load", res);
        return; /* the lease runs out; another attempt later */
    }
    sh->owned = true;
    sh->done = sh->scan = sh->count_key = done;
    sh->scan_bucket = sh->count_bucket = ob_bucket(done.seq);
    sh->count_n = 0;
    sh->full = true; /* a backlog may wait: read at once */
    log_info("outbox_shard_acquired shard=%d done_seq=%" PRId64, sh->idx, done.seq);
}

static void ob_on_lease(const cql_result_t *res, void *data) {
    ob_shard_t *sh = data;
    ob_t *ob = sh->ob;
    if (ob->s->closing) return;
    bool applied = false;
    if (res->status || lwt_applied(res, &applied)) {
        sh->leasing = false;
        if (res->status) ob_log_err(ob, "lease", res);
        return;
    }
    if (sh->owned) {
        sh->leasing = false;
        if (applied) sh->lease_until = sh->lease_sent + OB_LEASE_TTL_S * 1000 - 2000;
        else ob_lose(sh, "taken");
        return;
    }
    if (!applied) {
        sh->leasing = false;
        return;
    }
    sh->lease_until = sh->lease_sent + OB_LEASE_TTL_S * 1000 - 2000;
    cql_value_t v[] = {cql_int(sh->idx)};
    if (cql_execute(ob->s->cql, ob->s->st[S_OB_DONE_GET], v, 1, NULL, ob_on_loaded, sh))
        sh->leasing = false;
}

static void ob_count(ob_shard_t *sh);
static void ob_on_published(const cql_result_t *res, void *data);

static void ob_count_end(ob_shard_t *sh) {
    ob_t *ob = sh->ob;
    sh->counting = false;
    if (--ob->counting) return;
    /* the pass is complete: what this node wrote before its bound is counted by now */
    ob->pass_bound = ob->count_bound;
    size_t k = 0;
    for (size_t i = 0; i < ob->n_recent; i++)
        if (ob->recent[i] >= ob->pass_bound) ob->recent[k++] = ob->recent[i];
    ob->n_recent = k;
    for (int i = 0; i < OB_SHARDS; i++) {
        ob_shard_t *x = &ob->sh[i];
        /* again before the row's TTL ends, unchanged or not: a backlog that stands still
         * while Kafka is away must stay in every node's depth */
        int64_t now = time_now_ms();
        if (!x->owned || ob->s->closing ||
            (x->count_n == x->published_n && now - x->published_at < OB_PUBLISH_MS))
            continue;
        x->published_n = x->count_n;
        x->published_at = now;
        cql_value_t v[] = {cql_bigint(x->count_n), cql_int(i)};
        cql_execute(ob->s->cql, ob->s->st[S_OB_DEPTH_SET], v, 2, NULL, ob_on_published, ob);
    }
    ob_depth_update(ob);
}

static void ob_on_published(const cql_result_t *res, void *data) {
    ob_t *ob = data;
    if (res->status && !ob->s->closing) ob_log_err(ob, "publish", res);
}

static void ob_on_counted(const cql_result_t *res, void *data) {
    ob_shard_t *sh = data;
    ob_t *ob = sh->ob;
    if (ob->s->closing || res->status || !rows_ok(res, 2) || !sh->owned ||
        sh->count_gen != sh->gen) {
        if (res->status && !ob->s->closing) ob_log_err(ob, "count", res);
        return ob_count_end(sh);
    }
    const cql_rows_t *rows = &res->resp->rows;
    ob_key_t k;
    for (int32_t i = 0; i < rows->n_rows; i++) {
        if (ob_cell_key(rows, i, &k)) return ob_count_end(sh);
        if (ob_key_cmp(k, sh->count_key) <= 0) continue; /* relayed meanwhile */
        sh->count_key = k;
        sh->count_n++;
    }
    if (rows->n_rows == OB_COUNT_PAGE && ++sh->count_pages < OB_COUNT_PAGES) return ob_count(sh);
    if (rows->n_rows < OB_COUNT_PAGE && sh->count_bucket < ob_bucket(ob->count_bound - 1)) {
        sh->count_bucket++;
        return ob_count(sh);
    }
    ob_count_end(sh);
}

static void ob_count(ob_shard_t *sh) {
    ob_t *ob = sh->ob;
    cql_value_t v[] = {cql_int(sh->idx),
                       cql_bigint(sh->count_bucket),
                       cql_bigint(sh->count_key.seq),
                       cql_bigint(sh->count_key.writer),
                       cql_bigint(ob->count_bound),
                       cql_int(OB_COUNT_PAGE)};
    if (cql_execute(ob->s->cql, ob->s->st[S_OB_KEYS], v, 6, NULL, ob_on_counted, sh))
        ob_count_end(sh);
}

static void ob_on_depths(const cql_result_t *res, void *data) {
    ob_t *ob = data;
    if (ob->s->closing || res->status || !rows_ok(res, 2)) return;
    int64_t n[OB_SHARDS] = {0};
    const cql_rows_t *rows = &res->resp->rows;
    for (int32_t i = 0; i < rows->n_rows; i++) {
        int32_t sh;
        int64_t v;
        if (cql_cell_int(cql_rows_cell(rows, i, 0), &sh) == 0 && sh >= 0 && sh < OB_SHARDS &&
            cql_cell_bigint(cql_rows_cell(rows, i, 1), &v) == 0)
            n[sh] = v;
    }
    for (int i = 0; i < OB_SHARDS; i++) ob->sh[i].others_n = n[i];
    ob_depth_update(ob);
}

/* Every OB_CYCLE_MS: leases (every other cycle), a count pass, the others' counts. */
static void ob_on_cycle(uv_timer_t *t) {
    ob_t *ob = t->data;
    cass_store_t *s = ob->s;
    if (s->closing) return;
    int64_t now = time_now_ms();
    bool leases = ob->cycles++ % 2 == 0;
    for (int i = 0; i < OB_SHARDS; i++) {
        ob_shard_t *sh = &ob->sh[i];
        if (sh->owned && now >= sh->lease_until) ob_lose(sh, "lease_expired");
        if (!leases || sh->leasing) continue;
        sh->leasing = true;
        sh->lease_sent = now;
        int rc;
        if (sh->owned) {
            cql_value_t v[] = {cql_bigint(ob->writer), cql_int(i), cql_bigint(ob->writer)};
            rc = cql_execute(s->cql, s->st[S_OB_RENEW], v, 3, NULL, ob_on_lease, sh);
        } else {
            cql_value_t v[] = {cql_int(i), cql_bigint(ob->writer)};
            rc = cql_execute(s->cql, s->st[S_OB_ACQUIRE], v, 2, NULL, ob_on_lease, sh);
        }
        if (rc) sh->leasing = false;
    }
    if (!ob->counting) {
        ob->count_bound = ob_floor(now - OB_HORIZON_MS);
        ob->counting = 1;
        for (int i = 0; i < OB_SHARDS; i++) {
            ob_shard_t *sh = &ob->sh[i];
            if (!sh->owned || sh->counting) continue;
            sh->counting = true;
            sh->count_gen = sh->gen;
            sh->count_pages = 0;
            ob->counting++;
            ob_count(sh);
        }
        ob_shard_t dummy = {.ob = ob};
        ob_count_end(&dummy); /* the hold taken above */
    }
    cql_execute(s->cql, s->st[S_OB_DEPTH_ALL], NULL, 0, NULL, ob_on_depths, ob);
}

static void ob_on_handle_closed(uv_handle_t *h) {
    ob_t *ob = h->data;
    if (--ob->handles == 0 && !ob->releasing) store_finish_close(ob->s);
}

static void ob_on_released(const cql_result_t *res, void *data) {
    ob_t *ob = data;
    if (res->status) ob_log_err(ob, "release", res);
    if (--ob->releasing == 0 && !ob->handles) store_finish_close(ob->s);
}

/* Closing, once every request is answered: give the shards' leases back (so that another
 * node relays them at its next attempt, not once they run out), close the handles. True
 * while any of that is under way (its end calls store_finish_close again). */
static bool ob_closing(ob_t *ob) {
    if (!ob->handles_closing) {
        ob->handles_closing = true;
        cql_params_t p = CQL_PARAMS_DEFAULT;
        p.timeout_ms = OB_WRITE_TIMEOUT_MS;
        for (int i = 0; i < OB_SHARDS; i++) {
            if (!ob->sh[i].owned) continue;
            cql_value_t v[] = {cql_int(i), cql_bigint(ob->writer)};
            if (cql_execute(ob->s->cql, ob->s->st[S_OB_RELEASE], v, 2, &p, ob_on_released, ob) == 0)
                ob->releasing++;
        }
        uv_close((uv_handle_t *)&ob->cycle, ob_on_handle_closed);
        uv_close((uv_handle_t *)&ob->defer, ob_on_handle_closed);
    }
    return ob->handles || ob->releasing;
}

static void ob_free(ob_t *ob) {
    if (!ob) return;
    ob_rows_free(&ob->ready);
    ob_rows_free(&ob->handed);
    free(ob->recent);
    free(ob);
}

/* ---- append ------------------------------------------------------------------------------ */

static void append_fill(cass_op_t *op) {
    store_req_t *r = op->req;
    store_msg_t *m = &r->msg;
    store_msg_clear(m);
    m->id = op->id;
    m->created_at = op->created_at;
    if (!(m->chat_id = strdup(r->chat_id)) || !(m->user_from = strdup(r->user)) ||
        !(m->message = strdup(r->text)) ||
        (r->client_id && !(m->client_id = strdup(r->client_id)))) {
        /* the message is stored; the answer cannot be built. A retry with the client_id
         * finds it; without one, this is an honest failure report */
        store_msg_clear(m);
        op_done(op, CHAT_ENOMEM);
        return;
    }
    r->duplicate = false;
    op_done(op, 0);
}

/* ---- order of visibility: one batch of message rows in flight per chat ------------------- */

/* The batch starting at first (chained by bnext) is answered: with status 0 every row in it
 * was acknowledged at the configured consistency; otherwise none is reported stored. The
 * next batch goes out before these are answered (q lives on meanwhile: these ops are still
 * in it, unfinished), so a failure holds nothing back. */
static void batch_done(cass_op_t *first, int status, const char *why) {
    cass_store_t *s = first->s;
    chatq_t *q = first->q;
    size_t n = 0;
    for (cass_op_t *op = first; op; op = op->bnext) {
        op->row_at = ROW_NONE;
        n++;
    }
    q->writing = false;
    if (status) {
        log_error("store_cassandra_failed op=append chat=%s id=%" PRIu64 " rows=%zu err=%s",
                  q->chat, first->id, n, LOG_STR(why ? why : chat_strerror(status)));
    }
    chatq_pump(s, q);
    cass_op_t *op = first;
    while (op) {
        cass_op_t *next = op->bnext;
        op->bnext = NULL;
        if (status == 0) {
            append_fill(op);
        } else if (op->in_submit) {
            op->sync_fail = status; /* cs_submit returns it; no callback */
        } else {
            op_done(op, status);
        }
        op = next;
    }
}

static void on_batch_written(const cql_result_t *res, void *data) {
    cass_op_t *first = data;
    int st = res->status == 0 ? 0 : res->status == CHAT_ENOMEM ? CHAT_ENOMEM : CHAT_EIO;
    const char *why = res->message;
    ob_t *ob = first->s->ob;
    if (ob) {
        st = ob_write_status(ob, first->ob_seq, st, &why);
        for (cass_op_t *op = first; op && !st; op = op->bnext) ob_written(ob, op->ob_seq);
    }
    batch_done(first, st, why);
}

/* With the outbox: each message row and its outbox row, n pairs in one LOGGED BATCH. */
static void batch_send_outbox(cass_op_t *first, size_t n) {
    cass_store_t *s = first->s;
    cql_stmt_t *st = ob_pair_stmt(s, n);
    cql_value_t *v = malloc(n * OB_PAIR_VALS * sizeof *v);
    size_t *off = malloc((n + 1) * sizeof *off);
    sbuf_t ev = {0};
    if (!st || !v || !off) {
        free(v);
        free(off);
        return batch_done(first, CHAT_ENOMEM, "out of memory");
    }
    size_t i = 0;
    for (cass_op_t *op = first; op; op = op->bnext, i++) {
        store_req_t *r = op->req;
        store_msg_t m = {.id = op->id,
                         .chat_id = (char *)r->chat_id,
                         .user_from = (char *)r->user,
                         .message = (char *)r->text,
                         .client_id = (char *)r->client_id,
                         .created_at = op->created_at};
        off[i] = ev.len;
        s->ob->o.encode(&ev, STORE_APPEND, &m);
    }
    off[n] = ev.len;
    i = 0;
    for (cass_op_t *op = first; op && !ev.oom; op = op->bnext, i++) {
        store_req_t *r = op->req;
        cql_value_t *x = v + i * OB_PAIR_VALS;
        x[0] = cql_text(r->chat_id);
        x[1] = cql_int(op->bucket);
        x[2] = cql_bigint((int64_t)op->id);
        x[3] = cql_text(r->user);
        x[4] = cql_text(r->text);
        x[5] = cql_text(r->client_id);
        x[6] = cql_timestamp(op->created_at);
        store_msg_t m = {.id = op->id, .chat_id = (char *)r->chat_id, .created_at = op->created_at};
        ob_row_vals(op, &m, ev.p + off[i], off[i + 1] - off[i], x + 7);
    }
    cql_params_t p = CQL_PARAMS_DEFAULT;
    p.timeout_ms = OB_WRITE_TIMEOUT_MS;
    int rc = ev.oom ? CHAT_ENOMEM
                    : cql_execute(s->cql, st, v, n * OB_PAIR_VALS, &p, on_batch_written, first);
    free(v);
    free(off);
    sbuf_free(&ev);
    if (rc) batch_done(first, rc == CHAT_ENOMEM ? CHAT_ENOMEM : CHAT_EIO, chat_strerror(rc));
}

/* Write the rows of the batch first..: one INSERT when alone, else one UNLOGGED BATCH (they
 * are all in one partition, so Cassandra applies it as one mutation, atomically and in
 * isolation: a reader sees all of its rows or none). */
static void batch_send(cass_op_t *first) {
    cass_store_t *s = first->s;
    size_t n = 0;
    for (cass_op_t *op = first; op; op = op->bnext) n++;
    if (s->ob) return batch_send_outbox(first, n);
    cql_value_t one[7], *v = n == 1 ? one : malloc(n * 7 * sizeof *v);
    if (!v) return batch_done(first, CHAT_ENOMEM, "out of memory");
    size_t i = 0;
    for (cass_op_t *op = first; op; op = op->bnext, i += 7) {
        store_req_t *r = op->req;
        v[i + 0] = cql_text(r->chat_id);
        v[i + 1] = cql_int(op->bucket);
        v[i + 2] = cql_bigint((int64_t)op->id);
        v[i + 3] = cql_text(r->user);
        v[i + 4] = cql_text(r->text);
        v[i + 5] = cql_text(r->client_id);
        v[i + 6] = cql_timestamp(op->created_at);
    }
    int rc = n == 1 ? cql_execute(s->cql, s->st[S_INSERT_MSG], v, 7, NULL, on_batch_written, first)
                    : cql_batch(s->cql, CQL_BATCH_UNLOGGED, s->st[S_INSERT_MSG], v, 7, n, NULL,
                                on_batch_written, first);
    if (v != one) free(v);
    if (rc) batch_done(first, rc == CHAT_ENOMEM ? CHAT_ENOMEM : CHAT_EIO, chat_strerror(rc));
}

static void on_batch_bucket(const cql_result_t *res, void *data) {
    cass_op_t *first = data;
    if (res->status) {
        return batch_done(first, res->status == CHAT_ENOMEM ? CHAT_ENOMEM : CHAT_EIO, res->message);
    }
    bcache_add(first->s, first->q->chat, first->bucket);
    batch_send(first);
}

/* If no message write of q is in flight, send the next batch: the READY rows from the front
 * of the queue, up to the first row whose id is not settled yet (ROW_WAIT: nothing behind
 * it may become visible before it), within one bucket (one partition) and the size bounds.
 * So a chat's rows become visible in the order they were submitted (this node's id order),
 * whatever the order in which Cassandra answers. */
static void chatq_pump(cass_store_t *s, chatq_t *q) {
    if (q->writing) return;
    cass_op_t *first = NULL, *last = NULL;
    size_t n = 0, bytes = 0;
    queue_t *l;
    QUEUE_FOREACH(l, &q->ops) {
        cass_op_t *op = queue_data(l, cass_op_t, qlink);
        if (op->row_at == ROW_NONE) continue;
        if (op->row_at != ROW_READY) break;
        size_t sz = strlen(op->req->text) + strlen(op->req->user) + 64;
        /* with the outbox the batch spans partitions: Cassandra's batch size limits apply
         * (warned past 5 KB, refused past 50 KB by default), and each row goes twice */
        size_t max_rows = s->ob ? OB_BATCH_MAX : BATCH_MAX_ROWS;
        size_t max_bytes = s->ob ? OB_BATCH_BYTES : BATCH_MAX_BYTES;
        if (s->ob) sz = 2 * sz + strlen(op->req->chat_id) + 256;
        if (first && (op->bucket != first->bucket || n == max_rows || bytes + sz > max_bytes)) {
            break;
        }
        op->row_at = ROW_SENT;
        op->bnext = NULL;
        if (last) {
            last->bnext = op;
        } else {
            first = op;
        }
        last = op;
        n++;
        bytes += sz;
    }
    if (!first) return;
    q->writing = true;
    /* the bucket goes into chat_buckets before the rows: history must never miss a bucket
     * that holds an acknowledged message */
    if (bcache_has(s, q->chat, first->bucket)) return batch_send(first);
    cql_value_t v[] = {cql_text(q->chat), cql_int(first->bucket)};
    int rc = cql_execute(s->cql, s->st[S_INSERT_BUCKET], v, 2, NULL, on_batch_bucket, first);
    if (rc) batch_done(first, rc == CHAT_ENOMEM ? CHAT_ENOMEM : CHAT_EIO, chat_strerror(rc));
}

/* op's row (its id settled) may be written, once every earlier row of its chat is out. */
static void append_bucket(cass_op_t *op) {
    op->bucket = bucket_of(op->id);
    op->row_at = ROW_READY;
    chatq_pump(op->s, op->q);
}

static void on_dup_read(const cql_result_t *res, void *data) {
    cass_op_t *op = data;
    store_req_t *r = op->req;
    if (res->status) return op_fail_cql(op, res, "append_dup_read");
    if (!rows_ok(res, 8)) return op_done(op, CHAT_EIO);
    if (res->resp->rows.n_rows > 0) {
        int rc = row_to_msg(&res->resp->rows, 0, r->chat_id, &r->msg);
        if (rc) return op_done(op, rc);
        r->duplicate = true;
        if (!op->s->ob) return op_done(op, 0);
        /* The retry is acknowledged now, but the first attempt's outbox row may be lost to
         * the relay: that attempt failed (reported so) and its batch can still be applied
         * long after, when the relay's horizon has passed its seq (the batch log replays
         * it). So the message's state as stored goes into the outbox again, under a new
         * seq: a duplicate on the topic at worst, which the versions make harmless. */
        op->ob_seq = ob_mint(op->s->ob);
        return ob_write_event(op, r->msg.deleted_at  ? STORE_DELETE
                                  : r->msg.edited_at ? STORE_EDIT
                                                     : STORE_APPEND);
    }
    /* claimed, never written: finish the first attempt's work under its id and time */
    log_info("store_cassandra_claim_repair chat=%s user=%s id=%" PRIu64, r->chat_id,
             LOG_STR(r->user), op->id);
    append_bucket(op);
}

static void on_claimed(const cql_result_t *res, void *data) {
    cass_op_t *op = data;
    if (res->status) return op_fail_cql(op, res, "append_claim");
    bool applied;
    if (lwt_applied(res, &applied)) return op_done(op, CHAT_EIO);
    if (applied) {
        append_bucket(op);
        return;
    }
    const cql_rows_t *rows = &res->resp->rows;
    int cid = cql_rows_col(rows, "message_id"), cat = cql_rows_col(rows, "created_at");
    int64_t id = 0, at = 0;
    if (cid < 0 || cat < 0 || cql_cell_bigint(cql_rows_cell(rows, 0, cid), &id) ||
        cql_cell_bigint(cql_rows_cell(rows, 0, cat), &at) || id <= 0) {
        log_error("store_cassandra_bad_claim chat=%s", op->req->chat_id);
        return op_done(op, CHAT_EIO);
    }
    op->id = (uint64_t)id;
    op->created_at = at;
    op->bucket = bucket_of(op->id);
    cql_value_t v[] = {cql_text(op->req->chat_id), cql_int(op->bucket), cql_bigint(id)};
    op_exec(op, S_GET, v, 3, NULL, on_dup_read);
}

static void append_start_claim(cass_op_t *op) {
    store_req_t *r = op->req;
    cass_store_t *s = op->s;
    /* one claim per key in flight on this node; later ones wait for its answer */
    cass_op_t *p = s->claims[op->claim_hash % CLAIM_SLOTS];
    for (; p; p = p->claim_next) {
        if (strcmp(p->claim_key, op->claim_key) == 0) {
            /* in submission order: the first of them to claim next is the earliest, so none
             * waits (for its row's turn) behind one that waits for it */
            cass_op_t **pp = &p->dups;
            while (*pp) pp = &(*pp)->dup_next;
            op->dup_next = NULL;
            *pp = op;
            return;
        }
    }
    op->claim_next = s->claims[op->claim_hash % CLAIM_SLOTS];
    s->claims[op->claim_hash % CLAIM_SLOTS] = op;
    cql_value_t v[] = {
        cql_text(r->chat_id),          cql_text(r->user),
        cql_text(r->client_id),        cql_bigint((int64_t)op->id),
        cql_timestamp(op->created_at),
    };
    op_exec(op, S_CLAIM, v, 5, NULL, on_claimed);
}

static int append_start(cass_op_t *op) {
    store_req_t *r = op->req;
    op->id = r->id;
    op->created_at = r->at;
    if (!r->client_id) {
        append_bucket(op);
        return 0;
    }
    size_t n = strlen(r->chat_id) + strlen(r->user) + strlen(r->client_id) + 3;
    if (!(op->claim_key = malloc(n))) return CHAT_ENOMEM;
    /* NUL cannot occur inside the parts, so the tab-free join is unambiguous with lengths */
    snprintf(op->claim_key, n, "%s\x1f%s\x1f%s", r->chat_id, r->user, r->client_id);
    op->claim_hash = hash_str(op->claim_key);
    append_start_claim(op);
    return 0;
}

/* ---- edit and delete ------------------------------------------------------------------------- */

static void on_changed(const cql_result_t *res, void *data) {
    cass_op_t *op = data;
    store_req_t *r = op->req;
    if (res->status) return op_fail_cql(op, res, r->op == STORE_EDIT ? "edit" : "delete");
    bool applied;
    if (lwt_applied(res, &applied)) return op_done(op, CHAT_EIO);
    if (!applied) {
        /* changed under us since the read: the answer says how */
        const cql_rows_t *rows = &res->resp->rows;
        int cu = cql_rows_col(rows, "user_from");
        cql_str_t u = {NULL, 0};
        if (cu < 0 || cql_cell_text(cql_rows_cell(rows, 0, cu), &u)) {
            return op_done(op, CHAT_ENOTFOUND); /* the row is gone */
        }
        int cd = cql_rows_col(rows, "deleted");
        bool deleted = false;
        if (cd >= 0) cql_cell_bool(cql_rows_cell(rows, 0, cd), &deleted);
        if (deleted) return op_done(op, CHAT_ENOTFOUND);
        bool same = u.n == strlen(r->user) && memcmp(u.p, r->user, u.n) == 0;
        return op_done(op, same ? CHAT_ENOTFOUND : CHAT_EPERM);
    }
    store_msg_t *m = &r->msg;
    *m = op->row;
    memset(&op->row, 0, sizeof op->row);
    if (r->op == STORE_EDIT) {
        free(m->message);
        m->message = strdup(r->text);
        m->edited_at = r->at;
        if (!m->message) return op_done(op, CHAT_ENOMEM);
    } else {
        free(m->message);
        m->message = NULL;
        m->deleted_at = r->at;
    }
    if (op->s->ob) return ob_write_event(op, op->req->op);
    op_done(op, 0);
}

static void on_row_read(const cql_result_t *res, void *data) {
    cass_op_t *op = data;
    store_req_t *r = op->req;
    if (res->status) return op_fail_cql(op, res, "change_read");
    if (!rows_ok(res, 8)) return op_done(op, CHAT_EIO);
    if (res->resp->rows.n_rows == 0) return op_done(op, CHAT_ENOTFOUND);
    int rc = row_to_msg(&res->resp->rows, 0, r->chat_id, &op->row);
    if (rc) return op_done(op, rc);
    if (op->row.deleted_at) {
        if (op->s->ob && r->op == STORE_DELETE && strcmp(op->row.user_from, r->user) == 0) {
            /* Its author deletes it again: most likely a retry of a delete that applied but
             * whose outbox row was never written (chatd died between the two, or that write
             * failed), so nothing told the topic. The tombstone goes into the outbox again
             * under a new seq (harmless if it was there), and the answer stays not_found. */
            r->msg = op->row;
            memset(&op->row, 0, sizeof op->row);
            op->ob_seq = ob_mint(op->s->ob);
            op->ob_then = CHAT_ENOTFOUND;
            return ob_write_event(op, STORE_DELETE);
        }
        return op_done(op, CHAT_ENOTFOUND);
    }
    if (strcmp(op->row.user_from, r->user) != 0) return op_done(op, CHAT_EPERM);
    int32_t b = bucket_of(r->id);
    cql_params_t p = CQL_PARAMS_DEFAULT;
    if (r->op == STORE_EDIT) {
        cql_value_t v[] = {
            cql_text(r->text), cql_timestamp(r->at),       cql_text(r->chat_id),
            cql_int(b),        cql_bigint((int64_t)r->id), cql_text(r->user),
        };
        op_exec(op, S_EDIT, v, 6, &p, on_changed);
    } else {
        cql_value_t v[] = {
            cql_timestamp(r->at),       cql_text(r->chat_id), cql_int(b),
            cql_bigint((int64_t)r->id), cql_text(r->user),
        };
        op_exec(op, S_DELETE, v, 5, &p, on_changed);
    }
}

/* Changes of one message go one at a time, in submission order. Members get them in that order
 * (the chat queue), so the row must end as the last says: two lightweight transactions in
 * flight at once may apply in either order (the stored text would be an older edit's, or a
 * delete would refuse the edit sent before it). Chains op behind the newest unfinished change of
 * the same message in its chat's queue; true when op waits (op_done of that one starts it). */
static bool change_wait(cass_op_t *op) {
    cass_op_t *last = NULL;
    for (queue_t *l = queue_head(&op->q->ops); l != &op->qlink; l = l->next) {
        cass_op_t *o = queue_data(l, cass_op_t, qlink);
        store_req_t *r = o->req;
        if (!o->finished && (r->op == STORE_EDIT || r->op == STORE_DELETE) &&
            r->id == op->req->id) {
            last = o;
        }
    }
    if (!last) return false;
    last->change_next = op; /* the newest one has no successor yet: op is the next */
    return true;
}

static void change_start(cass_op_t *op) {
    store_req_t *r = op->req;
    cql_value_t v[] = {cql_text(r->chat_id), cql_int(bucket_of(r->id)), cql_bigint((int64_t)r->id)};
    op_exec(op, S_GET, v, 3, NULL, on_row_read);
}

/* ---- history and after ------------------------------------------------------------------- */

static void read_next(cass_op_t *op);
static void unread_next(cass_op_t *op);

static void on_rows(const cql_result_t *res, void *data) {
    cass_op_t *op = data;
    store_req_t *r = op->req;
    if (res->status) return op_fail_cql(op, res, "read");
    if (!rows_ok(res, 8)) return op_done(op, CHAT_EIO);
    const cql_rows_t *rows = &res->resp->rows;
    size_t want = (size_t)op->limit - op->n_msgs;
    size_t n = (size_t)rows->n_rows < want ? (size_t)rows->n_rows : want;
    if (op->n_msgs + n > op->cap_msgs) {
        size_t ncap = op->cap_msgs ? op->cap_msgs : 16;
        while (ncap < op->n_msgs + n) ncap *= 2;
        if (ncap > (size_t)op->limit) ncap = (size_t)op->limit;
        store_msg_t *p = realloc(op->msgs, ncap * sizeof *p);
        if (!p) return op_done(op, CHAT_ENOMEM);
        op->msgs = p;
        op->cap_msgs = ncap;
    }
    for (size_t i = 0; i < n; i++) {
        int rc = row_to_msg(rows, (int32_t)i, r->chat_id, &op->msgs[op->n_msgs]);
        if (rc) return op_done(op, rc);
        op->n_msgs++;
    }
    free(op->paging);
    op->paging = NULL;
    op->paging_len = 0;
    if (rows->paging_state.n > 0 && op->n_msgs < (size_t)op->limit) {
        if (!(op->paging = malloc((size_t)rows->paging_state.n))) return op_done(op, CHAT_ENOMEM);
        memcpy(op->paging, rows->paging_state.p, (size_t)rows->paging_state.n);
        op->paging_len = rows->paging_state.n;
    } else {
        op->bucket_i++;
    }
    read_next(op);
}

static void on_buckets(const cql_result_t *res, void *data) {
    cass_op_t *op = data;
    if (res->status) return op_fail_cql(op, res, "read_buckets");
    if (!rows_ok(res, 1)) return op_done(op, CHAT_EIO);
    const cql_rows_t *rows = &res->resp->rows;
    op->n_buckets = 0;
    op->bucket_i = 0;
    for (int32_t i = 0; i < rows->n_rows && i < BUCKETS_PER_QUERY; i++) {
        if (cql_cell_int(cql_rows_cell(rows, i, 0), &op->buckets[op->n_buckets]) == 0) {
            op->n_buckets++;
        }
    }
    op->more_buckets = rows->n_rows == BUCKETS_PER_QUERY;
    if (op->n_buckets) {
        int32_t last = op->buckets[op->n_buckets - 1];
        bool desc = op->req->op != STORE_AFTER;
        if (desc ? last == INT32_MIN : last == INT32_MAX) op->more_buckets = false;
        op->bucket_bound = desc ? last - 1 : last + 1;
    }
    if (op->req->op == STORE_READ_GET) unread_next(op);
    else read_next(op);
}

/* Next step of a read: the next page of this bucket, the next bucket, the next list of
 * buckets, or done. */
static void read_next(cass_op_t *op) {
    store_req_t *r = op->req;
    bool hist = r->op == STORE_HISTORY;
    if (op->n_msgs >= (size_t)op->limit) return op_done(op, 0);
    if (op->bucket_i >= op->n_buckets) {
        if (!op->more_buckets) return op_done(op, 0);
        cql_value_t v[] = {cql_text(r->chat_id), cql_int(op->bucket_bound),
                           cql_int(BUCKETS_PER_QUERY)};
        op->more_buckets = false;
        op_exec(op, hist ? S_BUCKETS_DESC : S_BUCKETS_ASC, v, 3, NULL, on_buckets);
        return;
    }
    int64_t bound;
    if (hist) {
        bound = r->id == 0 || r->id > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)r->id;
    } else {
        bound = r->id > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)r->id;
    }
    int32_t left = (int32_t)((size_t)op->limit - op->n_msgs);
    cql_params_t p = CQL_PARAMS_DEFAULT;
    p.page_size = left < READ_PAGE_ROWS ? left : READ_PAGE_ROWS;
    if (op->paging) p.paging_state = (cql_bytes_t){op->paging, op->paging_len};
    cql_value_t v[] = {cql_text(r->chat_id), cql_int(op->buckets[op->bucket_i]), cql_bigint(bound),
                       cql_int(left)};
    op_exec(op, hist ? S_HISTORY : S_AFTER, v, 4, &p, on_rows);
}

static void read_start(cass_op_t *op) {
    store_req_t *r = op->req;
    op->limit = r->limit < 1 ? 1 : r->limit > STORE_READ_MAX ? STORE_READ_MAX : r->limit;
    if (r->op == STORE_HISTORY) {
        op->bucket_bound = r->id == 0 || r->id > (uint64_t)INT64_MAX ? INT32_MAX : bucket_of(r->id);
    } else {
        op->bucket_bound = r->id > (uint64_t)INT64_MAX ? INT32_MAX : bucket_of(r->id);
        if (r->id == 0) op->bucket_bound = INT32_MIN;
    }
    op->more_buckets = true;
    read_next(op);
}

/* ---- read positions ---------------------------------------------------------------------- */

/* The position in res (an S_READ_POS answer) into *pos (0: none). */
static int read_pos_of(const cql_result_t *res, uint64_t *pos) {
    if (!rows_ok(res, 1)) return CHAT_EIO;
    int64_t v = 0;
    if (res->resp->rows.n_rows > 0 && cql_cell_bigint(cql_rows_cell(&res->resp->rows, 0, 0), &v))
        return CHAT_EIO;
    *pos = v > 0 ? (uint64_t)v : 0;
    return 0;
}

static void on_read_moved(const cql_result_t *res, void *data) {
    cass_op_t *op = data;
    if (res->status) return op_fail_cql(op, res, "read_move");
    op->req->read_id = op->req->id;
    op->req->read_moved = true;
    op_done(op, 0);
}

static void on_read_set_pos(const cql_result_t *res, void *data) {
    cass_op_t *op = data;
    store_req_t *r = op->req;
    if (res->status) return op_fail_cql(op, res, "read_pos");
    uint64_t pos;
    if (read_pos_of(res, &pos)) return op_done(op, CHAT_EIO);
    if (pos >= r->id) { /* already there or further: nothing to write */
        r->read_id = pos;
        return op_done(op, 0);
    }
    /* Another tab may move it meanwhile: the batch keeps the larger of the two anyway (see
     * the schema), and the caller reports this move, which the client folds by max. */
    cql_value_t v[] = {cql_text(r->user),         cql_text(r->chat_id), cql_bigint((int64_t)r->id),
                       cql_timestamp(r->at),      cql_text(r->user),    cql_text(r->chat_id),
                       cql_bigint((int64_t)r->id)};
    op_exec(op, S_READ_MOVE, v, 7, NULL, on_read_moved);
}

static void on_read_set_msg(const cql_result_t *res, void *data) {
    cass_op_t *op = data;
    store_req_t *r = op->req;
    if (res->status) return op_fail_cql(op, res, "read_msg");
    if (!rows_ok(res, 1)) return op_done(op, CHAT_EIO);
    if (res->resp->rows.n_rows == 0) return op_done(op, CHAT_ENOTFOUND);
    cql_value_t v[] = {cql_text(r->user), cql_text(r->chat_id)};
    op_exec(op, S_READ_POS, v, 2, NULL, on_read_set_pos);
}

/* READ_SET: the message must be the chat's, then the position moves only up. */
static void read_set_start(cass_op_t *op) {
    store_req_t *r = op->req;
    /* an id past INT64_MAX was never stored: as a negative bigint it finds no row */
    cql_value_t v[] = {cql_text(r->chat_id), cql_int(bucket_of(r->id)), cql_bigint((int64_t)r->id)};
    op_exec(op, S_GET, v, 3, NULL, on_read_set_msg);
}

/* READ_GET: the buckets newest first down to the position's, each read newest first for
 * the messages after it, until the cap or STORE_UNREAD_SCAN rows (store.h). op->limit
 * counts the rows still to look at. */
static void on_unread_rows(const cql_result_t *res, void *data) {
    cass_op_t *op = data;
    store_req_t *r = op->req;
    if (res->status) return op_fail_cql(op, res, "unread");
    if (!rows_ok(res, 2)) return op_done(op, CHAT_EIO);
    const cql_rows_t *rows = &res->resp->rows;
    for (int32_t i = 0; i < rows->n_rows && op->limit > 0; i++) {
        cql_str_t u = {"", 0};
        bool deleted = false;
        cql_cell_text(cql_rows_cell(rows, i, 0), &u);
        cql_cell_bool(cql_rows_cell(rows, i, 1), &deleted);
        char user[160];
        snprintf(user, sizeof user, "%.*s", u.n < 159 ? (int)u.n : 159, u.p ? u.p : "");
        op->limit--;
        if (!store_unread_add(r, user, deleted)) return op_done(op, 0);
    }
    if (op->limit <= 0) {
        r->unread_capped = true;
        return op_done(op, 0);
    }
    free(op->paging);
    op->paging = NULL;
    op->paging_len = 0;
    if (rows->paging_state.n > 0) {
        if (!(op->paging = malloc((size_t)rows->paging_state.n))) return op_done(op, CHAT_ENOMEM);
        memcpy(op->paging, rows->paging_state.p, (size_t)rows->paging_state.n);
        op->paging_len = rows->paging_state.n;
    } else {
        op->bucket_i++;
    }
    unread_next(op);
}

static void unread_next(cass_op_t *op) {
    store_req_t *r = op->req;
    int32_t floor = r->read_id ? bucket_of(r->read_id) : INT32_MIN;
    if (op->bucket_i >= op->n_buckets) {
        if (!op->more_buckets || op->bucket_bound < floor) return op_done(op, 0);
        cql_value_t v[] = {cql_text(r->chat_id), cql_int(op->bucket_bound),
                           cql_int(BUCKETS_PER_QUERY)};
        op->more_buckets = false;
        op_exec(op, S_BUCKETS_DESC, v, 3, NULL, on_buckets);
        return;
    }
    if (op->buckets[op->bucket_i] < floor) return op_done(op, 0);
    cql_params_t p = CQL_PARAMS_DEFAULT;
    p.page_size = op->limit < READ_PAGE_ROWS ? op->limit : READ_PAGE_ROWS;
    if (op->paging) p.paging_state = (cql_bytes_t){op->paging, op->paging_len};
    cql_value_t v[] = {cql_text(r->chat_id), cql_int(op->buckets[op->bucket_i]),
                       cql_bigint((int64_t)r->read_id), cql_int(op->limit)};
    op_exec(op, S_UNREAD, v, 4, &p, on_unread_rows);
}

static void on_read_get_pos(const cql_result_t *res, void *data) {
    cass_op_t *op = data;
    if (res->status) return op_fail_cql(op, res, "read_pos");
    if (read_pos_of(res, &op->req->read_id)) return op_done(op, CHAT_EIO);
    op->limit = STORE_UNREAD_SCAN;
    op->bucket_bound = INT32_MAX;
    op->more_buckets = true;
    unread_next(op);
}

static void read_get_start(cass_op_t *op) {
    store_req_t *r = op->req;
    cql_value_t v[] = {cql_text(r->user), cql_text(r->chat_id)};
    op_exec(op, S_READ_POS, v, 2, NULL, on_read_get_pos);
}

/* ---- the ops table ----------------------------------------------------------------------- */

static int cs_submit(store_t *base, store_req_t *r) {
    cass_store_t *s = (cass_store_t *)base;
    if (!s->cql) return CHAT_EINVAL;
    switch (r->op) {
    case STORE_SEARCH: return CHAT_EINVAL; /* over SQLite's FTS5 table only */
    case STORE_OUTBOX_READ:
    case STORE_OUTBOX_DELETE:
        if (!s->ob) return CHAT_EINVAL;
        break;
    default: break;
    }
    if (s->closing) return CHAT_ECLOSED;
    cass_op_t *op = calloc(1, sizeof *op);
    if (!op) return CHAT_ENOMEM;
    op->s = s;
    op->req = r;
    r->priv_ = op;
    bool change = r->op == STORE_APPEND || r->op == STORE_EDIT || r->op == STORE_DELETE;
    if (s->ob && (r->op == STORE_OUTBOX_READ || r->op == STORE_OUTBOX_DELETE ||
                  (change && ob_full(s->ob)))) {
        /* answered on the next loop turn (or, a read, when its sweep ends) */
        s->n_ops++;
        if (r->op == STORE_OUTBOX_READ) ob_read(s->ob, op);
        else if (r->op == STORE_OUTBOX_DELETE) ob_delete(s->ob, op);
        else {
            __atomic_add_fetch(&s->ob->refused, 1, __ATOMIC_RELAXED);
            ob_defer(s->ob, op, CHAT_EBUSY);
        }
        return 0;
    }
    if (s->ob && change) op->ob_seq = ob_mint(s->ob);
    if (change) {
        if (!(op->q = chatq_get(s, r->chat_id))) {
            free(op);
            return CHAT_ENOMEM;
        }
        queue_insert_tail(&op->q->ops, &op->qlink);
    }
    s->n_ops++;
    /* The first CQL request is submitted from here; a failure to submit it is returned
     * (the callback must not run inside submit). After that, every path ends in op_done,
     * called from the CQL client's callbacks on the loop. */
    op->in_submit = true;
    int rc = 0;
    switch (r->op) {
    case STORE_APPEND:
        op->row_at = ROW_WAIT;
        rc = append_start(op);
        break;
    case STORE_EDIT:
    case STORE_DELETE:
        if (!change_wait(op)) change_start(op);
        break;
    case STORE_READ_SET: read_set_start(op); break;
    case STORE_READ_GET: read_get_start(op); break;
    default: read_start(op); break;
    }
    if (!rc) rc = op->sync_fail;
    if (rc) {
        /* nothing is in flight for it (a dup waits on another op only when rc == 0) */
        s->n_ops--;
        claim_unlink(op);
        chatq_remove(s, op);
        op_free(op);
        return rc;
    }
    op->in_submit = false;
    return 0;
}

static void on_cql_closed(void *arg) {
    cass_store_t *s = arg;
    void (*done)(void *) = s->done;
    void *darg = s->done_arg;
    bcache_clear(s);
    cfg_free(&s->cfg);
    ob_free(s->ob);
    free(s);
    if (done) done(darg);
}

static void store_finish_close(cass_store_t *s) {
    if (s->ob && ob_closing(s->ob)) return; /* called again once its handles closed */
    if (!s->cql) return;
    cql_client_t *c = s->cql;
    s->cql = NULL;
    cql_client_close(c, on_cql_closed, s);
}

static void cs_close(store_t *base, void (*done)(void *), void *arg) {
    cass_store_t *s = (cass_store_t *)base;
    if (s->closing) {
        log_warn("store_close_twice backend=cassandra");
        return;
    }
    s->closing = true;
    s->done = done;
    s->done_arg = arg;
    if (!s->cql) {
        /* migrate-only use: nothing on any loop */
        on_cql_closed(s);
        return;
    }
    if (s->ob) uv_timer_stop(&s->ob->cycle);
    log_info("store_closing backend=cassandra in_flight=%zu", s->n_ops);
    if (!s->n_ops) store_finish_close(s);
}

/* ---- synchronous work on a private loop (open's probe, migrate) ------------------------------ */

typedef struct sync_ctx {
    bool done;
    int status;
    char msg[600];
    bool tables[N_TABLES];
} sync_ctx_t;

static void on_sync_ready(const cql_result_t *res, void *data) {
    sync_ctx_t *x = data;
    x->status = res->status;
    snprintf(x->msg, sizeof x->msg, "%s", res->message ? res->message : "");
    x->done = true;
}

static void on_sync_query(const cql_result_t *res, void *data) {
    sync_ctx_t *x = data;
    x->status = res->status;
    snprintf(x->msg, sizeof x->msg, "%s", res->message ? res->message : "");
    if (res->status == 0 && res->resp && res->resp->kind == CQL_RESULT_ROWS) {
        const cql_rows_t *rows = &res->resp->rows;
        for (int32_t i = 0; i < rows->n_rows; i++) {
            cql_str_t t;
            if (cql_cell_text(cql_rows_cell(rows, i, 0), &t)) continue;
            for (size_t k = 0; k < N_TABLES; k++) {
                if (t.n == strlen(TABLES[k]) && memcmp(t.p, TABLES[k], t.n) == 0) {
                    x->tables[k] = true;
                }
            }
        }
    }
    x->done = true;
}

static void on_sync_closed(void *arg) { *(bool *)arg = true; }

/* Connect on a private loop; on success *c is ready for queries on *loop. */
static int sync_connect(uv_loop_t *loop, const cass_cfg_t *cfg, cql_client_t **c, char *err,
                        size_t errlen) {
    cql_client_opts_t o = {
        .hosts = (const char *const *)cfg->hosts,
        .n_hosts = cfg->n_hosts,
        .user = cfg->user,
        .password = cfg->password,
        /* schema reads and DDL: the system tables are local to each node (DDL ignores the
         * level), so ONE here; the configured level is for the data */
        .consistency = CQL_ONE,
        .serial_consistency = cfg->serial,
        .conns_per_host = 1,
        .request_timeout_ms = cfg->timeout_ms > 20000 ? cfg->timeout_ms : 20000,
        .connect_timeout_ms = cfg->connect_timeout_ms,
        .schema_agreement_ms = 20000,
    };
    int rc = cql_client_new(c, loop, &o);
    if (rc) {
        store__set_err(err, errlen, "cassandra: bad client options (%s)", chat_strerror(rc));
        return rc;
    }
    sync_ctx_t x = {0};
    cql_client_on_ready(*c, on_sync_ready, &x);
    cql_run_until(loop, &x.done);
    if (!x.done || x.status) {
        store__set_err(err, errlen, "cannot connect to Cassandra: %s",
                       x.done ? x.msg : "loop stopped");
        return x.status == CHAT_EAUTH ? CHAT_EAUTH : CHAT_EIO;
    }
    return 0;
}

static void sync_close(uv_loop_t *loop, cql_client_t *c) {
    bool closed = false;
    cql_client_close(c, on_sync_closed, &closed);
    cql_run_until(loop, &closed);
    uv_run(loop, UV_RUN_DEFAULT); /* the last close callbacks */
}

static int sync_query(uv_loop_t *loop, cql_client_t *c, const char *q, const cql_value_t *v,
                      size_t n, sync_ctx_t *x) {
    x->done = false;
    int rc = cql_query(c, q, v, n, NULL, on_sync_query, x);
    if (rc) return rc;
    cql_run_until(loop, &x->done);
    return x->done ? x->status : CHAT_EIO;
}

/* The store's tables exist in its keyspace (chatd refuses to start on an unmigrated one). */
static int probe_schema(const cass_cfg_t *cfg, char *err, size_t errlen) {
    uv_loop_t loop;
    if (uv_loop_init(&loop)) return CHAT_EIO;
    cql_client_t *c = NULL;
    int rc = sync_connect(&loop, cfg, &c, err, errlen);
    if (rc == 0) {
        sync_ctx_t x = {0};
        cql_value_t v[] = {cql_text(cfg->keyspace)};
        rc = sync_query(&loop, c,
                        "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?", v, 1,
                        &x);
        if (rc) {
            store__set_err(err, errlen, "cassandra: reading the schema failed: %s", x.msg);
            rc = CHAT_EIO;
        } else {
            for (size_t k = 0; k < N_TABLES; k++) {
                if (x.tables[k]) continue;
                store__set_err(err, errlen,
                               "cassandra: keyspace \"%s\" has no table %s: create the schema with "
                               "`chatctl migrate --store URL` (make create-models)",
                               cfg->keyspace, TABLES[k]);
                rc = CHAT_EIO;
                break;
            }
        }
    }
    if (c) sync_close(&loop, c);
    uv_loop_close(&loop);
    return rc;
}

static int cs_migrate(store_t *base) {
    cass_store_t *s = (cass_store_t *)base;
    uv_loop_t loop;
    if (uv_loop_init(&loop)) return CHAT_EIO;
    cql_client_t *c = NULL;
    char err[700];
    int rc = sync_connect(&loop, &s->cfg, &c, err, sizeof err);
    if (rc) fprintf(stderr, "%s\n", err); /* chatctl's caller sees only a code otherwise */
    for (size_t i = 0; rc == 0 && i < N_SCHEMA; i++) {
        char q[1500];
        snprintf(q, sizeof q, SCHEMA[i], s->cfg.keyspace, s->cfg.replication);
        sync_ctx_t x = {0};
        rc = sync_query(&loop, c, q, NULL, 0, &x);
        if (rc) {
            fprintf(stderr, "cassandra: keyspace %s: %s\n", s->cfg.keyspace, x.msg);
            rc = rc == CHAT_EAUTH ? CHAT_EAUTH : CHAT_EIO;
        }
    }
    if (rc == 0) {
        log_info("store_schema_applied backend=cassandra keyspace=%s replication=\"%s\"",
                 s->cfg.keyspace, s->cfg.replication);
    }
    if (c) sync_close(&loop, c);
    uv_loop_close(&loop);
    return rc;
}

/* Failing while no connection to any host is ready: requests then wait for one, and fail
 * at their timeout. Just after start, before the first connection came up (the schema probe
 * reached the cluster a moment ago), that is not a fault yet. The client reconnects by
 * itself, so this turns ok again as soon as a host answers. */
static int cs_health(store_t *base, char *detail, size_t n) {
    cass_store_t *s = (cass_store_t *)base;
    if (!s->cql) return 0;
    cql_client_stats_t st;
    cql_client_stats(s->cql, &st);
    if (st.conns_ready > 0 || (st.connects == 0 && st.connect_failures == 0)) return 0;
    snprintf(detail, n,
             "cassandra: no live connection to any of %zu host(s) (%" PRIu64
             " failed connection attempts so far)",
             s->cfg.n_hosts, st.connect_failures);
    return CHAT_EIO;
}

/* Every shard's progress starts a minute back, once for the keyspace's life: before this
 * node writes its first outbox row (IF NOT EXISTS: the first node to enable decides; every
 * row written later has a larger seq, whichever node writes it, give or take a minute of
 * clock skew). */
static int ob_init_progress(cass_store_t *s) {
    uv_loop_t loop;
    if (uv_loop_init(&loop)) return CHAT_EIO;
    cql_client_t *c = NULL;
    char err[700];
    int rc = sync_connect(&loop, &s->cfg, &c, err, sizeof err);
    if (rc) log_error("store_cassandra_outbox_failed op=init err=\"%s\"", err);
    char q[300];
    snprintf(q, sizeof q,
             "INSERT INTO %s.outbox_done (shard, seq, writer) VALUES (?, ?, 0) IF NOT EXISTS",
             s->cfg.keyspace);
    int64_t start = ob_floor(time_now_ms() - OB_START_BACK_MS);
    for (int i = 0; rc == 0 && i < OB_SHARDS; i++) {
        sync_ctx_t x = {0};
        cql_value_t v[] = {cql_int(i), cql_bigint(start)};
        if ((rc = sync_query(&loop, c, q, v, 2, &x)))
            log_error("store_cassandra_outbox_failed op=init err=\"%s\"", x.msg);
    }
    if (c) sync_close(&loop, c);
    uv_loop_close(&loop);
    return rc ? CHAT_EIO : 0;
}

static int cs_outbox_enable(store_t *base, const store_outbox_opts_t *o) {
    cass_store_t *s = (cass_store_t *)base;
    if (!s->cql || s->ob || !o->encode) return CHAT_EINVAL;
    if (ob_init_progress(s)) return CHAT_EIO;
    ob_t *ob = calloc(1, sizeof *ob);
    if (!ob) return CHAT_EIO;
    ob->s = s;
    ob->o = *o;
    uint64_t w = 0;
    if (getrandom(&w, sizeof w, 0) != (ssize_t)sizeof w)
        w = (uint64_t)time_now_ms() ^ (uint64_t)getpid();
    ob->writer = (int64_t)(w >> 1) | 1;
    queue_init(&ob->deferred);
    for (int i = 0; i < OB_SHARDS; i++) {
        ob->sh[i].ob = ob;
        ob->sh[i].idx = i;
    }
    uv_timer_init(base->loop, &ob->cycle);
    uv_timer_init(base->loop, &ob->defer);
    ob->cycle.data = ob->defer.data = ob;
    ob->handles = 2;
    s->ob = ob;
    uv_timer_start(&ob->cycle, ob_on_cycle, 0, OB_CYCLE_MS);
    log_info("store_cassandra_outbox shards=%d horizon_ms=%d lease_s=%d writer=%" PRId64, OB_SHARDS,
             OB_HORIZON_MS, OB_LEASE_TTL_S, ob->writer);
    return 0;
}

static void cs_outbox_stats(store_t *base, store_outbox_stats_t *out) {
    ob_t *ob = ((cass_store_t *)base)->ob;
    if (!ob) return;
    out->rows = __atomic_load_n(&ob->depth, __ATOMIC_RELAXED);
    out->refused = __atomic_load_n(&ob->refused, __ATOMIC_RELAXED);
    out->written = __atomic_load_n(&ob->written, __ATOMIC_RELAXED);
}

static const store_ops_t cassandra_ops = {
    .name = "cassandra",
    .submit = cs_submit,
    .migrate = cs_migrate,
    .close = cs_close,
    .health = cs_health,
    .outbox_enable = cs_outbox_enable,
    .outbox_stats = cs_outbox_stats,
};

int store_cassandra_open(store_t **out, uv_loop_t *loop, const char *url, char *err,
                         size_t errlen) {
    *out = NULL;
    cass_store_t *s = calloc(1, sizeof *s);
    if (!s) return CHAT_ENOMEM;
    s->base.ops = &cassandra_ops;
    s->base.loop = loop;
    int rc = parse_url(url, &s->cfg, err, errlen);
    if (rc) {
        free(s);
        return rc;
    }
    if (!loop) {
        /* chatctl migrate: it connects when asked to migrate */
        *out = &s->base;
        return 0;
    }
    /* Before serving, make sure the cluster answers, takes our credentials and has our
     * schema: a chatd that starts "fine" and then fails every send helps nobody. This runs
     * on a private loop, before the server's loop has anything to do. */
    rc = probe_schema(&s->cfg, err, errlen);
    if (rc) goto fail;
    cql_client_opts_t o = {
        .hosts = (const char *const *)s->cfg.hosts,
        .n_hosts = s->cfg.n_hosts,
        .user = s->cfg.user,
        .password = s->cfg.password,
        .consistency = s->cfg.consistency,
        .serial_consistency = s->cfg.serial,
        .conns_per_host = s->cfg.pool,
        .request_timeout_ms = s->cfg.timeout_ms,
        .connect_timeout_ms = s->cfg.connect_timeout_ms,
        .reconnect_max_ms = s->cfg.reconnect_max_ms,
    };
    rc = cql_client_new(&s->cql, loop, &o);
    if (rc) {
        store__set_err(err, errlen, "cassandra: cannot create the client (%s)", chat_strerror(rc));
        goto fail;
    }
    for (int i = 0; i < S_COUNT; i++) {
        char q[600];
        snprintf(q, sizeof q, STMT_SQL[i], s->cfg.keyspace);
        if (!(s->st[i] = cql_stmt_new(s->cql, q))) {
            rc = CHAT_ENOMEM;
            /* the client is live on the loop: close it and let the loop free the store */
            s->closing = true;
            store_finish_close(s);
            return rc;
        }
    }
    log_info("store_opened backend=cassandra hosts=%zu keyspace=%s consistency=%s serial=%s "
             "pool=%u",
             s->cfg.n_hosts, s->cfg.keyspace, cql_consistency_name(s->cfg.consistency),
             cql_consistency_name(s->cfg.serial), s->cfg.pool);
    *out = &s->base;
    return 0;
fail:
    cfg_free(&s->cfg);
    free(s);
    return rc;
}
