/* bus_redis: the Redis backend of the bus, on hiredis async and the server's libuv loop.
 *
 * Two connections: "sub" is in subscriber mode (one SUBSCRIBE per chat this node has local
 * members in) and "cmd" carries PUBLISH, heartbeats and node listing. Each connects
 * asynchronously, authenticates, selects its db, and on any failure is torn down and
 * retried with capped, jittered exponential backoff.
 *
 * The one idea: a PUBLISH stays in our own queue until Redis has answered it. While the
 * command connection is down the queue just grows (bounded, oldest dropped first); when a
 * connection dies, what it had not acknowledged is sent again, in order, on the next one.
 * Receivers dedupe, so an event may arrive twice but is not lost to a dead socket. The
 * queue is a list of large chunks holding ready-made RESP commands: a publish costs one
 * memcpy and no allocation of ours.
 *
 * hiredis rules that shape this file: a context is freed by hiredis itself after its connect
 * callback fails or its disconnect callback runs, and its pending reply callbacks run with a
 * NULL reply while it is being freed; we never free a context from inside one of its own
 * callbacks (teardown is scheduled on the connection's timer).
 */
#include "bus_redis_internal.h"

#include <arpa/inet.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 2000
#define CONNECT_TIMEOUT_MS 1000 /* resolve excluded: connect and handshake */
#define CLOSE_FLUSH_MS 1000
#define STALL_MS 10000 /* commands outstanding and no reply for this long: Redis is gone */
#define PQ_MAX_MSGS 100000
#define PQ_MAX_BYTES ((size_t)64 << 20)
#define PQ_CHUNK ((size_t)256 << 10)
#define NODES_WINDOW_MS 60000 /* list_nodes looks at heartbeats younger than this */
#define CHAT_ID_MAX 255
#define CHAN_PREFIX "chat:"
#define CHAN_PREFIX_LEN 5
#define NODES_KEY "chat:nodes"
#define NODE_PREFIX "chat:node:"
/* Every node's subscriber connection also listens on chat:alive:<instance>: Redis drops the
 * subscription the moment the process's socket closes (a crash included), so PUBSUB NUMSUB
 * tells a live node from a dead one long before its heartbeat key expires. A chat id has no
 * ':', so this never names a chat's channel. */
#define ALIVE_PREFIX "chat:alive:"
#define NODEID_PREFIX "chat:nodeid:" /* the lease of a node id: value = holder's instance */
/* Presence: a hash per chat, one field per (node, user): the node's instance id (32 hex
 * chars) followed by the user id. A field counts only while its node's heartbeat key lives
 * and its alive channel has a subscriber; a reader drops the others. Each node rewrites its
 * fields and the key's expiry every PRESENCE_KEY_TTL_MS / 3, so the hash of a chat whose
 * nodes all died expires. */
#define PRESENCE_PREFIX "chat:presence:"
#define PRESENCE_KEY_TTL_MS 60000
#define NODE_IDS 1024
#define INSTANCE_LEN 32

typedef struct bus_redis bus_redis_t;

/* ---- the node id lease: scripts, so that each step is atomic at the server ---------------- */

/* ARGV: want (-1: any), our instance, ttl ms, first id to try. A free id, or one already ours,
 * is taken. An id asked for by number is also taken from a holder whose alive channel has no
 * subscriber (its process died: its lease would only linger until the TTL); an id picked
 * automatically is only ever a free one. Answers {id}, {-1, holder} or {-2} (none free). */
static const char LEASE_ACQUIRE[] =
    "local me, ttl = ARGV[2], ARGV[3] "
    "local function try(id, takeover) "
    "  local k = '" NODEID_PREFIX "' .. id "
    "  local v = redis.call('GET', k) "
    "  if (not v) or v == me or (takeover and "
    "      redis.call('PUBSUB', 'NUMSUB', '" ALIVE_PREFIX "' .. v)[2] == 0) then "
    "    redis.call('SET', k, me, 'PX', ttl) return true, v end "
    "  return false, v end "
    "local want = tonumber(ARGV[1]) "
    "if want >= 0 then "
    "  local ok, holder = try(want, true) "
    "  if ok then return {want} end "
    "  return {-1, holder} end "
    "local start = tonumber(ARGV[4]) "
    "for i = 0, 1023 do "
    "  local id = (start + i) % 1024 "
    "  if try(id, false) then return {id} end end "
    "return {-2}";
/* KEYS[1] the lease; ARGV: our instance, ttl. 1: renewed; 2: it had expired and was free,
 * taken again; 0: another node holds it now. */
static const char LEASE_RENEW[] =
    "local v = redis.call('GET', KEYS[1]) "
    "if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end "
    "if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end "
    "return 0";
/* KEYS[1] a chat's presence hash. The fields of live nodes; the others are deleted. */
static const char PRESENCE_LIST[] =
    "local f = redis.call('HKEYS', KEYS[1]) "
    "local live, out = {}, {} "
    "for i = 1, #f do "
    "  local n = string.sub(f[i], 1, 32) "
    "  local ok = live[n] "
    "  if ok == nil then "
    "    ok = redis.call('EXISTS', '" NODE_PREFIX "' .. n) == 1 and "
    "         redis.call('PUBSUB', 'NUMSUB', '" ALIVE_PREFIX "' .. n)[2] > 0 "
    "    live[n] = ok end "
    "  if ok then out[#out + 1] = f[i] else redis.call('HDEL', KEYS[1], f[i]) end "
    "end "
    "return out";
/* compare-and-delete: never release a lease another node took since */
static const char LEASE_RELEASE[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
    "return 0";

enum {
    LEASE_NONE,   /* never asked for */
    LEASE_WAIT,   /* asked for, waiting for both connections to be up */
    LEASE_ASKING, /* the acquire script is in flight */
    LEASE_HELD,
    LEASE_OVER, /* refused, or lost: reported, nothing more to do */
};

/* ---- connection state ------------------------------------------------------------------- */

enum {
    ST_DOWN,       /* nothing open; the timer is the backoff before the next attempt */
    ST_RESOLVING,  /* uv_getaddrinfo in flight */
    ST_CONNECTING, /* TCP connect in flight; the timer is the connect timeout */
    ST_HANDSHAKE,  /* AUTH / SELECT / PING sent, waiting for the replies */
    ST_RESUB,      /* sub only: SUBSCRIBE sent for every chat, waiting for confirmations */
    ST_READY,
};

typedef struct rconn {
    bus_redis_t *bus;
    const char *name; /* "sub" or "cmd", for logs and CLIENT SETNAME */
    redisAsyncContext *ac;
    uv_timer_t timer; /* backoff, connect timeout, or a scheduled teardown */
    uv_getaddrinfo_t gai;
    int state;
    unsigned gen;         /* bumped each time the connection is lost */
    unsigned backoff_ms;  /* the next retry waits about this long */
    unsigned fails;       /* attempts failed in a row, to log only the first */
    int inflight;         /* regular commands sent, reply callback not run yet */
    uint64_t replies;     /* replies received (the stall check watches it move) */
    uint64_t stall_mark;  /* replies at the last check that found it moving */
    uint64_t stall_since; /* uv_now() of that check */
    int hs_pending;       /* handshake replies still expected */
    bool hs_failed;
    bool kill_requested;
    const char *kill_reason;
} rconn_t;

/* ---- the set of subscribed chats: chained hash ------------------------------------------ */

typedef struct chat_ent {
    struct chat_ent *next;
    uint32_t hash;
    bool confirm_pending; /* resubscribing: SUBSCRIBE sent, confirmation not seen yet */
    size_t len;
    char id[];
} chat_ent_t;

typedef struct chat_set {
    chat_ent_t **b;
    size_t nb, n;
} chat_set_t;

/* ---- the publish queue ------------------------------------------------------------------ */

typedef struct pq_chunk {
    struct pq_chunk *next;
    size_t cap, head, used; /* records live in data[head..used) */
    uint8_t data[];
} pq_chunk_t;
_Static_assert(offsetof(pq_chunk_t, data) % 8 == 0, "records are 8-aligned");

typedef struct pq_rec {
    uintptr_t seq; /* passed to hiredis as the reply's privdata */
    uint32_t len;  /* bytes of RESP that follow */
    uint32_t pad_;
} pq_rec_t;

typedef struct pq {
    pq_chunk_t *first, *last, *spare;
    pq_chunk_t *unsent_chunk; /* first record not handed to hiredis yet; NULL: none */
    size_t unsent_off;
    size_t n, bytes, n_unsent;
    uintptr_t next_seq;
    size_t max_msgs, max_bytes;
} pq_t;

/* ---- list_nodes requests ---------------------------------------------------------------- */

typedef struct list_req {
    bus_redis_t *bus;
    bus_nodes_cb cb;
    void *ud;
    bus_node_t *nodes; /* one per id asked for; id[0] == 0 marks one that is gone */
    size_t n, got;     /* ids asked for, HMGET replies seen */
    int pending;       /* replies still expected */
    bool failed;
    bool *dead;   /* one per id asked for: its alive channel has no subscriber */
    queue_t link; /* on bus->failed */
} list_req_t;

struct bus_redis {
    bus_t base;
    uv_loop_t *loop;
    bus_redis_url_t url;
    bool numeric_host; /* no resolution needed */
    rconn_t sub, cmd;
    chat_set_t chats;
    size_t unconfirmed; /* chats resubscribed whose confirmation has not come back */
    int reported;       /* last on_state: -1 none yet, 0 down, 1 up */
    pq_t q;
    size_t dropped;         /* publishes dropped for the queue bound, not logged yet */
    int64_t dropped_log_ms; /* when the last drop was logged */
    int64_t err_log_ms;     /* when the last command error was logged (rate limit) */
    queue_t failed;         /* list requests to answer with an error on the next turn */
    uv_timer_t work;        /* deferred work: failed lists, close steps */
    uint64_t rng;
    int polls_open;  /* poll handles of hiredis contexts not closed yet */
    int gai_pending; /* uv_getaddrinfo requests whose callback has not run */
    bool hold_cmd;   /* test hook */
    unsigned stall_ms;
    bool alive_pending; /* sub: SUBSCRIBE to our alive channel sent, not confirmed yet */
    /* node id lease */
    int lease_state, lease_want;
    unsigned lease_id, lease_ttl;
    bus_lease_cb lease_cb;
    void *lease_ud;
    bool lease_report; /* a result waits for the work timer to deliver it */
    int lease_status;
    char lease_detail[256];
    uv_timer_t lease_timer; /* renewal */
    /* close */
    bool closing, torn_down;
    int handles_closing;
    uint64_t close_deadline;
    void (*done)(void *);
    void *done_arg;
};

static void rc_timer_cb(uv_timer_t *t);
static void rc_lost(rconn_t *rc, const char *why);
static void sub_cb(redisAsyncContext *ac, void *reply, void *priv);
static void work_cb(uv_timer_t *t);
static void lease_try(bus_redis_t *r);
static void lease_renew(bus_redis_t *r);

static void kick_work(bus_redis_t *r) { uv_timer_start(&r->work, work_cb, 0, 0); }

/* ---- URL -------------------------------------------------------------------------------- */

static void set_err(char *err, size_t errlen, const char *msg) {
    if (err && errlen) snprintf(err, errlen, "bad redis URL: %s", msg);
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Percent-decode userinfo s[0..n) into out; only RFC 3986 userinfo characters are taken. */
static int decode_userinfo(const char *s, size_t n, char *out, size_t cap, bool allow_colon) {
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '%') {
            if (i + 2 >= n) return -1;
            int hi = hexval(s[i + 1]), lo = hexval(s[i + 2]);
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) return -1; /* no NUL in AUTH */
            c = (char)(hi << 4 | lo);
            i += 2;
        } else if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                     strchr("-._~!$&'()*+,;=", c) || (c == ':' && allow_colon))) {
            return -1;
        }
        if (o + 1 >= cap) return -1;
        out[o++] = c;
    }
    out[o] = 0;
    return 0;
}

/* Decimal digits s[0..n) into *v, at most maxd digits, at most max. */
static bool parse_dec(const char *s, size_t n, size_t maxd, long max, long *v) {
    if (n == 0 || n > maxd) return false;
    long x = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return false;
        x = x * 10 + (s[i] - '0');
    }
    if (x > max) return false;
    *v = x;
    return true;
}

int bus_redis__parse_url(const char *url, bus_redis_url_t *u, char *err, size_t errlen) {
    memset(u, 0, sizeof *u);
    u->port = 6379;
    if (!url || strncmp(url, "redis://", 8) != 0) {
        set_err(err, errlen, "expected redis://[:password@]host[:port][/db]");
        return CHAT_EINVAL;
    }
    const char *p = url + 8;
    const char *auth_end = p + strcspn(p, "/");
    const char *at = NULL;
    for (const char *s = p; s < auth_end; s++)
        if (*s == '@') at = s;
    const char *hp = p;
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (!colon) {
            set_err(err, errlen, "credentials must be :password@ or user:password@");
            return CHAT_EINVAL;
        }
        if (decode_userinfo(p, (size_t)(colon - p), u->user, sizeof u->user, false) < 0) {
            set_err(err, errlen, "bad character or escape in the user name");
            return CHAT_EINVAL;
        }
        if (colon + 1 == at) {
            set_err(err, errlen, "empty password");
            return CHAT_EINVAL;
        }
        if (decode_userinfo(colon + 1, (size_t)(at - colon - 1), u->password, sizeof u->password,
                            true) < 0) {
            set_err(err, errlen, "bad character or escape in the password (or too long)");
            return CHAT_EINVAL;
        }
        u->has_password = true;
        hp = at + 1;
    }
    const char *after;
    if (hp < auth_end && *hp == '[') {
        const char *rb = memchr(hp, ']', (size_t)(auth_end - hp));
        size_t n = rb ? (size_t)(rb - hp - 1) : 0;
        unsigned char a6[16];
        if (!rb || n == 0 || n >= sizeof u->host) {
            set_err(err, errlen, "bad IPv6 literal");
            return CHAT_EINVAL;
        }
        memcpy(u->host, hp + 1, n);
        u->host[n] = 0;
        if (inet_pton(AF_INET6, u->host, a6) != 1) {
            set_err(err, errlen, "bad IPv6 literal");
            return CHAT_EINVAL;
        }
        after = rb + 1;
    } else {
        const char *e = hp;
        while (e < auth_end && *e != ':') e++;
        size_t n = (size_t)(e - hp);
        if (n == 0) {
            set_err(err, errlen, "missing host");
            return CHAT_EINVAL;
        }
        if (n >= sizeof u->host) {
            set_err(err, errlen, "host name too long");
            return CHAT_EINVAL;
        }
        for (size_t i = 0; i < n; i++) {
            char c = hp[i];
            if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '-' || c == '_')) {
                set_err(err, errlen, "bad character in host");
                return CHAT_EINVAL;
            }
        }
        memcpy(u->host, hp, n);
        u->host[n] = 0;
        after = e;
    }
    if (after < auth_end) {
        long port;
        if (*after != ':') {
            set_err(err, errlen, "unexpected character after host");
            return CHAT_EINVAL;
        }
        if (!parse_dec(after + 1, (size_t)(auth_end - after - 1), 5, 65535, &port) || !port) {
            set_err(err, errlen, "port must be 1..65535");
            return CHAT_EINVAL;
        }
        u->port = (int)port;
    }
    if (*auth_end == '/' && auth_end[1]) {
        long db;
        if (!parse_dec(auth_end + 1, strlen(auth_end + 1), 9, 999999999, &db)) {
            set_err(err, errlen, "db must be a decimal number (nothing may follow it)");
            return CHAT_EINVAL;
        }
        u->db = (int)db;
    }
    return 0;
}

/* ---- small helpers ---------------------------------------------------------------------- */

static uint32_t hash_bytes(const char *s, size_t n) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

/* xorshift64*: jitter only, so the nodes of a cluster do not reconnect in lockstep. */
static uint32_t rng_next(bus_redis_t *r) {
    uint64_t x = r->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->rng = x;
    return (uint32_t)((x * 0x2545F4914F6CDD1DULL) >> 32);
}

static bool chat_id_ok(const char *id, size_t *len) {
    if (!id) return false;
    size_t n = strnlen(id, CHAT_ID_MAX + 1);
    if (n == 0 || n > CHAT_ID_MAX) return false;
    *len = n;
    return true;
}

/* Decimal of v into out (room for 20 digits); returns the length. */
static size_t u64_dec(char *out, uint64_t v) {
    char tmp[20];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++) out[i] = tmp[n - 1 - i];
    return n;
}

/* Error replies are logged at most every 10 s: a broken Redis answers every heartbeat. */
static void log_reply_error(bus_redis_t *r, const char *what, const redisReply *rep) {
    int64_t now = time_now_ms();
    if (now - r->err_log_ms < 10000) return;
    r->err_log_ms = now;
    char err[LOG_VALUE_MAX];
    log_warn("bus_redis_error cmd=%s error=%s", what,
             log_value(err, sizeof err, rep->str, rep->len));
}

/* ---- chat set --------------------------------------------------------------------------- */

static chat_ent_t *set_find(chat_set_t *s, const char *id, size_t len, uint32_t h) {
    if (!s->nb) return NULL;
    for (chat_ent_t *e = s->b[h & (s->nb - 1)]; e; e = e->next)
        if (e->hash == h && e->len == len && memcmp(e->id, id, len) == 0) return e;
    return NULL;
}

static chat_ent_t *set_add(chat_set_t *s, const char *id, size_t len, uint32_t h) {
    if (s->n >= s->nb) {
        size_t nb = s->nb ? s->nb * 2 : 16;
        chat_ent_t **b = calloc(nb, sizeof *b);
        if (!b) return NULL;
        for (size_t i = 0; i < s->nb; i++)
            for (chat_ent_t *e = s->b[i], *next; e; e = next) {
                next = e->next;
                e->next = b[e->hash & (nb - 1)];
                b[e->hash & (nb - 1)] = e;
            }
        free(s->b);
        s->b = b;
        s->nb = nb;
    }
    chat_ent_t *e = calloc(1, sizeof *e + len + 1);
    if (!e) return NULL;
    e->hash = h;
    e->len = len;
    memcpy(e->id, id, len);
    e->next = s->b[h & (s->nb - 1)];
    s->b[h & (s->nb - 1)] = e;
    s->n++;
    return e;
}

static void set_del(chat_set_t *s, chat_ent_t *e) {
    for (chat_ent_t **pp = &s->b[e->hash & (s->nb - 1)]; *pp; pp = &(*pp)->next)
        if (*pp == e) {
            *pp = e->next;
            s->n--;
            free(e);
            return;
        }
}

static void set_free(chat_set_t *s) {
    for (size_t i = 0; i < s->nb; i++)
        for (chat_ent_t *e = s->b[i], *next; e; e = next) {
            next = e->next;
            free(e);
        }
    free(s->b);
    memset(s, 0, sizeof *s);
}

/* ---- publish queue ---------------------------------------------------------------------- */

static size_t rec_size(size_t len) { return (sizeof(pq_rec_t) + len + 7) & ~(size_t)7; }

static pq_rec_t *pq_at(pq_chunk_t *c, size_t off) { return (pq_rec_t *)(void *)(c->data + off); }

static void pq_chunk_release(pq_t *q, pq_chunk_t *c) {
    if (c->cap == PQ_CHUNK && !q->spare) {
        q->spare = c;
    } else {
        free(c);
    }
}

/* Append a record of len bytes; returns where to write them, NULL on OOM. */
static uint8_t *pq_push(pq_t *q, size_t len) {
    size_t need = rec_size(len);
    pq_chunk_t *c = q->last;
    if (c && !q->n && c->cap < need) {
        /* the empty chunk kept for reuse is too small: it must not stay first */
        q->first = q->last = NULL;
        pq_chunk_release(q, c);
        c = NULL;
    }
    if (!c || c->cap - c->used < need) {
        if (q->spare && q->spare->cap >= need) {
            c = q->spare;
            q->spare = NULL;
        } else {
            size_t cap = need > PQ_CHUNK ? need : PQ_CHUNK;
            if (!(c = malloc(sizeof *c + cap))) return NULL;
            c->cap = cap;
        }
        c->next = NULL;
        c->head = c->used = 0;
        if (q->last) q->last->next = c;
        else q->first = c;
        q->last = c;
    }
    pq_rec_t *rec = pq_at(c, c->used);
    rec->seq = q->next_seq++;
    rec->len = (uint32_t)len;
    if (!q->unsent_chunk) {
        q->unsent_chunk = c;
        q->unsent_off = c->used;
    }
    c->used += need;
    q->n++;
    q->n_unsent++;
    q->bytes += len;
    return (uint8_t *)(rec + 1);
}

static void pq_advance_unsent(pq_t *q) {
    pq_chunk_t *c = q->unsent_chunk;
    q->unsent_off += rec_size(pq_at(c, q->unsent_off)->len);
    if (q->unsent_off == c->used) {
        q->unsent_chunk = c->next;
        q->unsent_off = c->next ? c->next->head : 0;
    }
    q->n_unsent--;
}

/* Drop the oldest record; true if it had not been handed to hiredis yet. */
static bool pq_pop(pq_t *q) {
    pq_chunk_t *c = q->first;
    bool unsent = q->unsent_chunk == c && q->unsent_off == c->head;
    if (unsent) pq_advance_unsent(q);
    pq_rec_t *rec = pq_at(c, c->head);
    q->bytes -= rec->len;
    q->n--;
    c->head += rec_size(rec->len);
    if (c->head == c->used) {
        if (c == q->last) {
            c->head = c->used = 0; /* empty queue: keep the chunk for the next publish */
        } else {
            q->first = c->next;
            pq_chunk_release(q, c);
        }
    }
    return unsent;
}

/* Redis answered the PUBLISH of record seq: it and everything older is done with. */
static void pq_ack(pq_t *q, uintptr_t seq) {
    while (q->n) {
        pq_chunk_t *c = q->first;
        if (q->unsent_chunk == c && q->unsent_off == c->head) return;
        if ((intptr_t)(pq_at(c, c->head)->seq - seq) > 0) return;
        pq_pop(q);
    }
}

/* The connection died: whatever it had not acknowledged is sent again on the next one. */
static void pq_rewind(pq_t *q) {
    q->unsent_chunk = q->n ? q->first : NULL;
    q->unsent_off = q->n ? q->first->head : 0;
    q->n_unsent = q->n;
}

static void pq_free(pq_t *q) {
    for (pq_chunk_t *c = q->first, *next; c; c = next) {
        next = c->next;
        free(c);
    }
    free(q->spare);
    q->first = q->last = q->spare = q->unsent_chunk = NULL;
    q->n = q->bytes = q->n_unsent = 0;
}

static void log_dropped(bus_redis_t *r, bool force) {
    if (!r->dropped) return;
    int64_t now = time_now_ms();
    if (!force && now - r->dropped_log_ms < 1000) return;
    log_error("bus_publish_dropped dropped=%zu queued=%zu max_msgs=%zu max_bytes=%zu", r->dropped,
              r->q.n, r->q.max_msgs, r->q.max_bytes);
    r->dropped = 0;
    r->dropped_log_ms = now;
}

static void pub_cb(redisAsyncContext *ac, void *reply, void *priv) {
    rconn_t *rc = ac->data;
    bus_redis_t *r = rc->bus;
    redisReply *rep = reply;
    rc->inflight--;
    if (!rep) return; /* the connection is going: the record stays and is sent again */
    rc->replies++;
    if (rep->type == REDIS_REPLY_ERROR) log_reply_error(r, "publish", rep);
    pq_ack(&r->q, (uintptr_t)priv);
    if (r->closing && !r->q.n && !rc->inflight) kick_work(r);
}

/* Hand every unsent record to hiredis (it writes them when the socket is writable). */
static void pq_send(bus_redis_t *r) {
    pq_t *q = &r->q;
    rconn_t *rc = &r->cmd;
    while (q->unsent_chunk && rc->state == ST_READY) {
        pq_rec_t *rec = pq_at(q->unsent_chunk, q->unsent_off);
        if (redisAsyncFormattedCommand(rc->ac, pub_cb, (void *)rec->seq, (const char *)(rec + 1),
                                       rec->len) != REDIS_OK)
            return; /* the context is closing; the disconnect callback rewinds */
        rc->inflight++;
        pq_advance_unsent(q);
    }
}

/* ---- hiredis on libuv ------------------------------------------------------------------- */
/* Our own adapter instead of <hiredis/adapters/libuv.h>: on a socket error (refused
 * connect, reset) libuv stops the poll handle and reports only a status, which that
 * adapter drops, leaving the connection hung until a timeout. Here hiredis gets to read or
 * write and find the error itself. It also skips uv_poll_start when the event set did not
 * change: every publish asks for write events, and each restart costs epoll syscalls. */

typedef struct ev_poll {
    uv_poll_t poll;
    redisAsyncContext *ac; /* NULL once hiredis cleaned up */
    bus_redis_t *bus;
    int events;
} ev_poll_t;

static void ev_io(uv_poll_t *h, int status, int events) {
    ev_poll_t *p = h->data;
    if (status < 0) {
        events = p->events;
        p->events = 0; /* libuv stopped the handle: the next add re-arms it */
    }
    if (p->ac && (events & UV_READABLE)) redisAsyncHandleRead(p->ac);
    if (p->ac && (events & UV_WRITABLE)) redisAsyncHandleWrite(p->ac);
}

static void ev_set(ev_poll_t *p, int events) {
    if (events == p->events) return;
    p->events = events;
    if (events) uv_poll_start(&p->poll, events, ev_io);
    else uv_poll_stop(&p->poll);
}

static void ev_add_read(void *d) { ev_set(d, ((ev_poll_t *)d)->events | UV_READABLE); }
static void ev_del_read(void *d) { ev_set(d, ((ev_poll_t *)d)->events & ~UV_READABLE); }
static void ev_add_write(void *d) { ev_set(d, ((ev_poll_t *)d)->events | UV_WRITABLE); }
static void ev_del_write(void *d) { ev_set(d, ((ev_poll_t *)d)->events & ~UV_WRITABLE); }

static void ev_closed(uv_handle_t *h) {
    ev_poll_t *p = h->data;
    bus_redis_t *r = p->bus;
    free(p);
    r->polls_open--;
    if (r->closing) kick_work(r);
}

static void ev_cleanup(void *d) {
    ev_poll_t *p = d;
    p->ac = NULL;
    uv_close((uv_handle_t *)&p->poll, ev_closed);
}

static int ev_attach(bus_redis_t *r, redisAsyncContext *ac) {
    ev_poll_t *p = calloc(1, sizeof *p);
    if (!p) return CHAT_ENOMEM;
    if (uv_poll_init_socket(r->loop, &p->poll, ac->c.fd) != 0) {
        free(p);
        return CHAT_EIO;
    }
    p->poll.data = p;
    p->ac = ac;
    p->bus = r;
    r->polls_open++;
    ac->ev.data = p;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    return 0;
}

/* ---- connections ------------------------------------------------------------------------ */

static unsigned backoff_next(bus_redis_t *r, rconn_t *rc) {
    unsigned b = rc->backoff_ms;
    rc->backoff_ms = b * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : b * 2;
    return b / 2 + rng_next(r) % (b / 2 + 1); /* somewhere in [b/2, b] */
}

/* Schedule a teardown from outside hiredis (we may be inside one of its callbacks). */
static void rc_request_kill(rconn_t *rc, const char *why) {
    if (!rc->ac) return; /* down or resolving: nothing to tear down */
    rc->kill_requested = true;
    rc->kill_reason = why;
    uv_timer_start(&rc->timer, rc_timer_cb, 0, 0);
}

/* Free the context now; never from inside one of its callbacks. */
static void rc_kill(rconn_t *rc) {
    if (!rc->ac) return;
    unsigned gen = rc->gen;
    redisAsyncFree(rc->ac); /* runs pending callbacks with NULL, and on_disconnect if it
                             * had connected, which calls rc_lost */
    if (rc->gen == gen) rc_lost(rc, rc->kill_reason);
}

static void sub_up(bus_redis_t *r) {
    rconn_t *rc = &r->sub;
    rc->state = ST_READY;
    log_info("bus_redis_up conn=sub addr=%s:%d db=%d chats=%zu", r->url.host, r->url.port,
             r->url.db, r->chats.n);
    if (r->reported != 1 && !r->closing) {
        r->reported = 1;
        if (r->base.cb.on_state) r->base.cb.on_state(r->base.cb.ud, true);
    }
    lease_try(r);
}

static bool send_subscribe(bus_redis_t *r, const chat_ent_t *e, const char *verb) {
    char chan[CHAN_PREFIX_LEN + CHAT_ID_MAX];
    memcpy(chan, CHAN_PREFIX, CHAN_PREFIX_LEN);
    memcpy(chan + CHAN_PREFIX_LEN, e->id, e->len);
    /* hiredis routes every reply about a channel to the callback of its SUBSCRIBE */
    return redisAsyncCommand(r->sub.ac, sub_cb, r, "%s %b", verb, chan,
                             (size_t)(CHAN_PREFIX_LEN + e->len)) == REDIS_OK;
}

static void rc_ready(rconn_t *rc) {
    bus_redis_t *r = rc->bus;
    uv_timer_stop(&rc->timer);
    rc->backoff_ms = BACKOFF_MIN_MS;
    rc->fails = 0;
    if (rc == &r->cmd) {
        rc->state = ST_READY;
        rc->stall_mark = rc->replies;
        rc->stall_since = uv_now(r->loop);
        log_info("bus_redis_up conn=cmd addr=%s:%d db=%d queued=%zu", r->url.host, r->url.port,
                 r->url.db, r->q.n_unsent);
        log_dropped(r, true);
        pq_send(r);
        if (r->lease_state == LEASE_HELD) lease_renew(r); /* at once: it may have expired */
        lease_try(r);
        return;
    }
    rc->state = ST_RESUB;
    r->unconfirmed = 0;
    /* first the alive channel: until it is confirmed this node may look dead to others, so
     * it does not count as up (nor lease a node id) before that */
    if (redisAsyncCommand(rc->ac, sub_cb, r, "SUBSCRIBE " ALIVE_PREFIX "%s", r->base.instance) !=
        REDIS_OK)
        return;
    r->alive_pending = true;
    r->unconfirmed++;
    for (size_t i = 0; i < r->chats.nb; i++)
        for (chat_ent_t *e = r->chats.b[i]; e; e = e->next) {
            if (!send_subscribe(r, e, "SUBSCRIBE")) return; /* dying: on_disconnect follows */
            e->confirm_pending = true;
            r->unconfirmed++;
        }
    if (!r->unconfirmed) sub_up(r);
}

static void hs_cb(redisAsyncContext *ac, void *reply, void *priv) {
    rconn_t *rc = priv;
    redisReply *rep = reply;
    rc->inflight--;
    if (rep) rc->replies++;
    if (!rep || rc->hs_failed) return;
    if (rep->type == REDIS_REPLY_ERROR) {
        rc->hs_failed = true;
        /* a wrong password: logged once, not every 2 s */
        log_msg(rc->fails ? CHAT_LOG_DEBUG : CHAT_LOG_ERROR,
                "bus_redis_handshake_failed conn=%s addr=%s:%d error=\"%.*s\"", rc->name,
                rc->bus->url.host, rc->bus->url.port, (int)rep->len, rep->str);
        rc_request_kill(rc, "handshake failed");
        return;
    }
    if (--rc->hs_pending == 0) rc_ready(rc);
}

static void ignore_cb(redisAsyncContext *ac, void *reply, void *priv) {
    rconn_t *rc = ac->data;
    redisReply *rep = reply;
    rc->inflight--;
    if (rep) rc->replies++;
    if (rep && rep->type == REDIS_REPLY_ERROR) log_reply_error(rc->bus, priv, rep);
    if (rc->bus->closing && rc == &rc->bus->cmd && !rc->inflight) kick_work(rc->bus);
}

/* CLIENT SETNAME is a convenience: a server that refuses it (or the NOAUTH that follows a
 * failed AUTH, already logged) is not worth a line */
static void setname_cb(redisAsyncContext *ac, void *reply, void *priv) {
    rconn_t *rc = ac->data;
    redisReply *rep = reply;
    rc->inflight--;
    if (rep) rc->replies++;
    if (rep && rep->type == REDIS_REPLY_ERROR) {
        char err[LOG_VALUE_MAX];
        log_debug("bus_redis_setname_failed conn=%s error=%s", rc->name,
                  log_value(err, sizeof err, rep->str, rep->len));
    }
}

static void on_connect(const redisAsyncContext *cac, int status) {
    rconn_t *rc = cac->data;
    bus_redis_t *r = rc->bus;
    if (status != REDIS_OK) {
        rc_lost(rc, cac->c.errstr); /* hiredis frees the context when we return */
        return;
    }
    redisAsyncContext *ac = rc->ac;
    redisEnableKeepAlive(&ac->c); /* the sub connection is otherwise silent for hours */
    rc->state = ST_HANDSHAKE;
    rc->hs_pending = 0;
    int ok = REDIS_OK;
    /* AUTH and SELECT first, then PING: a server that wants a password we lack, or is still
     * loading its data, fails the handshake instead of our first real command. */
    if (r->url.has_password) {
        if (r->url.user[0])
            ok |= redisAsyncCommand(ac, hs_cb, rc, "AUTH %s %s", r->url.user, r->url.password);
        else ok |= redisAsyncCommand(ac, hs_cb, rc, "AUTH %s", r->url.password);
        rc->hs_pending++;
    }
    if (r->url.db) {
        ok |= redisAsyncCommand(ac, hs_cb, rc, "SELECT %d", r->url.db);
        rc->hs_pending++;
    }
    /* a name for CLIENT LIST / CLIENT KILL: chatd-<instance>-<sub|cmd> */
    ok |= redisAsyncCommand(ac, setname_cb, NULL, "CLIENT SETNAME chatd-%s-%s", r->base.instance,
                            rc->name);
    ok |= redisAsyncCommand(ac, hs_cb, rc, "PING");
    rc->hs_pending++;
    rc->inflight += rc->hs_pending + 1;
    if (ok != REDIS_OK) rc_request_kill(rc, "cannot send the handshake");
}

static void on_disconnect(const redisAsyncContext *cac, int status) {
    rconn_t *rc = cac->data;
    rc_lost(rc, cac->c.err ? cac->c.errstr : rc->kill_reason ? rc->kill_reason : "closed");
}

static void rc_start_tcp(rconn_t *rc, const char *ip) {
    bus_redis_t *r = rc->bus;
    char why[160];
    redisAsyncContext *ac = redisAsyncConnect(ip, r->url.port);
    if (!ac) {
        rc_lost(rc, "out of memory");
        return;
    }
    if (ac->err || ev_attach(r, ac) < 0) {
        snprintf(why, sizeof why, "%s", ac->err ? ac->c.errstr : "cannot poll the socket");
        redisAsyncFree(ac); /* no callbacks set: nothing runs */
        rc_lost(rc, why);
        return;
    }
    ac->data = rc;
    rc->ac = ac;
    rc->state = ST_CONNECTING;
    rc->kill_reason = "connect timeout";
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    uv_timer_start(&rc->timer, rc_timer_cb, CONNECT_TIMEOUT_MS, 0);
}

static void gai_cb(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
    rconn_t *rc = req->data;
    bus_redis_t *r = rc->bus;
    r->gai_pending--;
    if (r->closing) {
        uv_freeaddrinfo(res);
        rc->state = ST_DOWN;
        kick_work(r);
        return;
    }
    if (status < 0 || !res) {
        char why[160];
        snprintf(why, sizeof why, "cannot resolve: %s", uv_strerror(status));
        uv_freeaddrinfo(res);
        rc_lost(rc, why);
        return;
    }
    const struct addrinfo *pick = res;
    for (const struct addrinfo *a = res; a; a = a->ai_next)
        if (a->ai_family == AF_INET) { /* Redis binds IPv4 by default */
            pick = a;
            break;
        }
    char ip[64] = "";
    if (pick->ai_family == AF_INET6)
        uv_ip6_name((const struct sockaddr_in6 *)(const void *)pick->ai_addr, ip, sizeof ip);
    else uv_ip4_name((const struct sockaddr_in *)(const void *)pick->ai_addr, ip, sizeof ip);
    uv_freeaddrinfo(res);
    rc_start_tcp(rc, ip);
}

static void rc_connect(rconn_t *rc) {
    bus_redis_t *r = rc->bus;
    rc->hs_failed = false;
    rc->kill_requested = false;
    if (r->numeric_host) {
        rc_start_tcp(rc, r->url.host);
        return;
    }
    /* hiredis would call getaddrinfo on the loop thread: resolve on the thread pool */
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    rc->state = ST_RESOLVING;
    rc->gai.data = rc;
    int rv = uv_getaddrinfo(r->loop, &rc->gai, gai_cb, r->url.host, NULL, &hints);
    if (rv < 0) {
        rc_lost(rc, uv_strerror(rv));
        return;
    }
    r->gai_pending++;
}

static void rc_timer_cb(uv_timer_t *t) {
    rconn_t *rc = t->data;
    bus_redis_t *r = rc->bus;
    if (r->closing) return;
    switch (rc->state) {
    case ST_DOWN:
        if (rc == &r->cmd && r->hold_cmd) return;
        rc_connect(rc);
        return;
    case ST_RESOLVING: return;
    case ST_CONNECTING:
    case ST_HANDSHAKE:
        rc_kill(rc); /* connect timeout, or a failed handshake */
        return;
    default:
        if (rc->kill_requested) rc_kill(rc);
        else if (rc->state == ST_RESUB && !r->unconfirmed) sub_up(r); /* see r_unsubscribe */
        return;
    }
}

/* The connection is gone (hiredis is freeing the context, or never made one). */
static void rc_lost(rconn_t *rc, const char *why) {
    bus_redis_t *r = rc->bus;
    bool was_up = rc->state >= ST_RESUB;
    rc->gen++;
    rc->ac = NULL;
    rc->state = ST_DOWN;
    rc->inflight = 0;
    rc->kill_requested = false;
    uv_timer_stop(&rc->timer);
    if (rc == &r->cmd) {
        pq_rewind(&r->q);
    } else {
        r->unconfirmed = 0;
        r->alive_pending = false;
        for (size_t i = 0; i < r->chats.nb; i++)
            for (chat_ent_t *e = r->chats.b[i]; e; e = e->next) e->confirm_pending = false;
    }
    if (r->closing) {
        kick_work(r);
        return;
    }
    unsigned delay = backoff_next(r, rc);
    if (!why || !*why) why = "closed";
    if (was_up)
        log_warn("bus_redis_down conn=%s addr=%s:%d error=%s retry_ms=%u queued=%zu", rc->name,
                 r->url.host, r->url.port, LOG_STR(why), delay, r->q.n);
    else if (rc->fails++ == 0)
        log_warn("bus_redis_connect_failed conn=%s addr=%s:%d error=%s retry_ms=%u", rc->name,
                 r->url.host, r->url.port, LOG_STR(why), delay);
    else
        log_debug("bus_redis_connect_failed conn=%s addr=%s:%d error=%s retry_ms=%u "
                  "attempt=%u",
                  rc->name, r->url.host, r->url.port, LOG_STR(why), delay, rc->fails);
    if (!(rc == &r->cmd && r->hold_cmd)) uv_timer_start(&rc->timer, rc_timer_cb, delay, 0);
    /* last: the server may call us back from here */
    if (rc == &r->sub && r->reported != 0) {
        r->reported = 0;
        if (r->base.cb.on_state) r->base.cb.on_state(r->base.cb.ud, false);
    }
}

/* ---- subscriber side -------------------------------------------------------------------- */

static bool rep_is(const redisReply *e, const char *s, size_t n) {
    return e->type == REDIS_REPLY_STRING && e->len == n && memcmp(e->str, s, n) == 0;
}

static void sub_cb(redisAsyncContext *ac, void *reply, void *priv) {
    bus_redis_t *r = priv;
    redisReply *rep = reply;
    if (!rep || r->closing || rep->type != REDIS_REPLY_ARRAY || rep->elements < 3) return;
    const redisReply *kind = rep->element[0], *chan = rep->element[1], *body = rep->element[2];
    if (chan->type == REDIS_REPLY_STRING && chan->len == sizeof ALIVE_PREFIX - 1 + INSTANCE_LEN &&
        memcmp(chan->str, ALIVE_PREFIX, sizeof ALIVE_PREFIX - 1) == 0) {
        if (rep_is(kind, "subscribe", 9) && r->alive_pending) {
            r->alive_pending = false;
            if (--r->unconfirmed == 0 && r->sub.state == ST_RESUB) sub_up(r);
        }
        return; /* nothing is ever published there */
    }
    if (chan->type != REDIS_REPLY_STRING || chan->len <= CHAN_PREFIX_LEN ||
        chan->len > CHAN_PREFIX_LEN + CHAT_ID_MAX || memcmp(chan->str, CHAN_PREFIX, 5) != 0)
        return;
    const char *id = chan->str + CHAN_PREFIX_LEN;
    size_t idlen = chan->len - CHAN_PREFIX_LEN;
    chat_ent_t *e = set_find(&r->chats, id, idlen, hash_bytes(id, idlen));
    if (rep_is(kind, "message", 7)) {
        if (!e || body->type != REDIS_REPLY_STRING) return; /* unsubscribed meanwhile */
        if (body->len <= INSTANCE_LEN || body->str[INSTANCE_LEN] != '|') {
            log_debug("bus_redis_bad_message chat=%s len=%zu", e->id, body->len);
            return;
        }
        if (memcmp(body->str, r->base.instance, INSTANCE_LEN) == 0) return; /* our own echo */
        /* a copy: the server may unsubscribe (freeing e) during the call */
        char idbuf[CHAT_ID_MAX + 1];
        memcpy(idbuf, id, idlen);
        idbuf[idlen] = 0;
        if (r->base.cb.on_message)
            r->base.cb.on_message(r->base.cb.ud, idbuf,
                                  (const uint8_t *)body->str + INSTANCE_LEN + 1,
                                  body->len - INSTANCE_LEN - 1);
    } else if (rep_is(kind, "subscribe", 9)) {
        if (!e) return;
        if (r->base.cb.on_subscribed) {
            char idbuf[CHAT_ID_MAX + 1];
            memcpy(idbuf, id, idlen);
            idbuf[idlen] = 0;
            r->base.cb.on_subscribed(r->base.cb.ud, idbuf);
            /* the callback may unsubscribe: look the entry up again */
            e = set_find(&r->chats, id, idlen, hash_bytes(id, idlen));
            if (!e) return;
        }
        if (!e->confirm_pending) return;
        e->confirm_pending = false;
        if (--r->unconfirmed == 0 && r->sub.state == ST_RESUB) sub_up(r);
    }
}

static int r_subscribe(bus_t *b, const char *chat_id) {
    bus_redis_t *r = (bus_redis_t *)b;
    size_t len;
    if (r->closing) return CHAT_ECLOSED;
    if (!chat_id_ok(chat_id, &len)) return CHAT_EINVAL;
    uint32_t h = hash_bytes(chat_id, len);
    if (set_find(&r->chats, chat_id, len, h)) return 0;
    chat_ent_t *e = set_add(&r->chats, chat_id, len, h);
    if (!e) return CHAT_ENOMEM;
    /* before RESUB the whole set is (re)subscribed when the handshake completes */
    if (r->sub.state == ST_RESUB || r->sub.state == ST_READY) {
        if (send_subscribe(r, e, "SUBSCRIBE") && r->sub.state == ST_RESUB) {
            e->confirm_pending = true;
            r->unconfirmed++;
        }
    }
    return 0;
}

static int r_unsubscribe(bus_t *b, const char *chat_id) {
    bus_redis_t *r = (bus_redis_t *)b;
    size_t len;
    if (r->closing) return CHAT_ECLOSED;
    if (!chat_id_ok(chat_id, &len)) return CHAT_EINVAL;
    chat_ent_t *e = set_find(&r->chats, chat_id, len, hash_bytes(chat_id, len));
    if (!e) return 0;
    if (r->sub.state == ST_RESUB || r->sub.state == ST_READY) send_subscribe(r, e, "UNSUBSCRIBE");
    bool last = false;
    if (e->confirm_pending) last = --r->unconfirmed == 0 && r->sub.state == ST_RESUB;
    set_del(&r->chats, e);
    /* the chat that held up the resubscribe is gone: report up from the timer, not from
     * inside the caller's unsubscribe */
    if (last) uv_timer_start(&r->sub.timer, rc_timer_cb, 0, 0);
    return 0;
}

/* ---- publish ---------------------------------------------------------------------------- */

static uint8_t *put(uint8_t *w, const void *p, size_t n) {
    if (n) memcpy(w, p, n);
    return w + n;
}

/* Bounded: the oldest go first (those already written are most likely delivered); then
 * hand the rest to hiredis. */
static void pq_bound_and_send(bus_redis_t *r) {
    while (r->q.n > 1 && (r->q.n > r->q.max_msgs || r->q.bytes > r->q.max_bytes))
        if (pq_pop(&r->q)) r->dropped++;
    log_dropped(r, false);
    pq_send(r);
}

static int r_publish(bus_t *b, const char *chat_id, const void *payload, size_t len) {
    bus_redis_t *r = (bus_redis_t *)b;
    size_t idlen;
    if (r->closing) return CHAT_ECLOSED;
    if (!chat_id_ok(chat_id, &idlen) || (!payload && len)) return CHAT_EINVAL;
    if (len > r->q.max_bytes / 2 || len > (size_t)INT32_MAX) return CHAT_ETOOBIG;
    /* "*3 $7 PUBLISH $<chan> chat:<id> $<msg> <instance>|<payload>", ready for the wire */
    size_t chlen = CHAN_PREFIX_LEN + idlen, msglen = INSTANCE_LEN + 1 + len;
    char nch[24], nmsg[24];
    size_t nchlen = u64_dec(nch, chlen), nmsglen = u64_dec(nmsg, msglen);
    static const char head[] = "*3\r\n$7\r\nPUBLISH\r\n$";
    size_t total = sizeof head - 1 + nchlen + 2 + chlen + 3 + nmsglen + 2 + msglen + 2;
    uint8_t *w = pq_push(&r->q, total);
    if (!w) return CHAT_ENOMEM;
    w = put(w, head, sizeof head - 1);
    w = put(w, nch, nchlen);
    w = put(w, "\r\n" CHAN_PREFIX, 2 + CHAN_PREFIX_LEN);
    w = put(w, chat_id, idlen);
    w = put(w, "\r\n$", 3);
    w = put(w, nmsg, nmsglen);
    w = put(w, "\r\n", 2);
    w = put(w, r->base.instance, INSTANCE_LEN);
    w = put(w, "|", 1);
    w = put(w, payload, len);
    put(w, "\r\n", 2);
    pq_bound_and_send(r);
    return 0;
}

/* ---- presence --------------------------------------------------------------------------- */

/* Queue one formatted command (taken over: freed here) behind the publishes. */
static int pq_push_cmd(bus_redis_t *r, char *cmd, long long len) {
    if (len < 0) return CHAT_ENOMEM;
    uint8_t *w = pq_push(&r->q, (size_t)len);
    if (w) memcpy(w, cmd, (size_t)len);
    redisFreeCommand(cmd);
    return w ? 0 : CHAT_ENOMEM;
}

static int r_presence_set(bus_t *b, const char *chat_id, const char *user, bool online) {
    bus_redis_t *r = (bus_redis_t *)b;
    size_t idlen, ulen = user ? strlen(user) : 0;
    if (r->closing) return CHAT_ECLOSED;
    if (!chat_id_ok(chat_id, &idlen) || !ulen || ulen > 1024) return CHAT_EINVAL;
    char key[sizeof PRESENCE_PREFIX + CHAT_ID_MAX], field[INSTANCE_LEN + 1025];
    int klen = snprintf(key, sizeof key, PRESENCE_PREFIX "%s", chat_id);
    memcpy(field, r->base.instance, INSTANCE_LEN);
    memcpy(field + INSTANCE_LEN, user, ulen);
    char *cmd = NULL;
    long long len;
    int rc;
    if (online) {
        len =
            redisFormatCommand(&cmd, "HSET %b %b 1", key, (size_t)klen, field, INSTANCE_LEN + ulen);
        if ((rc = pq_push_cmd(r, cmd, len)) < 0) return rc;
        len = redisFormatCommand(&cmd, "PEXPIRE %b %d", key, (size_t)klen, PRESENCE_KEY_TTL_MS);
    } else {
        len = redisFormatCommand(&cmd, "HDEL %b %b", key, (size_t)klen, field, INSTANCE_LEN + ulen);
    }
    if ((rc = pq_push_cmd(r, cmd, len)) < 0) return rc;
    pq_bound_and_send(r);
    return 0;
}

typedef struct presence_req {
    bus_presence_cb cb;
    void *ud;
} presence_req_t;

static void presence_cb(redisAsyncContext *ac, void *reply, void *priv) {
    rconn_t *rc = ac->data;
    presence_req_t *q = priv;
    redisReply *rep = reply;
    rc->inflight--;
    if (rep) rc->replies++;
    if (!rep || rep->type != REDIS_REPLY_ARRAY) {
        if (rep && rep->type == REDIS_REPLY_ERROR) log_reply_error(rc->bus, "presence", rep);
        q->cb(q->ud, CHAT_EIO, NULL, 0);
        free(q);
        return;
    }
    size_t bytes = 1, n = 0;
    for (size_t i = 0; i < rep->elements; i++)
        if (rep->element[i]->type == REDIS_REPLY_STRING) bytes += rep->element[i]->len + 1;
    bus_presence_t *p = calloc(rep->elements ? rep->elements : 1, sizeof *p);
    char *users = p ? malloc(bytes) : NULL, *u = users;
    for (size_t i = 0; users && i < rep->elements; i++) {
        const redisReply *e = rep->element[i];
        if (e->type != REDIS_REPLY_STRING || e->len <= INSTANCE_LEN || memchr(e->str, 0, e->len))
            continue; /* not written by us */
        memcpy(p[n].node, e->str, INSTANCE_LEN);
        p[n].node[INSTANCE_LEN] = 0;
        memcpy(u, e->str + INSTANCE_LEN, e->len - INSTANCE_LEN);
        u[e->len - INSTANCE_LEN] = 0;
        p[n++].user = u;
        u += e->len - INSTANCE_LEN + 1;
    }
    q->cb(q->ud, users ? 0 : CHAT_ENOMEM, users ? p : NULL, users ? n : 0);
    free(users);
    free(p);
    free(q);
}

static int r_presence_list(bus_t *b, const char *chat_id, bus_presence_cb cb, void *ud) {
    bus_redis_t *r = (bus_redis_t *)b;
    rconn_t *rc = &r->cmd;
    size_t idlen;
    if (r->closing) return CHAT_ECLOSED;
    if (!cb || !chat_id_ok(chat_id, &idlen)) return CHAT_EINVAL;
    if (rc->state != ST_READY) return CHAT_EIO;
    presence_req_t *q = malloc(sizeof *q);
    if (!q) return CHAT_ENOMEM;
    q->cb = cb;
    q->ud = ud;
    if (redisAsyncCommand(rc->ac, presence_cb, q, "EVAL %s 1 " PRESENCE_PREFIX "%b", PRESENCE_LIST,
                          chat_id, idlen) != REDIS_OK) {
        free(q);
        return CHAT_EIO;
    }
    rc->inflight++;
    return 0;
}

/* ---- discovery -------------------------------------------------------------------------- */

/* A Redis that stopped answering (hung, or a network that drops packets: TCP keepalive
 * does not probe while our data waits for an ACK) would otherwise keep the connections
 * "up" for many minutes. The server calls heartbeat every second, which is our clock. */
static bool stalled(bus_redis_t *r) {
    rconn_t *rc = &r->cmd;
    uint64_t now = uv_now(r->loop);
    if (rc->inflight <= 0 || rc->replies != rc->stall_mark) {
        rc->stall_mark = rc->replies;
        rc->stall_since = now;
        return false;
    }
    if (now - rc->stall_since < r->stall_ms) return false;
    log_warn("bus_redis_stalled addr=%s:%d waiting=%d no_reply_ms=%" PRIu64, r->url.host,
             r->url.port, rc->inflight, now - rc->stall_since);
    /* the subscriber connection to the same server is as dead, just silent about it */
    rc_request_kill(&r->sub, "no reply from the server");
    rc_request_kill(rc, "no reply from the server");
    return true;
}

static int r_heartbeat(bus_t *b, const bus_node_t *self, unsigned ttl_ms) {
    bus_redis_t *r = (bus_redis_t *)b;
    rconn_t *rc = &r->cmd;
    if (r->closing) return CHAT_ECLOSED;
    if (!self || !self->id[0] || !ttl_ms) return CHAT_EINVAL;
    if (rc->state != ST_READY || stalled(r)) return CHAT_EIO;
    int64_t now = time_now_ms();
    char key[sizeof NODE_PREFIX + sizeof self->id], conns[24], started[24], seen[24], old[24],
        nodeid[24];
    size_t idlen = strnlen(self->id, sizeof self->id - 1);
    int keylen = snprintf(key, sizeof key, NODE_PREFIX "%.*s", (int)idlen, self->id);
    snprintf(conns, sizeof conns, "%" PRIu64, self->connections);
    snprintf(started, sizeof started, "%" PRId64, self->started_at);
    snprintf(seen, sizeof seen, "%" PRId64, now);
    snprintf(nodeid, sizeof nodeid, "%d", self->node_id);
    snprintf(old, sizeof old, "(%" PRId64, now - NODES_WINDOW_MS);
    size_t urllen = strnlen(self->url, sizeof self->url - 1);
    redisAsyncContext *ac = rc->ac;
    /* one transaction: the hash never outlives its TTL, and the index follows it */
    int ok = redisAsyncCommand(ac, ignore_cb, "multi", "MULTI");
    ok |= redisAsyncCommand(ac, ignore_cb, "hset",
                            "HSET %b url %b connections %s started_at %s seen_at %s draining %s "
                            "node_id %s",
                            key, (size_t)keylen, self->url, urllen, conns, started, seen,
                            self->draining ? "1" : "0", nodeid);
    ok |= redisAsyncCommand(ac, ignore_cb, "pexpire", "PEXPIRE %b %u", key, (size_t)keylen, ttl_ms);
    ok |=
        redisAsyncCommand(ac, ignore_cb, "zadd", "ZADD " NODES_KEY " %s %b", seen, self->id, idlen);
    /* entries of nodes that died long ago, so the index does not grow forever */
    ok |= redisAsyncCommand(ac, ignore_cb, "zremrangebyscore",
                            "ZREMRANGEBYSCORE " NODES_KEY " -inf %s", old);
    ok |= redisAsyncCommand(ac, ignore_cb, "exec", "EXEC");
    rc->inflight += 6;
    return ok == REDIS_OK ? 0 : CHAT_EIO;
}

static int r_deregister(bus_t *b, const char *id) {
    bus_redis_t *r = (bus_redis_t *)b;
    rconn_t *rc = &r->cmd;
    if (r->closing) return CHAT_ECLOSED;
    if (!id || !*id || strlen(id) > INSTANCE_LEN) return CHAT_EINVAL;
    if (rc->state != ST_READY) return CHAT_EIO;
    int ok = redisAsyncCommand(rc->ac, ignore_cb, "del", "DEL " NODE_PREFIX "%s", id);
    ok |= redisAsyncCommand(rc->ac, ignore_cb, "zrem", "ZREM " NODES_KEY " %s", id);
    rc->inflight += 2;
    return ok == REDIS_OK ? 0 : CHAT_EIO;
}

static void list_free(list_req_t *q) {
    free(q->nodes);
    free(q->dead);
    free(q);
}

/* Every reply of the request is in: answer (errors wait for the next loop turn, since we
 * may be inside hiredis freeing the context). */
static void list_finish(list_req_t *q) {
    bus_redis_t *r = q->bus;
    if (q->pending) return;
    if (q->failed) {
        queue_insert_tail(&r->failed, &q->link);
        kick_work(r);
        return;
    }
    size_t live = 0;
    for (size_t i = 0; i < q->got; i++)
        if (q->nodes[i].id[0] && !q->dead[i]) q->nodes[live++] = q->nodes[i];
    q->cb(q->ud, 0, q->nodes, live);
    list_free(q);
}

static bool parse_i64(const redisReply *e, int64_t *v) {
    if (e->type != REDIS_REPLY_STRING || !e->len || e->len > 20) return false;
    char buf[24], *end;
    memcpy(buf, e->str, e->len);
    buf[e->len] = 0;
    long long x = strtoll(buf, &end, 10);
    if (*end) return false;
    *v = x;
    return true;
}

/* The bookkeeping of every answer to a node listing's commands: one fewer in flight on the
 * connection and in the listing. Returns the reply (NULL: the connection went away). */
static redisReply *list_reply(redisAsyncContext *ac, void *reply, list_req_t *q) {
    rconn_t *rc = ac->data;
    rc->inflight--;
    q->pending--;
    if (reply) rc->replies++;
    return reply;
}

static void node_cb(redisAsyncContext *ac, void *reply, void *priv) {
    list_req_t *q = priv;
    redisReply *rep = list_reply(ac, reply, q);
    rconn_t *rc = ac->data; /* for the commands this answer issues */
    bus_node_t *nd = &q->nodes[q->got++];
    int64_t conns, started, seen, draining, node_id;
    if (!rep) {
        q->failed = true;
    } else if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 6) {
        if (rep->type == REDIS_REPLY_ERROR) log_reply_error(q->bus, "hmget", rep);
        nd->id[0] = 0;
    } else if (rep->element[0]->type == REDIS_REPLY_NIL) {
        /* its key expired: the node stopped sending heartbeats; tidy the index */
        if (!q->bus->closing &&
            redisAsyncCommand(ac, ignore_cb, "zrem", "ZREM " NODES_KEY " %s", nd->id) == REDIS_OK)
            rc->inflight++;
        nd->id[0] = 0;
    } else if (rep->element[0]->type != REDIS_REPLY_STRING || !parse_i64(rep->element[1], &conns) ||
               !parse_i64(rep->element[2], &started) || !parse_i64(rep->element[3], &seen) ||
               !parse_i64(rep->element[4], &draining) || conns < 0) {
        nd->id[0] = 0; /* not written by us: skip it */
    } else {
        size_t n =
            rep->element[0]->len < sizeof nd->url ? rep->element[0]->len : sizeof nd->url - 1;
        memcpy(nd->url, rep->element[0]->str, n);
        nd->url[n] = 0;
        nd->connections = (uint64_t)conns;
        nd->started_at = started;
        nd->seen_at = seen;
        nd->draining = draining != 0;
        /* absent from an entry written before node ids were reported */
        nd->node_id = parse_i64(rep->element[5], &node_id) && node_id >= 0 && node_id < NODE_IDS
                          ? (int)node_id
                          : -1;
    }
    list_finish(q);
}

static void alive_cb(redisAsyncContext *ac, void *reply, void *priv) {
    list_req_t *q = priv;
    redisReply *rep = list_reply(ac, reply, q);
    if (!rep) {
        q->failed = true;
    } else if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2 * q->n) {
        /* then the heartbeat TTL alone decides, as before */
        if (rep->type == REDIS_REPLY_ERROR) log_reply_error(q->bus, "pubsub numsub", rep);
    } else {
        for (size_t i = 0; i < q->n; i++) {
            const redisReply *e = rep->element[2 * i + 1];
            q->dead[i] = e->type == REDIS_REPLY_INTEGER && e->integer == 0;
        }
    }
    list_finish(q);
}

/* PUBSUB NUMSUB chat:alive:<id> for every node of q. */
static void alive_ask(list_req_t *q, redisAsyncContext *ac) {
    rconn_t *rc = ac->data;
    size_t argc = 2 + q->n;
    const char **argv = calloc(argc, sizeof *argv);
    size_t *lens = calloc(argc, sizeof *lens);
    char *chans = calloc(q->n, sizeof ALIVE_PREFIX + INSTANCE_LEN);
    if (argv && lens && chans) {
        argv[0] = "PUBSUB";
        argv[1] = "NUMSUB";
        lens[0] = 6;
        lens[1] = 6;
        for (size_t i = 0; i < q->n; i++) {
            char *c = chans + i * (sizeof ALIVE_PREFIX + INSTANCE_LEN);
            lens[2 + i] = (size_t)snprintf(c, sizeof ALIVE_PREFIX + INSTANCE_LEN, ALIVE_PREFIX "%s",
                                           q->nodes[i].id);
            argv[2 + i] = c;
        }
        if (redisAsyncCommandArgv(ac, alive_cb, q, (int)argc, argv, lens) == REDIS_OK) {
            rc->inflight++;
            q->pending++;
        }
    }
    /* on failure (out of memory) the list is answered without the liveness check */
    free(argv);
    free(lens);
    free(chans);
}

static void ids_cb(redisAsyncContext *ac, void *reply, void *priv) {
    list_req_t *q = priv;
    redisReply *rep = list_reply(ac, reply, q);
    rconn_t *rc = ac->data; /* for the commands this answer issues */
    if (!rep || rep->type != REDIS_REPLY_ARRAY) {
        if (rep && rep->type == REDIS_REPLY_ERROR) log_reply_error(q->bus, "zrangebyscore", rep);
        q->failed = true;
        list_finish(q);
        return;
    }
    size_t cap = rep->elements ? rep->elements : 1;
    if (!(q->nodes = calloc(cap, sizeof *q->nodes)) || !(q->dead = calloc(cap, sizeof *q->dead))) {
        q->failed = true;
        list_finish(q);
        return;
    }
    for (size_t i = 0; i < rep->elements; i++) {
        const redisReply *e = rep->element[i];
        if (e->type != REDIS_REPLY_STRING || !e->len || e->len >= sizeof q->nodes->id ||
            memchr(e->str, 0, e->len))
            continue;
        bus_node_t *nd = &q->nodes[q->n];
        memcpy(nd->id, e->str, e->len);
        nd->id[e->len] = 0;
        if (q->bus->closing ||
            redisAsyncCommand(ac, node_cb, q,
                              "HMGET " NODE_PREFIX "%s url connections started_at seen_at draining "
                              "node_id",
                              nd->id) != REDIS_OK) {
            q->failed = true;
            break;
        }
        rc->inflight++;
        q->pending++;
        q->n++;
    }
    /* In the same pipeline, so no extra round trip: which of them still have a connection
     * to Redis (its reply comes after every HMGET's). */
    if (!q->failed && q->n) alive_ask(q, ac);
    list_finish(q);
}

static int r_list_nodes(bus_t *b, bus_nodes_cb cb, void *ud) {
    bus_redis_t *r = (bus_redis_t *)b;
    rconn_t *rc = &r->cmd;
    if (r->closing) return CHAT_ECLOSED;
    if (!cb) return CHAT_EINVAL;
    if (rc->state != ST_READY) return CHAT_EIO;
    list_req_t *q = calloc(1, sizeof *q);
    if (!q) return CHAT_ENOMEM;
    q->bus = r;
    q->cb = cb;
    q->ud = ud;
    char min[24];
    snprintf(min, sizeof min, "%" PRId64, time_now_ms() - NODES_WINDOW_MS);
    if (redisAsyncCommand(rc->ac, ids_cb, q, "ZRANGEBYSCORE " NODES_KEY " %s +inf", min) !=
        REDIS_OK) {
        free(q);
        return CHAT_EIO;
    }
    rc->inflight++;
    q->pending = 1;
    return 0;
}

/* ---- the node id lease ------------------------------------------------------------------ */
/* Results go to the caller from the work timer, never from inside hiredis: the server may
 * start a shutdown (and close us) from its callback. */

static void lease_finish(bus_redis_t *r, int status, const char *fmt, const char *arg) {
    r->lease_state = status == 0 ? LEASE_HELD : LEASE_OVER;
    r->lease_status = status;
    snprintf(r->lease_detail, sizeof r->lease_detail, fmt, arg ? arg : "");
    r->lease_report = true;
    kick_work(r);
}

static void lease_deliver(bus_redis_t *r) {
    if (!r->lease_report || r->closing) return;
    r->lease_report = false;
    if (r->lease_cb) r->lease_cb(r->lease_ud, r->lease_status, r->lease_id, r->lease_detail);
}

static void lease_timer_cb(uv_timer_t *t) { lease_renew(t->data); }

static void lease_acquire_cb(redisAsyncContext *ac, void *reply, void *priv) {
    bus_redis_t *r = priv;
    rconn_t *rc = ac->data;
    redisReply *rep = reply;
    rc->inflight--;
    if (!rep) {
        /* the connection went: ask again on the next one (the answer may have been a grant:
         * the script then finds the id ours and keeps it) */
        if (r->lease_state == LEASE_ASKING) r->lease_state = LEASE_WAIT;
        return;
    }
    rc->replies++;
    /* closing: nobody waits for the answer; a grant lingers until its TTL, and is free to
     * take at once meanwhile (our alive channel is gone with our connections) */
    if (r->lease_state != LEASE_ASKING || r->closing) return;
    if (rep->type == REDIS_REPLY_ERROR) {
        char why[128];
        snprintf(why, sizeof why, "%.*s", (int)(rep->len < 100 ? rep->len : 100), rep->str);
        lease_finish(r, CHAT_EIO, "Redis refused the node id lease script: %s", why);
        return;
    }
    if (rep->type != REDIS_REPLY_ARRAY || !rep->elements ||
        rep->element[0]->type != REDIS_REPLY_INTEGER) {
        lease_finish(r, CHAT_EIO, "unexpected answer to the node id lease script%s", NULL);
        return;
    }
    long long v = rep->element[0]->integer;
    if (v >= 0 && v < NODE_IDS) {
        r->lease_id = (unsigned)v;
        lease_finish(r, 0, "%s", NULL);
        uv_timer_start(&r->lease_timer, lease_timer_cb, r->lease_ttl / 5, r->lease_ttl / 5);
    } else if (v == -1) {
        char holder[40] = "?";
        if (rep->elements > 1 && rep->element[1]->type == REDIS_REPLY_STRING)
            snprintf(holder, sizeof holder, "%.*s",
                     (int)(rep->element[1]->len < 32 ? rep->element[1]->len : 32),
                     rep->element[1]->str);
        lease_finish(r, CHAT_EBUSY, "held by the live node %s", holder);
    } else {
        lease_finish(r, CHAT_ERANGE, "all 1024 node ids are held by live nodes%s", NULL);
    }
}

/* Ask for the lease once both connections are up: the subscriber's alive channel must be
 * confirmed before we hold an id, or a second node could find us "dead" and take it. */
static void lease_try(bus_redis_t *r) {
    rconn_t *rc = &r->cmd;
    if (r->lease_state != LEASE_WAIT || r->closing) return;
    if (rc->state != ST_READY || r->sub.state != ST_READY) return;
    char want[16], ttl[16], start[16];
    snprintf(want, sizeof want, "%d", r->lease_want);
    snprintf(ttl, sizeof ttl, "%u", r->lease_ttl);
    /* a random first id: nodes starting together do not all contend for the same ones */
    snprintf(start, sizeof start, "%u", rng_next(r) % NODE_IDS);
    if (redisAsyncCommand(rc->ac, lease_acquire_cb, r, "EVAL %s 0 %s %s %s %s", LEASE_ACQUIRE, want,
                          r->base.instance, ttl, start) != REDIS_OK)
        return; /* dying: tried again when it is back */
    rc->inflight++;
    r->lease_state = LEASE_ASKING;
}

static void lease_renew_cb(redisAsyncContext *ac, void *reply, void *priv) {
    bus_redis_t *r = priv;
    rconn_t *rc = ac->data;
    redisReply *rep = reply;
    rc->inflight--;
    if (!rep) return; /* renewed on the next connection */
    rc->replies++;
    if (r->lease_state != LEASE_HELD || r->closing) return;
    if (rep->type == REDIS_REPLY_ERROR) {
        log_reply_error(r, "node id lease renewal", rep);
        return;
    }
    if (rep->type != REDIS_REPLY_INTEGER) return;
    if (rep->integer == 2) {
        log_warn("node_id_lease_retaken node_id=%u: it had expired (Redis unreachable or "
                 "restarted) and was still free",
                 r->lease_id);
    } else if (rep->integer == 0) {
        uv_timer_stop(&r->lease_timer);
        char id[16];
        snprintf(id, sizeof id, "%u", r->lease_id);
        lease_finish(r, CHAT_EBUSY,
                     "node id %s is held by another node now (our lease expired: Redis was "
                     "unreachable or restarted for longer than its TTL)",
                     id);
    }
}

static void lease_renew(bus_redis_t *r) {
    rconn_t *rc = &r->cmd;
    if (r->lease_state != LEASE_HELD || r->closing || rc->state != ST_READY) return;
    if (redisAsyncCommand(rc->ac, lease_renew_cb, r, "EVAL %s 1 " NODEID_PREFIX "%u %s %u",
                          LEASE_RENEW, r->lease_id, r->base.instance, r->lease_ttl) == REDIS_OK)
        rc->inflight++;
}

static int r_lease(bus_t *b, int want, unsigned ttl_ms, bus_lease_cb cb, void *ud) {
    bus_redis_t *r = (bus_redis_t *)b;
    if (r->closing) return CHAT_ECLOSED;
    if (want < -1 || want >= NODE_IDS || ttl_ms < 5 || !cb) return CHAT_EINVAL;
    if (r->lease_state != LEASE_NONE) return CHAT_EBUSY; /* one lease per bus */
    r->lease_want = want;
    r->lease_ttl = ttl_ms;
    r->lease_cb = cb;
    r->lease_ud = ud;
    r->lease_state = LEASE_WAIT;
    lease_try(r);
    return 0;
}

/* ---- close ------------------------------------------------------------------------------ */

static void answer_failed(bus_redis_t *r) {
    while (!queue_empty(&r->failed)) {
        list_req_t *q = queue_data(queue_head(&r->failed), list_req_t, link);
        queue_remove(&q->link);
        q->cb(q->ud, r->closing ? CHAT_ECLOSED : CHAT_EIO, NULL, 0);
        list_free(q);
    }
}

static void handle_closed(uv_handle_t *h) {
    bus_redis_t *r = h->data;
    if (--r->handles_closing) return;
    void (*done)(void *) = r->done;
    void *arg = r->done_arg;
    set_free(&r->chats);
    free(r);
    if (done) done(arg);
}

/* Flush (bounded), free both contexts, wait for their poll handles and any resolution,
 * then close our own timers; done runs when the last one closed. */
static void close_step(bus_redis_t *r) {
    if (!r->torn_down) {
        uint64_t now = uv_now(r->loop);
        bool busy = r->cmd.state != ST_DOWN && (r->q.n || r->cmd.inflight > 0);
        if (busy && now < r->close_deadline) {
            uv_timer_start(&r->work, work_cb, r->close_deadline - now, 0);
            return;
        }
        if (r->q.n)
            log_warn("bus_redis_close_unflushed queued=%zu unsent=%zu", r->q.n, r->q.n_unsent);
        r->torn_down = true;
        r->sub.kill_reason = r->cmd.kill_reason = "closing";
        rc_kill(&r->sub);
        rc_kill(&r->cmd);
        if (r->sub.state == ST_RESOLVING) uv_cancel((uv_req_t *)&r->sub.gai);
        if (r->cmd.state == ST_RESOLVING) uv_cancel((uv_req_t *)&r->cmd.gai);
        pq_free(&r->q);
        answer_failed(r);
    }
    if (r->gai_pending || r->polls_open || r->handles_closing) return;
    r->handles_closing = 4;
    uv_handle_t *hs[4] = {(uv_handle_t *)&r->sub.timer, (uv_handle_t *)&r->cmd.timer,
                          (uv_handle_t *)&r->work, (uv_handle_t *)&r->lease_timer};
    for (int i = 0; i < 4; i++) {
        hs[i]->data = r;
        uv_close(hs[i], handle_closed);
    }
}

static void work_cb(uv_timer_t *t) {
    bus_redis_t *r = t->data;
    answer_failed(r);
    lease_deliver(r);
    if (r->closing) close_step(r);
}

static void r_close(bus_t *b, void (*done)(void *), void *arg) {
    bus_redis_t *r = (bus_redis_t *)b;
    if (r->closing) return;
    r->closing = true;
    r->done = done;
    r->done_arg = arg;
    r->close_deadline = uv_now(r->loop) + CLOSE_FLUSH_MS;
    uv_timer_stop(&r->sub.timer); /* no reconnects, no timeouts: close_step decides */
    uv_timer_stop(&r->cmd.timer);
    uv_timer_stop(&r->lease_timer);
    /* release the node id (after the queued publishes: one connection, in order), so a new
     * node may take it at once; the flush below waits for the answer */
    if (r->lease_state == LEASE_HELD && r->cmd.state == ST_READY &&
        redisAsyncCommand(r->cmd.ac, ignore_cb, "node id release",
                          "EVAL %s 1 " NODEID_PREFIX "%u %s", LEASE_RELEASE, r->lease_id,
                          r->base.instance) == REDIS_OK)
        r->cmd.inflight++;
    log_dropped(r, true);
    kick_work(r); /* we may be inside a hiredis callback: tear down from the loop */
}

/* ---- open ------------------------------------------------------------------------------- */

static const bus_ops_t redis_ops = {
    .name = "redis",
    .has_peers = true,
    .subscribe = r_subscribe,
    .unsubscribe = r_unsubscribe,
    .publish = r_publish,
    .heartbeat = r_heartbeat,
    .deregister = r_deregister,
    .list_nodes = r_list_nodes,
    .lease = r_lease,
    .presence_set = r_presence_set,
    .presence_list = r_presence_list,
    .close = r_close,
};

static void rc_init(bus_redis_t *r, rconn_t *rc, const char *name) {
    rc->bus = r;
    rc->name = name;
    rc->state = ST_DOWN;
    rc->backoff_ms = BACKOFF_MIN_MS;
    uv_timer_init(r->loop, &rc->timer);
    rc->timer.data = rc;
    /* the first attempt runs on the loop: bus_open sets our callbacks after we return */
    uv_timer_start(&rc->timer, rc_timer_cb, 0, 0);
}

int bus_redis_open(bus_t **out, uv_loop_t *loop, const char *url, char *err, size_t errlen) {
    bus_redis_t *r = calloc(1, sizeof *r);
    if (!r) return CHAT_ENOMEM;
    queue_init(&r->failed);
    int rc = bus_redis__parse_url(url, &r->url, err, errlen);
    if (rc < 0) {
        free(r);
        return rc;
    }
    unsigned char a[16];
    r->numeric_host =
        inet_pton(AF_INET, r->url.host, a) == 1 || inet_pton(AF_INET6, r->url.host, a) == 1;
    r->base.ops = &redis_ops;
    r->loop = loop;
    r->reported = -1;
    r->q.max_msgs = PQ_MAX_MSGS;
    r->q.max_bytes = PQ_MAX_BYTES;
    r->stall_ms = STALL_MS;
    r->rng = uv_hrtime() ^ (uint64_t)(uintptr_t)r ^ 0x9E3779B97F4A7C15ULL;
    if (!r->rng) r->rng = 1;
    uv_timer_init(loop, &r->work);
    r->work.data = r;
    uv_timer_init(loop, &r->lease_timer);
    r->lease_timer.data = r;
    rc_init(r, &r->sub, "sub");
    rc_init(r, &r->cmd, "cmd");
    log_info("bus_redis_open addr=%s:%d db=%d auth=%s", r->url.host, r->url.port, r->url.db,
             r->url.has_password ? "yes" : "no");
    *out = &r->base;
    return 0;
}

/* ---- test hooks ------------------------------------------------------------------------- */

void bus_redis__hold_cmd(bus_t *b, bool hold) {
    bus_redis_t *r = (bus_redis_t *)b;
    r->hold_cmd = hold;
    if (!hold && !r->closing && r->cmd.state == ST_DOWN)
        uv_timer_start(&r->cmd.timer, rc_timer_cb, 0, 0);
}

void bus_redis__set_limits(bus_t *b, size_t max_msgs, size_t max_bytes, unsigned stall_ms) {
    bus_redis_t *r = (bus_redis_t *)b;
    if (max_msgs) r->q.max_msgs = max_msgs;
    if (max_bytes) r->q.max_bytes = max_bytes;
    if (stall_ms) r->stall_ms = stall_ms;
}

bool bus_redis__cmd_ready(const bus_t *b) {
    return ((const bus_redis_t *)b)->cmd.state == ST_READY;
}

bool bus_redis__queue_ok(const bus_t *b) {
    const pq_t *q = &((const bus_redis_t *)b)->q;
    size_t n = 0, bytes = 0, unsent = 0;
    bool in_unsent = false, found = !q->unsent_chunk;
    for (pq_chunk_t *c = q->first; c; c = c->next) {
        if (c->head > c->used || c->used > c->cap || (c != q->first && c->head)) return false;
        /* an empty chunk only as the one kept for reuse, reset */
        if (c->head == c->used && (c->next || c != q->first || c->head)) return false;
        if (!c->next && c != q->last) return false;
        for (size_t off = c->head; off < c->used; off += rec_size(pq_at(c, off)->len)) {
            if (c == q->unsent_chunk && off == q->unsent_off) in_unsent = found = true;
            n++;
            bytes += pq_at(c, off)->len;
            unsent += in_unsent;
        }
    }
    return n == q->n && bytes == q->bytes && unsent == q->n_unsent && found;
}

size_t bus_redis__queued(const bus_t *b) { return ((const bus_redis_t *)b)->q.n; }
