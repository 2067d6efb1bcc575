/* chat-bench: the load generator of the performance work. N WebSocket clients on one libuv
 * loop join R chats; P of them publish at a fixed rate (open loop) or keep W messages in
 * flight (closed loop); every receiver turns the send time carried in each message into an
 * end-to-end latency in a log-linear histogram. Results: one JSON object on stdout.
 *
 * The one idea: the instrument must never be the bottleneck by accident. It does what the
 * server does to stay fast (one shared read buffer, output corked per connection and
 * written once per loop turn, no JSON parser on the delivery path), and it measures its
 * own CPU time: a client that saturated its core says so ("client_saturated") instead of
 * passing its own limit off as the server's.
 *
 * The same workload drives several servers: a protocol is a small struct of functions
 * (the upgrade path, connect/subscribe/publish encoders, a classifier of incoming
 * messages). chatd and Centrifugo (v6 JSON protocol) are implemented.
 *
 * --tls speaks TLS (wss://) the way the server does: OpenSSL on memory BIOs on the loop,
 * plaintext queued during the turn and encrypted into one write at the flush.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "../tests/unit/test.h"
#include "chat/chat.h"
#include "core/core.h"
#include "ws/ws.h"

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24 /* Linux 4.2; older libc headers lack the name */
#endif

#define RBUF_SIZE (256 * 1024)
#define HS_MAX 16384                /* largest upgrade response head we accept */
#define OUT_BACKLOG_MAX (32u << 20) /* a publisher's unsent bytes before sends are refused */
#define ACK_RING 1024               /* Centrifugo: send times of in-flight publish ids */
#define TOKEN_TTL_S 86400
#define MAX_NODES 16 /* --port and --server-pid lists (a cluster) */

/* ---- histogram --------------------------------------------------------------------------
 * HdrHistogram-style log-linear buckets over microseconds: values below 256 are counted
 * exactly, above that every power of two is split into 128 buckets, so a reported value is
 * within 1/128 (< 1%, two significant digits) of every value in its bucket. 2560 buckets
 * cover 1 us .. 60 s in 20 KiB; recording is a shift and an increment. */
#define HIST_SUB 128u
#define HIST_EXACT (2 * HIST_SUB)
#define HIST_MAX_US 60000000ull
#define HIST_BUCKETS 2560u

typedef struct hist {
    uint64_t n, min, max;
    double sum;
    uint64_t c[HIST_BUCKETS];
} hist_t;

static unsigned hist_index(uint64_t v) {
    if (v < HIST_EXACT) return (unsigned)v;
    unsigned e = (unsigned)(63 - __builtin_clzll(v)) - 7; /* v >> e lands in [128, 256) */
    return HIST_SUB * e + (unsigned)(v >> e);
}

/* The highest value that falls into bucket i (HdrHistogram's "highest equivalent value"). */
static uint64_t hist_high(unsigned i) {
    if (i < HIST_EXACT) return i;
    unsigned e = i / HIST_SUB - 1;
    uint64_t m = i - HIST_SUB * e;
    return ((m + 1) << e) - 1;
}

static void hist_record(hist_t *h, uint64_t v) {
    if (v > HIST_MAX_US) v = HIST_MAX_US;
    h->c[hist_index(v)]++;
    if (!h->n || v < h->min) h->min = v;
    if (v > h->max) h->max = v;
    h->n++;
    h->sum += (double)v;
}

/* The value at or below which permille/10 percent of the records lie (permille 990 = p99),
 * reported as its bucket's highest value and never above the exact maximum. Integer ranks:
 * a floating q * n would put p99.9 of 1000 values one rank off. */
static uint64_t hist_pct(const hist_t *h, unsigned permille) {
    if (!h->n) return 0;
    uint64_t rank = (permille * h->n + 999) / 1000;
    if (rank < 1) rank = 1;
    uint64_t cum = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        cum += h->c[i];
        if (cum >= rank) {
            uint64_t v = hist_high(i);
            return v > h->max ? h->max : v;
        }
    }
    return h->max;
}

/* ---- small helpers ------------------------------------------------------------------------ */
static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static double cpu_seconds(const struct rusage *r) {
    return (double)r->ru_utime.tv_sec + r->ru_utime.tv_usec / 1e6 + (double)r->ru_stime.tv_sec +
           r->ru_stime.tv_usec / 1e6;
}

static double round_to(double v, double unit) { return round(v / unit) * unit; }

/* Parse a decimal number at p[0..n); *used gets the digits consumed (0: none). */
static uint64_t parse_u64(const char *p, size_t n, size_t *used) {
    uint64_t v = 0;
    size_t i = 0;
    while (i < n && p[i] >= '0' && p[i] <= '9' && i < 20) v = v * 10 + (uint64_t)(p[i++] - '0');
    *used = i;
    return v;
}

static void b64_encode(const uint8_t *in, size_t n, char *out) {
    static const char al[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[o++] = al[(v >> 18) & 63];
        out[o++] = al[(v >> 12) & 63];
        out[o++] = i + 1 < n ? al[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? al[v & 63] : '=';
    }
    out[o] = '\0';
}

/* Named counters (errors by kind, closes by code): few distinct keys, so a linear list. */
typedef struct counter {
    char key[56];
    uint64_t n;
} counter_t;

typedef struct counters {
    counter_t *v;
    size_t n, cap;
    uint64_t total;
} counters_t;

static void count_key(counters_t *cs, const char *key) {
    cs->total++;
    for (size_t i = 0; i < cs->n; i++)
        if (strcmp(cs->v[i].key, key) == 0) {
            cs->v[i].n++;
            return;
        }
    if (cs->n == cs->cap) {
        size_t cap = cs->cap ? cs->cap * 2 : 16;
        counter_t *v = realloc(cs->v, cap * sizeof *v);
        if (!v) return; /* the total still counts it */
        cs->v = v;
        cs->cap = cap;
    }
    snprintf(cs->v[cs->n].key, sizeof cs->v[cs->n].key, "%s", key);
    cs->v[cs->n++].n = 1;
}

/* ---- protocols ------------------------------------------------------------------------------ */
typedef struct bench bench_t;
typedef struct bconn bconn_t;

typedef enum { IN_OTHER, IN_PUB, IN_REPLY, IN_ERROR, IN_PING } in_kind_t;

/* What one incoming message is, as far as the benchmark cares. */
typedef struct in_msg {
    in_kind_t kind;
    uint64_t t_ns;   /* IN_PUB: the send time it carries */
    uint32_t sender; /* IN_PUB: the index of the connection that sent it */
    uint32_t node;   /* IN_PUB: the sender's node (its index in --port), if has_node */
    bool has_node;
    uint32_t id;   /* IN_REPLY: the command id it answers */
    bool failed;   /* IN_REPLY: it carries an error */
    char code[40]; /* IN_ERROR, failed IN_REPLY: the server's error code */
} in_msg_t;

typedef struct proto {
    const char *name;
    /* The request target of the upgrade (chatd puts the chat and token there). */
    void (*path)(const bench_t *b, const bconn_t *c, const char *token, sbuf_t *out);
    /* The frames that join after the upgrade: nothing written = joined by the upgrade. */
    void (*encode_connect)(const bench_t *b, const bconn_t *c, const char *token, sbuf_t *out);
    void (*encode_subscribe)(const bench_t *b, const bconn_t *c, sbuf_t *out);
    /* One message carrying send time t_ns and the sender's index, about size bytes. */
    void (*encode_publish)(const bench_t *b, bconn_t *c, uint64_t t_ns, sbuf_t *out);
    /* One incoming JSON message (one line of a batch where the protocol batches). */
    void (*classify)(const char *p, size_t n, in_msg_t *m);
    bool batched;      /* a frame may carry several messages separated by newlines */
    bool ack_by_reply; /* the publish reply acknowledges (else the sender's own copy does) */
    const char *pong;  /* answer to an application-level ping */
} proto_t;

/* ---- the benchmark state ------------------------------------------------------------------ */
typedef struct opts {
    const char *host;
    int port; /* the first of ports[] */
    int ports[MAX_NODES];
    unsigned n_ports;
    int server_pids[MAX_NODES];
    unsigned n_pids;
    const char *target;
    const char *secret;
    const char *label;
    const char *query; /* chatd: more of the WebSocket URL's query, e.g. "presence=1" */
    unsigned connections, chats, publishers, window, size, sources;
    int sources_set;
    double rate, duration, warmup, drain, connect_rate, connect_timeout, hold;
    unsigned connect_inflight;
    bool idle, json_only;
    bool tls, insecure; /* wss://; --insecure: no certificate check */
    const char *ca;     /* --ca FILE: verify the server against it */
    bool deflate;       /* offer permessage-deflate (we send plain, the server may compress) */
    bool words;         /* pad the text with words rather than 'x' (compresses like prose) */
} opts_t;

enum { C_NEW, C_TCP, C_UPGRADE, C_JOIN, C_READY, C_CLOSING, C_CLOSED };
enum { PH_CONNECT, PH_WARMUP, PH_MEASURE, PH_DRAIN, PH_HOLD, PH_TEARDOWN, PH_DONE };
static const char *const phase_names[] = {"connect", "warmup",   "measure", "drain",
                                          "hold",    "teardown", "done"};

typedef struct ack_slot {
    uint32_t id;
    uint64_t t_ns;
} ack_slot_t;

struct bconn {
    uv_tcp_t tcp;
    uv_write_t wreq;
    bench_t *b;
    ws_parser_t ws;
    uint32_t idx, chat;
    uint8_t state;
    bool dirty, writing, publisher, finished, ws_ok;
    bool deflate;      /* the server accepted permessage-deflate */
    uint32_t inflight; /* publishes not yet acknowledged */
    uint32_t next_id;  /* Centrifugo command ids: 1 connect, 2 subscribe, 3.. publishes */
    uint64_t t_start;  /* connect start, for the connect latency */
    uint8_t *out;      /* bytes queued during this loop turn */
    size_t out_len, out_cap;
    uint8_t *wout; /* bytes handed to uv_write, until its callback */
    size_t wout_len, wout_cap;
    char *hs; /* the upgrade response head, while it arrives */
    size_t hs_len;
    char *token; /* until the join is sent */
    ack_slot_t *ring;
    bconn_t *dirty_next;
    SSL *ssl; /* --tls: owns its two memory BIOs */
};

typedef struct proc_sample {
    bool ok;
    double cpu_s;
    long rss_kb;
} proc_sample_t;

/* The whole machine: what other processes took is how noisy the numbers are. */
typedef struct host_sample {
    bool ok;
    double busy_s, total_s; /* summed over every CPU */
    double load1;
} host_sample_t;

struct bench {
    opts_t o;
    const proto_t *proto;
    uv_loop_t *loop;
    struct sockaddr_in addr[MAX_NODES]; /* connection i goes to addr[i % n_ports] */
    unsigned sources;                   /* 0: the kernel picks the source address */
    bconn_t *conns;
    uint8_t *rbuf;
    SSL_CTX *tls;                /* --tls */
    bconn_t *dirty, *dirty_tail; /* oldest first: sends go out in the order they were stamped */
    uv_prepare_t flusher;
    uv_timer_t tick, phase_timer, progress_timer;
    uv_signal_t sigint;
    int phase;
    uint32_t started, ready, failed, open;
    uint32_t *members; /* ready members per chat when publishing started */
    uint64_t rng, key_nonce;
    uint64_t t0, t_connect_end, t_pub_start, t_meas_start, t_meas_end, t_last_progress;
    uint64_t t_last_connect_progress, t_teardown;
    double rate_total;
    uint64_t scheduled;
    uint32_t cursor;
    uint64_t rx_ns; /* when the bytes being handled were read */
    /* measured: messages sent inside the measurement window and what became of them */
    uint64_t sent, acked, delivered, expected, pub_failed;
    /* everything, warm-up and drain included */
    uint64_t sent_all, acked_all, delivered_all, pub_failed_all, skipped, other_msgs;
    uint64_t other_bytes; /* of the other_msgs (their JSON text) */
    /* whatever arrived while the window was open, sent then or before: the throughput of a
     * server whose latency is longer than the warm-up (its window acks are all late) */
    uint64_t rx_acked, rx_delivered;
    uint64_t prog_sent, prog_delivered, prog_acked; /* at the last progress line */
    hist_t lat, ack_lat, connect_lat, lag;
    /* a cluster (--port lists several nodes): lat split by where the sender was connected */
    hist_t lat_same, lat_cross;
    counters_t errors, closes;
    uint64_t teardown_clean, teardown_forced, teardown_aborted;
    sbuf_t scratch;
    /* bytes read from the server (frames, after the upgrade head): all, in the window */
    uint64_t rx_bytes, rx_bytes_window;
    uint32_t deflate_conns; /* connections on which permessage-deflate was accepted */
    ws_zip_t *zip;          /* --deflate: inflates what the server compressed */
    struct rusage ru_start, ru_connected, ru_meas0, ru_meas1, ru_end;
    proc_sample_t srv_start, srv_connected, srv_meas0, srv_meas1, srv_end;
    host_sample_t host_start, host_connected, host_meas0, host_meas1;
};

static void conn_fail(bconn_t *c, const char *why);
static void conn_send_text(bconn_t *c, const void *p, size_t n);
static void teardown(bench_t *b);
static void connect_more(bench_t *b);

/* ---- chatd ------------------------------------------------------------------------------ */
static void chatd_path(const bench_t *b, const bconn_t *c, const char *token, sbuf_t *out) {
    sbuf_printf(out, "/ws/chat/bench-%u?token=%s", c->chat, token);
    if (b->o.query) sbuf_printf(out, "&%s", b->o.query);
}

static void chatd_none(const bench_t *b, const bconn_t *c, const char *token, sbuf_t *out) {}
static void chatd_no_sub(const bench_t *b, const bconn_t *c, sbuf_t *out) {}

/* The node a connection is on: its index in the --port list. */
static uint32_t node_of(const bench_t *b, uint32_t idx) {
    return b->o.n_ports > 1 ? idx % b->o.n_ports : 0;
}

/* --words: common English words, drawn at random: text that compresses about as chat
 * messages do (a run of 'x' compresses to nothing, which would flatter compression). */
static const char *const WORDS[] = {
    "the",     "of",       "and",    "to",     "in",     "is",     "you",   "that", "it",
    "he",      "was",      "for",    "on",     "are",    "as",     "with",  "his",  "they",
    "at",      "be",       "this",   "have",   "from",   "or",     "one",   "had",  "by",
    "word",    "but",      "not",    "what",   "all",    "were",   "we",    "when", "your",
    "can",     "said",     "there",  "use",    "an",     "each",   "which", "she",  "do",
    "how",     "their",    "if",     "will",   "up",     "other",  "about", "out",  "many",
    "then",    "them",     "these",  "so",     "some",   "her",    "would", "make", "like",
    "meeting", "tomorrow", "lunch",  "deploy", "thanks", "sounds", "good",  "see",  "later",
    "branch",  "merged",   "review", "please", "ok",     "yes",    "no"};

/* The text is "t=<send ns>;s=<sender>;n=<sender's node>;" padded with 'x' (or --words) to
 * --size bytes. */
static void put_text(const bench_t *b, const bconn_t *c, uint64_t t_ns, sbuf_t *out,
                     size_t overhead) {
    size_t before = out->len;
    sbuf_printf(out, "t=%" PRIu64 ";s=%u;n=%u;", t_ns, c->idx, node_of(b, c->idx));
    size_t have = out->len - before + overhead;
    if (b->o.words) {
        uint64_t x = t_ns ^ ((uint64_t)c->idx << 32) ^ 0x9E3779B97F4A7C15ull;
        while (have < b->o.size) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            const char *w = WORDS[x % (sizeof WORDS / sizeof *WORDS)];
            size_t k = strlen(w) + 1, room = b->o.size - have;
            sbuf_put(out, " ", 1);
            sbuf_put(out, w, (k < room ? k : room) - 1);
            have += k < room ? k : room;
        }
        return;
    }
    char pad[64];
    memset(pad, 'x', sizeof pad);
    for (size_t want = b->o.size; have < want;) {
        size_t k = want - have < sizeof pad ? want - have : sizeof pad;
        sbuf_put(out, pad, k);
        have += k;
    }
}

static void chatd_publish(const bench_t *b, bconn_t *c, uint64_t t_ns, sbuf_t *out) {
    sbuf_puts(out, "{\"event\":\"message:message\",\"message\":\"");
    put_text(b, c, t_ns, out, 0);
    sbuf_puts(out, "\"}");
}

static void copy_code(const char *p, size_t n, const char *key, char *out, size_t outlen) {
    size_t kl = strlen(key);
    const char *k = memmem(p, n, key, kl);
    out[0] = '\0';
    if (!k) return;
    const char *v = k + kl, *end = p + n;
    size_t i = 0;
    while (v < end && *v != '"' && *v != ',' && *v != '}' && i + 1 < outlen) {
        char ch = *v++;
        out[i++] = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') ||
                           (ch >= '0' && ch <= '9') || ch == '_'
                       ? ch
                       : '_';
    }
    out[i] = '\0';
}

/* No JSON parser on this path: chatd's events have a fixed shape and the text is ours, so
 * the send time and sender are found by their literal prefix. */
static void chatd_classify(const char *p, size_t n, in_msg_t *m) {
    m->kind = IN_OTHER;
    /* Fast paths first, memmem only when they miss: chatd puts "event" first, and the first
     * '=' of an event we sent is the one of "t=". glibc's memmem sets up a shift table on
     * every call: two of them per frame were 15% of the client's CPU at 2M deliveries/s. */
    const char *ev =
        n > 10 && memcmp(p + 1, "\"event\":\"", 9) == 0 ? p + 1 : memmem(p, n, "\"event\":\"", 9);
    if (!ev) return;
    ev += 9;
    size_t left = (size_t)(p + n - ev);
    if (left >= 16 && memcmp(ev, "message:message\"", 16) == 0) {
        const char *t = memchr(p, '=', n);
        if (!t || t - p < 12 || memcmp(t - 12, "\"message\":\"t=", 13) != 0) {
            t = memmem(p, n, "\"message\":\"t=", 13);
        } else {
            t -= 12;
        }
        if (!t) return;
        t += 13;
        const char *end = p + n;
        size_t used;
        m->t_ns = parse_u64(t, (size_t)(end - t), &used);
        t += used;
        if (!used || end - t < 3 || memcmp(t, ";s=", 3) != 0) return;
        t += 3;
        m->sender = (uint32_t)parse_u64(t, (size_t)(end - t), &used);
        if (!used || t + used >= end || t[used] != ';') return;
        t += used + 1;
        if (end - t >= 2 && memcmp(t, "n=", 2) == 0) { /* the sender's node (optional) */
            t += 2;
            m->node = (uint32_t)parse_u64(t, (size_t)(end - t), &used);
            m->has_node = used && t + used < end && t[used] == ';';
        }
        m->kind = IN_PUB;
    } else if (left >= 6 && memcmp(ev, "error\"", 6) == 0) {
        m->kind = IN_ERROR;
        copy_code(p, n, "\"code\":\"", m->code, sizeof m->code);
    }
}

static const proto_t proto_chatd = {
    .name = "chatd",
    .path = chatd_path,
    .encode_connect = chatd_none,
    .encode_subscribe = chatd_no_sub,
    .encode_publish = chatd_publish,
    .classify = chatd_classify,
};

/* ---- Centrifugo v6 (JSON protocol) ------------------------------------------------------ */
static void cf_path(const bench_t *b, const bconn_t *c, const char *token, sbuf_t *out) {
    sbuf_puts(out, "/connection/websocket");
}

static void cf_connect(const bench_t *b, const bconn_t *c, const char *token, sbuf_t *out) {
    sbuf_printf(out, "{\"id\":1,\"connect\":{\"token\":\"%s\",\"name\":\"chat-bench\"}}", token);
}

static void cf_subscribe(const bench_t *b, const bconn_t *c, sbuf_t *out) {
    sbuf_printf(out, "{\"id\":2,\"subscribe\":{\"channel\":\"bench:bench-%u\"}}", c->chat);
}

/* The data object {"t":..,"s":..,"n":..,"text":"t=..;s=..;n=..;xxx"} is padded to about
 * --size bytes. */
static void cf_publish(const bench_t *b, bconn_t *c, uint64_t t_ns, sbuf_t *out) {
    uint32_t id = c->next_id++;
    sbuf_printf(out, "{\"id\":%u,\"publish\":{\"channel\":\"bench:bench-%u\",\"data\":", id,
                c->chat);
    size_t d0 = out->len;
    sbuf_printf(out, "{\"t\":%" PRIu64 ",\"s\":%u,\"n\":%u,\"text\":\"", t_ns, c->idx,
                node_of(b, c->idx));
    put_text(b, c, t_ns, out, out->len - d0 + 2);
    sbuf_puts(out, "\"}}}");
    if (c->ring) {
        c->ring[id % ACK_RING].id = id;
        c->ring[id % ACK_RING].t_ns = t_ns;
    }
}

static void cf_classify(const char *p, size_t n, in_msg_t *m) {
    m->kind = IN_OTHER;
    const char *end = p + n;
    size_t used;
    if (n == 2 && p[0] == '{' && p[1] == '}') {
        m->kind = IN_PING;
        return;
    }
    if (n > 6 && memcmp(p, "{\"id\":", 6) == 0) {
        m->id = (uint32_t)parse_u64(p + 6, n - 6, &used);
        if (!used) return;
        m->kind = IN_REPLY;
        if (memmem(p, n, "\"error\":{", 9)) {
            m->failed = true;
            copy_code(p, n, "\"code\":", m->code, sizeof m->code);
        }
        return;
    }
    const char *q = memmem(p, n, "\"push\":", 7);
    if (!q) return;
    const char *pub = memmem(q, (size_t)(end - q), "\"pub\":", 6);
    if (!pub) {
        const char *u;
        if (memmem(q, (size_t)(end - q), "\"disconnect\":", 13)) {
            m->kind = IN_ERROR;
            snprintf(m->code, sizeof m->code, "disconnect");
        } else if ((u = memmem(q, (size_t)(end - q), "\"unsubscribe\":", 14))) {
            /* the server dropped the subscription (e.g. 2500, insufficient state: it lost
             * publications of the channel); chat-bench does not resubscribe, so what follows
             * is lost and refused, and this says why */
            char code[24];
            copy_code(u, (size_t)(end - u), "\"code\":", code, sizeof code);
            m->kind = IN_ERROR;
            snprintf(m->code, sizeof m->code, "unsubscribe_%s", code[0] ? code : "unknown");
        }
        return;
    }
    const char *d = memmem(pub, (size_t)(end - pub), "\"data\":{\"t\":", 12);
    if (!d) return;
    d += 12;
    m->t_ns = parse_u64(d, (size_t)(end - d), &used);
    d += used;
    if (!used || end - d < 5 || memcmp(d, ",\"s\":", 5) != 0) return;
    d += 5;
    m->sender = (uint32_t)parse_u64(d, (size_t)(end - d), &used);
    if (!used) return;
    d += used;
    if (end - d >= 5 && memcmp(d, ",\"n\":", 5) == 0) { /* the sender's node (optional) */
        d += 5;
        m->node = (uint32_t)parse_u64(d, (size_t)(end - d), &used);
        m->has_node = used > 0;
    }
    m->kind = IN_PUB;
}

static const proto_t proto_centrifugo = {
    .name = "centrifugo",
    .path = cf_path,
    .encode_connect = cf_connect,
    .encode_subscribe = cf_subscribe,
    .encode_publish = cf_publish,
    .classify = cf_classify,
    .batched = true,
    .ack_by_reply = true,
    .pong = "{}",
};

/* ---- server process samples (/proc) --------------------------------------------------- */
static proc_sample_t proc_sample_one(int pid) {
    proc_sample_t s = {0};
    if (pid <= 0) return s;
    char path[64], buf[2048];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return s;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* the command name may hold spaces */
    if (!p) return s;
    unsigned long long ut = 0, st = 0;
    /* after ")": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt, then
     * utime and stime */
    if (sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return s;
    s.cpu_s = (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    f = fopen(path, "r");
    if (!f) return s;
    while (fgets(buf, sizeof buf, f))
        if (strncmp(buf, "VmRSS:", 6) == 0) s.rss_kb = strtol(buf + 6, NULL, 10);
    fclose(f);
    s.ok = true;
    return s;
}

/* The sum over the server processes (the nodes of a cluster). */
static proc_sample_t proc_sample(const opts_t *o) {
    proc_sample_t sum = {.ok = o->n_pids > 0};
    for (unsigned i = 0; i < o->n_pids; i++) {
        proc_sample_t s = proc_sample_one(o->server_pids[i]);
        sum.ok = sum.ok && s.ok;
        sum.cpu_s += s.cpu_s;
        sum.rss_kb += s.rss_kb;
    }
    return sum;
}

static host_sample_t host_sample(void) {
    host_sample_t h = {0};
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return h;
    unsigned long long v[8] = {0};
    int n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3],
                   &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    if (n < 5) return h;
    double tck = (double)sysconf(_SC_CLK_TCK);
    unsigned long long idle = v[3] + v[4], busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    h.busy_s = (double)busy / tck;
    h.total_s = (double)(busy + idle) / tck;
    f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &h.load1) != 1) h.load1 = 0;
        fclose(f);
    }
    h.ok = true;
    return h;
}

/* ---- output queue: corked, one write per connection per loop turn ------------------------ */
static int grow(uint8_t **p, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    size_t nc = *cap ? *cap : 256;
    while (nc < need) nc *= 2;
    uint8_t *np = realloc(*p, nc);
    if (!np) return CHAT_ENOMEM;
    *p = np;
    *cap = nc;
    return 0;
}

static void mark_dirty(bconn_t *c) {
    if (c->dirty) return;
    c->dirty = true;
    c->dirty_next = NULL;
    if (c->b->dirty_tail) c->b->dirty_tail->dirty_next = c;
    else c->b->dirty = c;
    c->b->dirty_tail = c;
}

static int conn_reserve(bconn_t *c, size_t n) {
    if (c->state == C_CLOSED) return CHAT_ECLOSED;
    if (grow(&c->out, &c->out_cap, c->out_len + n) < 0) {
        conn_fail(c, "client_oom");
        return CHAT_ENOMEM;
    }
    return 0;
}

static void conn_send_raw(bconn_t *c, const void *p, size_t n) {
    if (conn_reserve(c, n) < 0) return;
    memcpy(c->out + c->out_len, p, n);
    c->out_len += n;
    mark_dirty(c);
}

/* Client frames are masked (RFC 6455 5.3): a fresh mask per frame from a cheap generator. */
static void conn_send_frame(bconn_t *c, int op, const void *p, size_t n) {
    if (conn_reserve(c, n + 14) < 0) return;
    uint64_t r = xorshift(&c->b->rng);
    uint8_t mask[4];
    memcpy(mask, &r, 4);
    size_t hl = ws_frame_header(c->out + c->out_len, op, true, n, mask);
    uint8_t *pl = c->out + c->out_len + hl;
    if (n) memcpy(pl, p, n);
    ws_mask(pl, n, mask, 0);
    c->out_len += hl + n;
    mark_dirty(c);
}

static void conn_send_text(bconn_t *c, const void *p, size_t n) {
    conn_send_frame(c, WS_OP_TEXT, p, n);
}

static void conn_send_close(bconn_t *c, uint16_t code) {
    uint8_t body[2] = {(uint8_t)(code >> 8), (uint8_t)code};
    conn_send_frame(c, WS_OP_CLOSE, body, code ? 2 : 0);
}

static void on_write(uv_write_t *req, int status) {
    bconn_t *c = req->data;
    c->writing = false;
    c->wout_len = 0;
    if (status < 0) {
        if (status != UV_ECANCELED && c->state != C_CLOSED) {
            char k[48];
            snprintf(k, sizeof k, "write_%s", uv_err_name(status));
            conn_fail(c, k);
        }
        return;
    }
    if (!c->publisher && c->wout_cap > 4096) { /* idle members hold no write buffer */
        free(c->wout);
        c->wout = NULL;
        c->wout_cap = 0;
    }
    if (c->out_len || (c->ssl && BIO_ctrl_pending(SSL_get_wbio(c->ssl)))) mark_dirty(c);
}

/* --tls: the plaintext queued this turn (none before the handshake is done: the upgrade
 * request waits for it) becomes TLS records; what OpenSSL has to send replaces it in out. */
static int tls_seal(bconn_t *c) {
    ERR_clear_error();
    size_t w;
    if (c->out_len && (SSL_write_ex(c->ssl, c->out, c->out_len, &w) != 1 || w != c->out_len))
        return -1;
    c->out_len = 0;
    BIO *wb = SSL_get_wbio(c->ssl);
    size_t pend = BIO_ctrl_pending(wb);
    if (!pend) return 0;
    if (grow(&c->out, &c->out_cap, pend) < 0 || BIO_read(wb, c->out, (int)pend) != (int)pend)
        return -1;
    c->out_len = pend;
    return 0;
}

static void conn_flush(bconn_t *c) {
    if (c->writing || c->state == C_CLOSED) return;
    if (c->ssl && tls_seal(c) < 0) {
        conn_fail(c, "tls_write");
        return;
    }
    if (!c->out_len) return;
    uv_buf_t buf = uv_buf_init((char *)c->out, (unsigned)c->out_len);
    int n = uv_try_write((uv_stream_t *)&c->tcp, &buf, 1);
    if (n == (int)c->out_len) {
        c->out_len = 0;
        if (!c->publisher) { /* an idle connection keeps no buffer: memory at 100k conns */
            free(c->out);
            c->out = NULL;
            c->out_cap = 0;
        }
        return;
    }
    if (n < 0 && n != UV_EAGAIN) {
        char k[48];
        snprintf(k, sizeof k, "write_%s", uv_err_name(n));
        conn_fail(c, k);
        return;
    }
    if (n < 0) n = 0;
    /* The rest goes through uv_write: swap buffers so new sends queue behind it. */
    uint8_t *tp = c->wout;
    size_t tcap = c->wout_cap;
    c->wout = c->out;
    c->wout_cap = c->out_cap;
    c->wout_len = c->out_len;
    c->out = tp;
    c->out_cap = tcap;
    c->out_len = 0;
    buf = uv_buf_init((char *)c->wout + n, (unsigned)(c->wout_len - (size_t)n));
    c->wreq.data = c;
    int rc = uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &buf, 1, on_write);
    if (rc < 0) {
        char k[48];
        snprintf(k, sizeof k, "write_%s", uv_err_name(rc));
        conn_fail(c, k);
        return;
    }
    c->writing = true;
}

/* Runs right before the loop blocks in poll: everything queued since (timers, reads, write
 * completions) goes out in one write per connection. */
static void on_prepare(uv_prepare_t *h) {
    bench_t *b = h->data;
    bconn_t *c;
    while ((c = b->dirty)) {
        b->dirty = c->dirty_next;
        if (!b->dirty) b->dirty_tail = NULL;
        c->dirty = false;
        conn_flush(c);
    }
}

/* ---- connection lifecycle ------------------------------------------------------------------ */
static bool sending_phase(const bench_t *b) {
    return b->phase == PH_WARMUP || b->phase == PH_MEASURE;
}

static void maybe_connect_done(bench_t *b);

/* The connection finished its connect phase: ready, or failed before it. */
static void conn_finish_connect(bconn_t *c, bool ok) {
    bench_t *b = c->b;
    if (c->finished) return;
    c->finished = true;
    b->t_last_connect_progress = now_ns();
    if (ok) {
        b->ready++;
        hist_record(&b->connect_lat, (b->t_last_connect_progress - c->t_start) / 1000);
    } else {
        b->failed++;
    }
    if (b->phase == PH_CONNECT) {
        connect_more(b);
        maybe_connect_done(b);
    }
}

static void on_close(uv_handle_t *h) {
    bconn_t *c = h->data;
    bench_t *b = c->b;
    free(c->out);
    free(c->wout);
    free(c->hs);
    free(c->token);
    free(c->ring);
    SSL_free(c->ssl);
    c->ssl = NULL;
    c->out = c->wout = NULL;
    c->hs = c->token = NULL;
    c->ring = NULL;
    c->out_len = c->wout_len = c->out_cap = c->wout_cap = 0;
    if (c->ws_ok) ws_parser_free(&c->ws);
    b->open--;
    if (b->phase == PH_TEARDOWN && b->open == 0) teardown(b);
}

static void conn_close_now(bconn_t *c) {
    if (c->state == C_CLOSED) return;
    c->state = C_CLOSED;
    uv_close((uv_handle_t *)&c->tcp, on_close);
}

/* An error on one connection: count it (not during teardown, where closes are expected),
 * and close. */
static void conn_fail(bconn_t *c, const char *why) {
    bench_t *b = c->b;
    if (c->state == C_CLOSED) return;
    if (b->phase != PH_TEARDOWN) count_key(&b->errors, why);
    if (!c->finished) conn_finish_connect(c, false);
    conn_close_now(c);
}

static void conn_ready(bconn_t *c) {
    c->state = C_READY;
    free(c->token);
    c->token = NULL;
    conn_finish_connect(c, true);
}

/* ---- publishing -------------------------------------------------------------------------- */
static bool measured(const bench_t *b, uint64_t t) {
    return t >= b->t_meas_start && t < b->t_meas_end;
}

static void publish(bench_t *b, bconn_t *c) {
    if (c->out_len + c->wout_len > OUT_BACKLOG_MAX) {
        count_key(&b->errors, "client_backlog_full");
        b->skipped++;
        return;
    }
    uint64_t t = now_ns();
    b->scratch.len = 0;
    b->proto->encode_publish(b, c, t, &b->scratch);
    if (b->scratch.oom) {
        conn_fail(c, "client_oom");
        return;
    }
    conn_send_text(c, b->scratch.p, b->scratch.len);
    c->inflight++;
    b->sent_all++;
    if (b->phase == PH_MEASURE) {
        b->sent++;
        b->expected += b->members[c->chat];
    }
}

static void fill_window(bench_t *b, bconn_t *c) {
    while (sending_phase(b) && c->state == C_READY && c->inflight < b->o.window) publish(b, c);
}

/* An acknowledgement (or a refusal) of one of c's publishes. */
static void on_ack(bench_t *b, bconn_t *c, bool ok, bool has_t, uint64_t t) {
    if (c->inflight) c->inflight--;
    if (ok) {
        b->acked_all++;
        if (b->phase == PH_MEASURE) b->rx_acked++;
        if (has_t && measured(b, t)) {
            b->acked++;
            hist_record(&b->ack_lat, b->rx_ns > t ? (b->rx_ns - t) / 1000 : 0);
        }
    } else {
        b->pub_failed_all++;
        if (b->phase == PH_MEASURE || b->phase == PH_DRAIN) b->pub_failed++;
    }
    if (b->o.rate <= 0) fill_window(b, c);
}

/* Open loop: the schedule says how many messages are due since publishing began; they go
 * to the publishers round-robin, so each publisher sends every 1/rate seconds whatever the
 * server does. The send time is taken when the message is queued; how late that is against
 * the schedule is reported (schedule_lag_us), so a late client cannot hide a stall. */
static void schedule_publishes(bench_t *b, uint64_t now) {
    if (b->o.rate <= 0 || !sending_phase(b) || !b->o.publishers) return;
    /* message k is due at k / rate_total seconds: message 0 at once */
    uint64_t due = (uint64_t)((double)(now - b->t_pub_start) / 1e9 * b->rate_total) + 1;
    while (b->scheduled < due) {
        uint64_t k = b->scheduled++;
        uint64_t intended = b->t_pub_start + (uint64_t)((double)k * 1e9 / b->rate_total);
        bconn_t *c = &b->conns[b->cursor];
        b->cursor = (b->cursor + 1) % b->o.publishers;
        if (c->state != C_READY) {
            b->skipped++;
            continue;
        }
        if (b->phase == PH_MEASURE)
            hist_record(&b->lag, now > intended ? (now - intended) / 1000 : 0);
        publish(b, c);
    }
}

/* ---- incoming messages ---------------------------------------------------------------------- */
/* A cluster: the histogram of a delivery to c by whether its sender was on c's node (the
 * node travels in the message; a payload without it: derived from the sender's index). */
static hist_t *node_hist(bench_t *b, const bconn_t *c, const in_msg_t *m) {
    if (b->o.n_ports < 2) return NULL;
    uint32_t from = m->has_node ? m->node : node_of(b, m->sender);
    return from == node_of(b, c->idx) ? &b->lat_same : &b->lat_cross;
}

static void handle_message(bconn_t *c, const char *p, size_t n) {
    bench_t *b = c->b;
    in_msg_t m;
    memset(&m, 0, sizeof m);
    b->proto->classify(p, n, &m);
    switch (m.kind) {
    case IN_PUB:
        b->delivered_all++;
        if (b->phase == PH_MEASURE) b->rx_delivered++;
        if (measured(b, m.t_ns)) {
            uint64_t us = b->rx_ns > m.t_ns ? (b->rx_ns - m.t_ns) / 1000 : 0;
            b->delivered++;
            hist_record(&b->lat, us);
            hist_t *split = node_hist(b, c, &m);
            if (split) hist_record(split, us);
        }
        if (!b->proto->ack_by_reply && m.sender == c->idx && c->publisher)
            on_ack(b, c, true, true, m.t_ns);
        break;
    case IN_REPLY:
        if (c->state == C_JOIN && (m.id == 1 || m.id == 2)) {
            if (m.failed) {
                char k[56];
                snprintf(k, sizeof k, "join_error_%s", m.code);
                conn_fail(c, k);
                return;
            }
            if (m.id == 1) {
                b->scratch.len = 0;
                b->proto->encode_subscribe(b, c, &b->scratch);
                if (b->scratch.len) conn_send_text(c, b->scratch.p, b->scratch.len);
                else conn_ready(c);
            } else {
                conn_ready(c);
            }
        } else if (m.id >= 3 && c->publisher) {
            bool has_t = c->ring && c->ring[m.id % ACK_RING].id == m.id;
            uint64_t t = has_t ? c->ring[m.id % ACK_RING].t_ns : 0;
            if (m.failed) {
                char k[56];
                snprintf(k, sizeof k, "publish_error_%s", m.code);
                count_key(&b->errors, k);
            }
            on_ack(b, c, !m.failed, has_t, t);
        } else {
            b->other_msgs++;
        }
        break;
    case IN_ERROR: {
        char k[56];
        snprintf(k, sizeof k, "server_error_%s", m.code[0] ? m.code : "unknown");
        count_key(&b->errors, k);
        /* chatd answers a refused publish with an error event to the sender only (where a
         * reply acknowledges, the refusal is that reply) */
        if (!b->proto->ack_by_reply && c->publisher && c->inflight) on_ack(b, c, false, false, 0);
        break;
    }
    case IN_PING:
        if (b->proto->pong) conn_send_text(c, b->proto->pong, strlen(b->proto->pong));
        break;
    default: b->other_msgs++; b->other_bytes += n;
    }
}

static int on_ws_message(void *ud, int opcode, uint8_t *data, size_t len) {
    bconn_t *c = ud;
    if (opcode != WS_OP_TEXT) {
        count_key(&c->b->errors, "binary_message");
        return 0;
    }
    const char *p = (const char *)data;
    if (!c->b->proto->batched) {
        handle_message(c, p, len);
        return c->state == C_CLOSED;
    }
    const char *end = p + len;
    while (p < end && c->state != C_CLOSED) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);
        if (n) handle_message(c, p, n);
        p += n + 1;
    }
    return c->state == C_CLOSED;
}

static int on_ws_control(void *ud, int opcode, uint16_t code, uint8_t *data, size_t len) {
    bconn_t *c = ud;
    bench_t *b = c->b;
    if (opcode == WS_OP_PING) {
        conn_send_frame(c, WS_OP_PONG, data, len);
    } else if (opcode == WS_OP_CLOSE) {
        if (c->state == C_CLOSING) return 0; /* the echo of ours: the server closes TCP next */
        char k[24];
        snprintf(k, sizeof k, "%u", code);
        if (b->phase != PH_TEARDOWN) {
            count_key(&b->closes, k);
            snprintf(k, sizeof k, "server_close_%u", code);
            count_key(&b->errors, k);
        }
        if (!c->finished) conn_finish_connect(c, false);
        conn_send_close(c, code == WS_CLOSE_NO_STATUS ? 0 : code);
        c->state = C_CLOSING;
    }
    return c->state == C_CLOSED;
}

static const ws_parser_cb_t ws_cbs = {on_ws_message, on_ws_control};

static void ws_feed(bconn_t *c, uint8_t *p, size_t n) {
    int rc = ws_parser_feed(&c->ws, p, n);
    if (rc == 0 || rc == CHAT_ECLOSED) return;
    char k[48];
    snprintf(k, sizeof k, "ws_protocol_%u", c->ws.error_code);
    conn_fail(c, k);
}

/* ---- the upgrade --------------------------------------------------------------------------- */
static void make_key(const bench_t *b, const bconn_t *c, char out[25]) {
    uint8_t raw[16];
    uint64_t a = b->key_nonce ^ ((uint64_t)c->idx * 0x9E3779B97F4A7C15ull), z = b->key_nonce;
    memcpy(raw, &a, 8);
    memcpy(raw + 8, &z, 8);
    b64_encode(raw, 16, out);
}

static void after_upgrade(bconn_t *c, uint8_t *rest, size_t n) {
    bench_t *b = c->b;
    ws_parser_init(&c->ws, &ws_cbs, c);
    c->ws.require_mask = false;
    c->ws.expect_unmasked = true;
    c->ws.max_message = 64u << 20;
    if (c->deflate) {
        c->ws.zip = b->zip;
        b->deflate_conns++;
    }
    c->ws_ok = true;
    c->state = C_JOIN;
    b->scratch.len = 0;
    b->proto->encode_connect(b, c, c->token, &b->scratch);
    if (b->scratch.len) conn_send_text(c, b->scratch.p, b->scratch.len);
    else conn_ready(c);
    if (n && c->state != C_CLOSED) ws_feed(c, rest, n);
}

static bool header_is(const char *line, size_t n, const char *name, const char **val) {
    size_t k = strlen(name);
    if (n <= k || strncasecmp(line, name, k) != 0 || line[k] != ':') return false;
    const char *v = line + k + 1;
    while (v < line + n && (*v == ' ' || *v == '\t')) v++;
    *val = v;
    return true;
}

static void handshake_feed(bconn_t *c, const uint8_t *p, size_t n) {
    bench_t *b = c->b;
    /* the read that ends the head may bring many frames after it (events sent the moment
     * the connection opened): only the head itself is bounded */
    char *nh = realloc(c->hs, c->hs_len + n + 1);
    if (!nh) {
        conn_fail(c, "client_oom");
        return;
    }
    c->hs = nh;
    memcpy(c->hs + c->hs_len, p, n);
    c->hs_len += n;
    c->hs[c->hs_len] = '\0';
    char *end = strstr(c->hs, "\r\n\r\n");
    if (!end && c->hs_len > HS_MAX) conn_fail(c, "http_head_too_big");
    if (!end) return;
    size_t head = (size_t)(end + 4 - c->hs);
    int status = 0;
    if (sscanf(c->hs, "HTTP/1.%*d %d", &status) != 1 || status != 101) {
        char k[48];
        snprintf(k, sizeof k, "http_%d", status);
        conn_fail(c, k);
        return;
    }
    char key[25], want[29];
    make_key(b, c, key);
    if (ws_accept_key(key, 24, want) < 0) {
        conn_fail(c, "client_bad_key");
        return;
    }
    bool accept_ok = false;
    for (char *line = strstr(c->hs, "\r\n") + 2; line < end;) {
        char *eol = strstr(line, "\r\n");
        const char *v;
        if (header_is(line, (size_t)(eol - line), "Sec-WebSocket-Accept", &v))
            accept_ok = (size_t)(eol - v) >= 28 && memcmp(v, want, 28) == 0;
        else if (b->o.deflate &&
                 header_is(line, (size_t)(eol - line), "Sec-WebSocket-Extensions", &v))
            c->deflate = (size_t)(eol - v) >= 18 && memcmp(v, "permessage-deflate", 18) == 0;
        line = eol + 2;
    }
    if (!accept_ok) {
        conn_fail(c, "http_bad_accept");
        return;
    }
    /* Frames that came with the head are fed from a copy: hs is freed first. */
    size_t rest = c->hs_len - head;
    uint8_t *tail = NULL;
    if (rest) {
        tail = malloc(rest);
        if (!tail) {
            conn_fail(c, "client_oom");
            return;
        }
        memcpy(tail, c->hs + head, rest);
    }
    free(c->hs);
    c->hs = NULL;
    c->hs_len = 0;
    after_upgrade(c, tail, rest);
    free(tail);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    bconn_t *c = h->data;
    *buf = uv_buf_init((char *)c->b->rbuf, RBUF_SIZE);
}

/* The peer closed (EOF, a socket error, or TLS close_notify) or the connection failed. */
static void peer_gone(bconn_t *c, int err) {
    bench_t *b = c->b;
    if (c->state == C_CLOSING) {
        if (b->phase == PH_TEARDOWN) b->teardown_clean++;
        conn_close_now(c);
        return;
    }
    if (b->phase != PH_TEARDOWN) count_key(&b->closes, "1006");
    char k[48];
    snprintf(k, sizeof k, "%s", err == UV_EOF ? "eof" : uv_err_name(err));
    conn_fail(c, k);
}

static void deliver(bconn_t *c, uint8_t *p, size_t n) {
    if (c->state == C_UPGRADE) handshake_feed(c, p, n);
    else if (c->ws_ok && c->state != C_CLOSED) ws_feed(c, p, n);
}

static void send_upgrade(bconn_t *c);

/* --tls: ciphertext in, the handshake driven, plaintext out to the upgrade or WS parser. */
static void tls_read(bconn_t *c, const uint8_t *p, size_t n) {
    if (BIO_write(SSL_get_rbio(c->ssl), p, (int)n) != (int)n) {
        conn_fail(c, "client_oom");
        return;
    }
    uint8_t *rbuf = c->b->rbuf; /* its ciphertext is in the BIO now */
    while (c->state != C_CLOSED) {
        ERR_clear_error();
        if (c->state == C_TCP) {
            int r = SSL_do_handshake(c->ssl);
            if (r == 1) {
                send_upgrade(c);
                continue;
            }
            if (SSL_get_error(c->ssl, r) != SSL_ERROR_WANT_READ) {
                if (c->b->phase != PH_TEARDOWN && !c->b->o.json_only && !c->b->failed) {
                    char e[160];
                    ERR_error_string_n(ERR_peek_error(), e, sizeof e);
                    fprintf(stderr, "chat-bench: TLS handshake failed: %s\n", e);
                }
                conn_fail(c, "tls_handshake");
                return;
            }
            break;
        }
        size_t got;
        if (SSL_read_ex(c->ssl, rbuf, RBUF_SIZE, &got) != 1) {
            int e = SSL_get_error(c->ssl, 0);
            if (e == SSL_ERROR_WANT_READ) break;
            if (e == SSL_ERROR_ZERO_RETURN) peer_gone(c, UV_EOF); /* close_notify: as EOF */
            else conn_fail(c, "tls_read");
            return;
        }
        deliver(c, rbuf, got);
    }
    if (c->state != C_CLOSED && BIO_ctrl_pending(SSL_get_wbio(c->ssl))) mark_dirty(c);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    bconn_t *c = s->data;
    bench_t *b = c->b;
    if (nread == 0) return;
    if (nread < 0) {
        peer_gone(c, (int)nread);
        return;
    }
    b->rx_ns = now_ns();
    if (c->state != C_UPGRADE) { /* bytes on the wire: TLS records when --tls */
        b->rx_bytes += (uint64_t)nread;
        if (b->phase == PH_MEASURE) b->rx_bytes_window += (uint64_t)nread;
    }
    if (c->ssl) {
        tls_read(c, (const uint8_t *)buf->base, (size_t)nread);
        return;
    }
    deliver(c, (uint8_t *)buf->base, (size_t)nread);
}

static void on_connect(uv_connect_t *req, int status) {
    bconn_t *c = req->data;
    bench_t *b = c->b;
    free(req);
    if (status == UV_ECANCELED || c->state == C_CLOSED) return;
    if (status < 0) {
        char k[48];
        snprintf(k, sizeof k, "connect_%s", uv_err_name(status));
        conn_fail(c, k);
        return;
    }
    int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    if (rc < 0) {
        conn_fail(c, "read_start");
        return;
    }
    if (!b->tls) {
        send_upgrade(c);
        return;
    }
    BIO *rb = BIO_new(BIO_s_mem()), *wb = BIO_new(BIO_s_mem());
    if (!(c->ssl = SSL_new(b->tls)) || !rb || !wb) {
        BIO_free(rb);
        BIO_free(wb);
        conn_fail(c, "client_oom");
        return;
    }
    SSL_set_bio(c->ssl, rb, wb);
    SSL_set_connect_state(c->ssl);
    /* --host is an IPv4 address: no SNI (RFC 6066 has none for addresses); the server's
     * certificate must name that address */
    if (b->o.ca) X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), b->o.host);
    ERR_clear_error();
    SSL_do_handshake(c->ssl); /* the ClientHello, into the write BIO */
    mark_dirty(c);
}

/* The upgrade request (with TLS, once the handshake is done). */
static void send_upgrade(bconn_t *c) {
    bench_t *b = c->b;
    char sub[32];
    snprintf(sub, sizeof sub, "bench-u%u", c->idx);
    c->token = jwt_sign(sub, time_now_ms() / 1000, TOKEN_TTL_S, NULL, b->o.secret);
    if (!c->token) {
        conn_fail(c, "client_token");
        return;
    }
    char key[25];
    make_key(b, c, key);
    sbuf_t *sb = &b->scratch;
    sb->len = 0;
    sbuf_puts(sb, "GET ");
    b->proto->path(b, c, c->token, sb);
    sbuf_printf(sb,
                " HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n",
                b->o.host, b->o.ports[c->idx % b->o.n_ports], key,
                b->o.deflate ? "Sec-WebSocket-Extensions: permessage-deflate; "
                               "client_max_window_bits\r\n"
                             : "");
    if (sb->oom) {
        conn_fail(c, "client_oom");
        return;
    }
    c->state = C_UPGRADE;
    conn_send_raw(c, sb->p, sb->len);
}

static void conn_start(bench_t *b, bconn_t *c) {
    c->t_start = now_ns();
    b->started++;
    int rc = uv_tcp_init_ex(b->loop, &c->tcp, AF_INET);
    if (rc < 0) {
        char k[48];
        snprintf(k, sizeof k, "socket_%s", uv_err_name(rc));
        count_key(&b->errors, k);
        c->state = C_CLOSED;
        conn_finish_connect(c, false);
        return;
    }
    b->open++;
    c->tcp.data = c;
    c->state = C_TCP;
    const char *step = "bind";
    if (b->sources) {
        /* The port is picked at connect() from the whole 4-tuple, not at bind(): each source
         * address then gives a full ephemeral range towards the server. */
        uv_os_fd_t fd;
        int one = 1;
        if (uv_fileno((uv_handle_t *)&c->tcp, &fd) == 0)
            (void)setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in src;
        memset(&src, 0, sizeof src);
        src.sin_family = AF_INET;
        src.sin_addr.s_addr = htonl(0x7F000001u + c->idx % b->sources); /* 127.0.0.(1 + i % K) */
        rc = uv_tcp_bind(&c->tcp, (const struct sockaddr *)&src, 0);
    }
    if (rc == 0) {
        uv_tcp_nodelay(&c->tcp, 1);
        uv_connect_t *req = malloc(sizeof *req);
        step = "connect";
        if (!req) {
            rc = UV_ENOMEM;
        } else {
            req->data = c;
            rc = uv_tcp_connect(
                req, &c->tcp, (const struct sockaddr *)&b->addr[c->idx % b->o.n_ports], on_connect);
            if (rc < 0) free(req);
        }
    }
    if (rc < 0) {
        char k[48];
        snprintf(k, sizeof k, "%s_%s", step, uv_err_name(rc));
        conn_fail(c, k);
    }
}

/* Start connections while the in-flight cap and the connect rate allow. */
static void connect_more(bench_t *b) {
    if (b->phase != PH_CONNECT) return;
    uint64_t allowed = b->o.connections;
    if (b->o.connect_rate > 0) {
        double el = (double)(now_ns() - b->t0) / 1e9;
        allowed = (uint64_t)(el * b->o.connect_rate) + 1;
        if (allowed > b->o.connections) allowed = b->o.connections;
    }
    while (b->started < allowed && b->started - b->ready - b->failed < b->o.connect_inflight)
        conn_start(b, &b->conns[b->started]);
}

/* ---- phases ------------------------------------------------------------------------------- */
static void on_phase_timer(uv_timer_t *t);

static void set_phase_timer(bench_t *b, double seconds) {
    uv_timer_start(&b->phase_timer, on_phase_timer, (uint64_t)(seconds * 1000 + 0.5), 0);
}

static void begin_measure(bench_t *b) {
    b->phase = PH_MEASURE;
    b->t_meas_start = now_ns();
    getrusage(RUSAGE_SELF, &b->ru_meas0);
    b->srv_meas0 = proc_sample(&b->o);
    b->host_meas0 = host_sample();
    set_phase_timer(b, b->o.duration);
}

static void end_measure(bench_t *b) {
    b->phase = PH_DRAIN;
    b->t_meas_end = now_ns();
    getrusage(RUSAGE_SELF, &b->ru_meas1);
    b->srv_meas1 = proc_sample(&b->o);
    b->host_meas1 = host_sample();
    b->srv_end = b->srv_meas1;
    set_phase_timer(b, b->o.drain);
}

static void start_publishing(bench_t *b) {
    for (uint32_t i = 0; i < b->o.connections; i++)
        if (b->conns[i].state == C_READY) b->members[b->conns[i].chat]++;
    b->t_pub_start = now_ns();
    b->rate_total = b->o.rate * b->o.publishers;
    if (b->o.warmup > 0) {
        b->phase = PH_WARMUP;
        set_phase_timer(b, b->o.warmup);
    } else {
        begin_measure(b);
    }
    if (b->o.rate <= 0)
        for (uint32_t i = 0; i < b->o.publishers; i++) fill_window(b, &b->conns[i]);
}

static void maybe_connect_done(bench_t *b) {
    if (b->phase != PH_CONNECT || b->ready + b->failed < b->o.connections) return;
    b->t_connect_end = now_ns();
    getrusage(RUSAGE_SELF, &b->ru_connected);
    b->srv_connected = proc_sample(&b->o);
    b->host_connected = host_sample();
    if (!b->o.json_only)
        fprintf(stderr, "chat-bench: connected %u of %u in %.2fs (%u failed)\n", b->ready,
                b->o.connections, (double)(b->t_connect_end - b->t0) / 1e9, b->failed);
    if (b->o.idle) {
        b->phase = PH_HOLD;
        set_phase_timer(b, b->o.hold);
    } else if (!b->ready) {
        teardown(b);
    } else {
        start_publishing(b);
    }
}

static void on_phase_timer(uv_timer_t *t) {
    bench_t *b = t->data;
    switch (b->phase) {
    case PH_WARMUP: begin_measure(b); break;
    case PH_MEASURE: end_measure(b); break;
    case PH_HOLD:
        b->srv_end = proc_sample(&b->o);
        teardown(b);
        break;
    case PH_DRAIN: teardown(b); break;
    case PH_TEARDOWN:
        /* the server did not finish the close handshakes in time */
        for (uint32_t i = 0; i < b->started; i++)
            if (b->conns[i].state != C_CLOSED) {
                b->teardown_forced++;
                conn_close_now(&b->conns[i]);
            }
        break;
    default: break;
    }
}

static void progress(bench_t *b, uint64_t now) {
    double dt = (double)(now - b->t_last_progress) / 1e9;
    if (dt <= 0) return;
    if (!b->o.json_only) {
        fprintf(stderr,
                "chat-bench: %6.1fs %-8s conns=%u/%u failed=%u sends/s=%.0f acks/s=%.0f "
                "deliveries/s=%.0f p50=%.2fms p99=%.2fms errors=%" PRIu64 "%s",
                (double)(now - b->t0) / 1e9, phase_names[b->phase], b->ready, b->o.connections,
                b->failed, (double)(b->sent_all - b->prog_sent) / dt,
                (double)(b->acked_all - b->prog_acked) / dt,
                (double)(b->delivered_all - b->prog_delivered) / dt,
                (double)hist_pct(&b->lat, 500) / 1000, (double)hist_pct(&b->lat, 990) / 1000,
                b->errors.total, b->o.n_ports > 1 ? "" : "\n");
        if (b->o.n_ports > 1)
            fprintf(stderr, " cross-node p50=%.2fms p99=%.2fms\n",
                    (double)hist_pct(&b->lat_cross, 500) / 1000,
                    (double)hist_pct(&b->lat_cross, 990) / 1000);
    }
    b->prog_sent = b->sent_all;
    b->prog_acked = b->acked_all;
    b->prog_delivered = b->delivered_all;
    b->t_last_progress = now;
}

static void on_progress(uv_timer_t *t) { progress(t->data, now_ns()); }

static void on_tick(uv_timer_t *t) {
    bench_t *b = t->data;
    uint64_t now = now_ns();
    if (b->phase == PH_CONNECT) {
        connect_more(b);
        if (b->o.connect_timeout > 0 &&
            (double)(now - b->t_last_connect_progress) / 1e9 > b->o.connect_timeout) {
            /* nothing finished connecting for too long: give up on those still pending */
            for (uint32_t i = 0; i < b->started; i++)
                if (!b->conns[i].finished) conn_fail(&b->conns[i], "connect_timeout");
            maybe_connect_done(b);
        }
        return;
    }
    schedule_publishes(b, now);
    if (b->phase == PH_DRAIN && b->acked_all + b->pub_failed_all >= b->sent_all &&
        b->delivered >= b->expected)
        teardown(b);
}

/* Close every connection with the WebSocket close handshake, then stop. Called again when
 * the last handle closed. */
static void teardown(bench_t *b) {
    if (b->phase != PH_TEARDOWN) {
        b->phase = PH_TEARDOWN;
        b->t_teardown = now_ns();
        if (!b->t_meas_end || b->t_meas_end == UINT64_MAX) b->t_meas_end = b->t_teardown;
        if (!b->srv_end.ok) b->srv_end = proc_sample(&b->o);
        getrusage(RUSAGE_SELF, &b->ru_end);
        for (uint32_t i = 0; i < b->started; i++) {
            bconn_t *c = &b->conns[i];
            if (c->state == C_READY || c->state == C_JOIN) {
                conn_send_close(c, WS_CLOSE_NORMAL);
                c->state = C_CLOSING;
            } else if (c->state != C_CLOSED && c->state != C_CLOSING) {
                b->teardown_aborted++;
                conn_close_now(c);
            }
        }
        set_phase_timer(b, 3.0 + b->o.connections / 20000.0);
    }
    if (b->open) return;
    b->phase = PH_DONE;
    uv_close((uv_handle_t *)&b->tick, NULL);
    uv_close((uv_handle_t *)&b->phase_timer, NULL);
    uv_close((uv_handle_t *)&b->progress_timer, NULL);
    uv_close((uv_handle_t *)&b->flusher, NULL);
    uv_close((uv_handle_t *)&b->sigint, NULL);
}

static void on_sigint(uv_signal_t *s, int signum) {
    bench_t *b = s->data;
    if (!b->o.json_only) fprintf(stderr, "chat-bench: interrupted, reporting what was measured\n");
    if (b->phase == PH_MEASURE) end_measure(b);
    if (b->phase != PH_TEARDOWN && b->phase != PH_DONE) teardown(b);
}

/* ---- report ------------------------------------------------------------------------------ */
static json_t *hist_json(const hist_t *h) {
    return json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:f}", "count", (json_int_t)h->n, "min",
                     (json_int_t)h->min, "p50", (json_int_t)hist_pct(h, 500), "p90",
                     (json_int_t)hist_pct(h, 900), "p99", (json_int_t)hist_pct(h, 990), "p999",
                     (json_int_t)hist_pct(h, 999), "max", (json_int_t)h->max, "mean",
                     h->n ? round_to(h->sum / (double)h->n, 0.1) : 0.0);
}

static json_t *counters_json(const counters_t *cs) {
    json_t *o = json_object();
    for (size_t i = 0; i < cs->n; i++)
        json_object_set_new(o, cs->v[i].key, json_integer((json_int_t)cs->v[i].n));
    return o;
}

static json_t *int_list(const int *v, unsigned n) {
    json_t *a = json_array();
    for (unsigned i = 0; i < n; i++) json_array_append_new(a, json_integer(v[i]));
    return a;
}

static json_t *server_json(const bench_t *b) {
    if (!b->o.n_pids || !b->srv_start.ok) return json_null();
    double meas_wall = (double)(b->t_meas_end - b->t_meas_start) / 1e9;
    json_t *s =
        json_pack("{s:i,s:I,s:I,s:I}", "pid", b->o.server_pids[0], "rss_kb_start",
                  (json_int_t)b->srv_start.rss_kb, "rss_kb_connected",
                  (json_int_t)b->srv_connected.rss_kb, "rss_kb_end", (json_int_t)b->srv_end.rss_kb);
    if (b->o.n_pids > 1) json_object_set_new(s, "pids", int_list(b->o.server_pids, b->o.n_pids));
    if (b->ready) {
        long base = b->srv_start.rss_kb;
        json_object_set_new(
            s, "rss_per_conn_bytes_connected",
            json_integer((json_int_t)((b->srv_connected.rss_kb - base) * 1024 / (long)b->ready)));
        json_object_set_new(
            s, "rss_per_conn_bytes_end",
            json_integer((json_int_t)((b->srv_end.rss_kb - base) * 1024 / (long)b->ready)));
    }
    json_object_set_new(s, "connect_cpu_s",
                        json_real(round_to(b->srv_connected.cpu_s - b->srv_start.cpu_s, 0.01)));
    if (b->srv_meas0.ok && b->srv_meas1.ok && meas_wall > 0) {
        double cpu = b->srv_meas1.cpu_s - b->srv_meas0.cpu_s;
        json_object_set_new(s, "measure_cpu_s", json_real(round_to(cpu, 0.01)));
        json_object_set_new(s, "measure_cpu_pct", json_real(round_to(cpu / meas_wall * 100, 0.1)));
    }
    return s;
}

/* Over the phase that matters (h0..h1, cpu_self and cpu_srv in it): how busy the machine
 * was, and how much of it went to processes other than chat-bench and the server. */
static json_t *host_json(const host_sample_t *h0, const host_sample_t *h1, double wall,
                         double cpu_self, double cpu_srv) {
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (!h0->ok || !h1->ok || wall <= 0 || h1->total_s <= h0->total_s)
        return json_pack("{s:i}", "cpus", (int)ncpu);
    double busy = h1->busy_s - h0->busy_s, other = busy - cpu_self - cpu_srv;
    if (other < 0) other = 0;
    return json_pack("{s:i,s:f,s:f,s:f,s:f}", "cpus", (int)ncpu, "load1_start",
                     round_to(h0->load1, 0.01), "load1_end", round_to(h1->load1, 0.01), "busy_pct",
                     round_to(busy / (h1->total_s - h0->total_s) * 100, 0.1),
                     "other_processes_cores", round_to(other / wall, 0.01));
}

static void report(bench_t *b) {
    const opts_t *o = &b->o;
    uint64_t t_end = now_ns();
    bool have_meas = b->t_meas_start != UINT64_MAX;
    double meas = have_meas ? (double)(b->t_meas_end - b->t_meas_start) / 1e9 : 0;
    uint64_t t_conn_end = b->t_connect_end ? b->t_connect_end : b->t_teardown;
    double conn_wall = (double)(t_conn_end - b->t0) / 1e9;
    double wall = (double)(t_end - b->t0) / 1e9;
    struct rusage ru_now;
    getrusage(RUSAGE_SELF, &ru_now);
    double cpu_all = cpu_seconds(&ru_now) - cpu_seconds(&b->ru_start);
    double cpu_conn = cpu_seconds(&b->ru_connected) - cpu_seconds(&b->ru_start);
    double cpu_meas = have_meas ? cpu_seconds(&b->ru_meas1) - cpu_seconds(&b->ru_meas0) : 0;
    double conn_pct = conn_wall > 0 ? cpu_conn / conn_wall * 100 : 0;
    double meas_pct = meas > 0 ? cpu_meas / meas * 100 : 0;
    /* the phase whose numbers the run is about: connecting for --idle, else the window */
    bool saturated = o->idle ? conn_pct > 90 : meas_pct > 90;
    /* open loop only: sends went out more than 10 ms behind the schedule (p99) */
    uint64_t lag99 = hist_pct(&b->lag, 990);
    bool late = lag99 > 10000;
    uint64_t lost = b->expected > b->delivered ? b->expected - b->delivered : 0;
    const char *mode = o->idle ? "idle" : o->rate > 0 ? "rate" : "window";

    json_t *r = json_object();
    json_object_set_new(r, "target", json_string(b->proto->name));
    if (o->label) json_object_set_new(r, "label", json_string(o->label));
    json_object_set_new(r, "host", json_string(o->host));
    json_object_set_new(r, "port", json_integer(o->port));
    json_object_set_new(r, "tls", json_boolean(o->tls));
    if (o->n_ports > 1) json_object_set_new(r, "ports", int_list(o->ports, o->n_ports));
    json_object_set_new(r, "config",
                        json_pack("{s:s,s:i,s:i,s:i,s:f,s:i,s:i,s:f,s:f,s:i,s:f,s:f}", "mode", mode,
                                  "connections", (int)o->connections, "chats", (int)o->chats,
                                  "publishers", (int)o->publishers, "rate", o->rate, "window",
                                  (int)o->window, "size", (int)o->size, "duration_s", o->duration,
                                  "warmup_s", o->warmup, "sources", (int)b->sources, "connect_rate",
                                  o->connect_rate, "hold_s", o->idle ? o->hold : 0.0));
    json_object_set_new(r, "connect",
                        json_pack("{s:i,s:i,s:i,s:f,s:f,s:o}", "attempted", (int)b->started, "ok",
                                  (int)b->ready, "failed", (int)b->failed, "time_s",
                                  round_to(conn_wall, 0.001), "per_s",
                                  conn_wall > 0 ? round_to(b->ready / conn_wall, 0.1) : 0.0,
                                  "latency_us", hist_json(&b->connect_lat)));
    json_object_set_new(r, "duration_s", json_real(round_to(meas, 0.001)));
    json_object_set_new(r, "sent", json_integer((json_int_t)b->sent));
    json_object_set_new(r, "acked", json_integer((json_int_t)b->acked));
    json_object_set_new(r, "publish_failed", json_integer((json_int_t)b->pub_failed));
    json_object_set_new(r, "delivered", json_integer((json_int_t)b->delivered));
    json_object_set_new(r, "expected_deliveries", json_integer((json_int_t)b->expected));
    json_object_set_new(r, "lost", json_integer((json_int_t)lost));
    json_object_set_new(r, "sends_per_s", json_real(meas > 0 ? round_to(b->sent / meas, 0.1) : 0));
    json_object_set_new(r, "acks_per_s", json_real(meas > 0 ? round_to(b->acked / meas, 0.1) : 0));
    json_object_set_new(r, "deliveries_per_s",
                        json_real(meas > 0 ? round_to(b->delivered / meas, 0.1) : 0));
    json_object_set_new(r, "window_rx",
                        json_pack("{s:I,s:f,s:I,s:f}", "acks", (json_int_t)b->rx_acked,
                                  "acks_per_s", meas > 0 ? round_to(b->rx_acked / meas, 0.1) : 0.0,
                                  "deliveries", (json_int_t)b->rx_delivered, "deliveries_per_s",
                                  meas > 0 ? round_to(b->rx_delivered / meas, 0.1) : 0.0));
    /* what the deliveries cost on the wire: every byte read in the window (frames of every
     * kind, headers included) over the deliveries read in it */
    json_object_set_new(
        r, "wire",
        json_pack("{s:b,s:i,s:I,s:I,s:f}", "deflate_offered", o->deflate, "deflate_connections",
                  (int)b->deflate_conns, "rx_bytes", (json_int_t)b->rx_bytes, "rx_bytes_window",
                  (json_int_t)b->rx_bytes_window, "rx_bytes_per_delivery",
                  b->rx_delivered ? round_to((double)b->rx_bytes_window / b->rx_delivered, 0.1)
                                  : 0.0));
    json_object_set_new(r, "latency_us", hist_json(&b->lat));
    if (o->n_ports > 1) { /* the same deliveries, by whether they crossed nodes */
        json_object_set_new(r, "latency_same_node_us", hist_json(&b->lat_same));
        json_object_set_new(r, "latency_cross_node_us", hist_json(&b->lat_cross));
    }
    json_object_set_new(r, "ack_latency_us", hist_json(&b->ack_lat));
    json_object_set_new(r, "schedule_lag_us", hist_json(&b->lag));
    json_object_set_new(r, "errors",
                        json_pack("{s:I,s:o}", "total", (json_int_t)b->errors.total, "by_kind",
                                  counters_json(&b->errors)));
    json_object_set_new(r, "closes", counters_json(&b->closes));
    json_object_set_new(r, "totals",
                        json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "sent", (json_int_t)b->sent_all,
                                  "acked", (json_int_t)b->acked_all, "publish_failed",
                                  (json_int_t)b->pub_failed_all, "delivered",
                                  (json_int_t)b->delivered_all, "skipped", (json_int_t)b->skipped,
                                  "other_messages", (json_int_t)b->other_msgs, "other_bytes",
                                  (json_int_t)b->other_bytes));
    json_object_set_new(r, "teardown",
                        json_pack("{s:I,s:I,s:I}", "clean", (json_int_t)b->teardown_clean, "forced",
                                  (json_int_t)b->teardown_forced, "aborted",
                                  (json_int_t)b->teardown_aborted));
    json_object_set_new(r, "client",
                        json_pack("{s:f,s:f,s:f,s:f,s:b}", "cpu_s", round_to(cpu_all, 0.01),
                                  "wall_s", round_to(wall, 0.001), "connect_cpu_pct",
                                  round_to(conn_pct, 0.1), "measure_cpu_pct",
                                  round_to(meas_pct, 0.1), "saturated", saturated));
    json_object_set_new(r, "client_saturated", json_boolean(saturated));
    json_object_set_new(r, "client_late", json_boolean(late));
    json_object_set_new(r, "server", server_json(b));
    if (o->idle || !have_meas)
        json_object_set_new(r, "host",
                            host_json(&b->host_start, &b->host_connected, conn_wall, cpu_conn,
                                      b->srv_connected.cpu_s - b->srv_start.cpu_s));
    else
        json_object_set_new(r, "host",
                            host_json(&b->host_meas0, &b->host_meas1, meas, cpu_meas,
                                      b->srv_meas1.cpu_s - b->srv_meas0.cpu_s));

    char *s = json_dumps(r, JSON_INDENT(2) | JSON_REAL_PRECISION(15));
    if (s) {
        fputs(s, stdout);
        fputc('\n', stdout);
        fflush(stdout);
    }
    free(s);
    json_decref(r);
    if (late)
        fprintf(stderr,
                "chat-bench: WARNING: the client ran late against its send schedule (p99 "
                "%.1f ms): its loop did not get the CPU in time; latencies include that\n",
                (double)lag99 / 1000);
    if (saturated)
        fprintf(stderr,
                "chat-bench: WARNING: the client saturated its core (%.0f%% CPU in the %s "
                "phase): these numbers measure chat-bench, not the server\n",
                o->idle ? conn_pct : meas_pct, o->idle ? "connect" : "measurement");
}

/* ---- self-test -------------------------------------------------------------------------- */
static void test_hist_exact(void) {
    static hist_t h;
    memset(&h, 0, sizeof h);
    for (uint64_t v = 1; v <= 1000; v++) hist_record(&h, v);
    CHECK_INT(h.n, 1000);
    CHECK_INT(h.min, 1);
    CHECK_INT(h.max, 1000);
    /* 500 shares its bucket with 501, 900 with 901..903 (buckets of 2 and 4 there) */
    CHECK_INT(hist_pct(&h, 500), 501);
    CHECK_INT(hist_pct(&h, 900), 903);
    CHECK_INT(hist_pct(&h, 990), 991);
    CHECK_INT(hist_pct(&h, 999), 999);
    CHECK_INT(hist_pct(&h, 1000), 1000);
    memset(&h, 0, sizeof h);
    CHECK_INT(hist_pct(&h, 990), 0);
    for (int i = 0; i < 99; i++) hist_record(&h, 100);
    hist_record(&h, 5000000);
    CHECK_INT(hist_pct(&h, 990), 100); /* rank 99 of 100 */
    CHECK_INT(hist_pct(&h, 999), 5000000);
    hist_record(&h, 1000000000); /* beyond 60 s: counted as 60 s */
    CHECK_INT(h.max, HIST_MAX_US);
    CHECK(hist_index(HIST_MAX_US) < HIST_BUCKETS);
}

static void test_hist_precision(void) {
    uint64_t s = 42;
    for (int i = 0; i < 200000; i++) {
        uint64_t v = xorshift(&s) % HIST_MAX_US;
        unsigned ix = hist_index(v);
        uint64_t hi = hist_high(ix);
        CHECK(hi >= v);
        CHECK((hi - v) * 128 <= v);              /* within 1/128 */
        CHECK(ix == 0 || hist_high(ix - 1) < v); /* buckets do not overlap */
        CHECK(hist_index(hi) == ix);
    }
    for (unsigned i = 1; i < HIST_BUCKETS; i++)
        CHECK(hist_high(i) == hist_high(i - 1) + 1 || hist_index(hist_high(i - 1) + 1) == i);
}

/* A fresh classification of one NUL-terminated frame. */
static void classify_str(void (*classify)(const char *, size_t, in_msg_t *), const char *s,
                         in_msg_t *m) {
    memset(m, 0, sizeof *m);
    classify(s, strlen(s), m);
}

static void test_chatd_classify(void) {
    in_msg_t m;
    const char *ev = "{\"event\":\"message:message\",\"chat_id\":\"bench-1\",\"message_id\":\"9\","
                     "\"user_from\":\"bench-u3\",\"message\":\"t=123456789;s=3;xxxx\","
                     "\"created_at\":\"2026-11-29T12:00:00.123Z\"}";
    classify_str(chatd_classify, ev, &m);
    CHECK_INT(m.kind, IN_PUB);
    CHECK_INT(m.t_ns, 123456789);
    CHECK_INT(m.sender, 3);
    CHECK(!m.has_node); /* a payload without the node */
    const char *noded = "{\"event\":\"message:message\",\"user_from\":\"bench-u5\","
                        "\"message\":\"t=99;s=5;n=2;xxxx\"}";
    classify_str(chatd_classify, noded, &m);
    CHECK_INT(m.kind, IN_PUB);
    CHECK_INT(m.t_ns, 99);
    CHECK_INT(m.sender, 5);
    CHECK(m.has_node);
    CHECK_INT(m.node, 2);
    const char *badnode = "{\"event\":\"message:message\",\"message\":\"t=99;s=5;n=2x\"}";
    classify_str(chatd_classify, badnode, &m);
    CHECK_INT(m.kind, IN_PUB); /* still a delivery, the node unknown */
    CHECK(!m.has_node);
    const char *err = "{\"event\":\"error\",\"code\":\"store_unavailable\",\"detail\":\"x\"}";
    classify_str(chatd_classify, err, &m);
    CHECK_INT(m.kind, IN_ERROR);
    CHECK_STR(m.code, "store_unavailable");
    const char *foreign = "{\"event\":\"message:message\",\"message\":\"hello\"}";
    classify_str(chatd_classify, foreign, &m);
    CHECK_INT(m.kind, IN_OTHER);
    const char *cut = "{\"event\":\"message:message\",\"message\":\"t=12";
    classify_str(chatd_classify, cut, &m);
    CHECK_INT(m.kind, IN_OTHER);
    /* the fast paths miss (another key first, an '=' before the text): same result */
    const char *odd = "{\"chat_id\":\"a=b\",\"event\":\"message:message\","
                      "\"message\":\"t=77;s=4;xx\"}";
    classify_str(chatd_classify, odd, &m);
    CHECK_INT(m.kind, IN_PUB);
    CHECK_INT(m.t_ns, 77);
    CHECK_INT(m.sender, 4);
}

static void test_centrifugo_classify(void) {
    in_msg_t m;
    const char *push = "{\"push\":{\"channel\":\"bench:bench-0\",\"pub\":{\"data\":{\"t\":77,\"s\""
                       ":12,\"text\":\"t=77;s=12;\"},\"offset\":3}}}";
    classify_str(cf_classify, push, &m);
    CHECK_INT(m.kind, IN_PUB);
    CHECK_INT(m.t_ns, 77);
    CHECK_INT(m.sender, 12);
    CHECK(!m.has_node);
    const char *noded = "{\"push\":{\"channel\":\"bench:bench-0\",\"pub\":{\"data\":{\"t\":78,"
                        "\"s\":13,\"n\":1,\"text\":\"t=78;s=13;n=1;\"},\"offset\":4}}}";
    classify_str(cf_classify, noded, &m);
    CHECK_INT(m.kind, IN_PUB);
    CHECK_INT(m.t_ns, 78);
    CHECK_INT(m.sender, 13);
    CHECK(m.has_node);
    CHECK_INT(m.node, 1);
    const char *rep = "{\"id\":42,\"publish\":{}}";
    classify_str(cf_classify, rep, &m);
    CHECK_INT(m.kind, IN_REPLY);
    CHECK_INT(m.id, 42);
    CHECK(!m.failed);
    const char *bad = "{\"id\":2,\"error\":{\"code\":103,\"message\":\"permission denied\"}}";
    classify_str(cf_classify, bad, &m);
    CHECK_INT(m.kind, IN_REPLY);
    CHECK(m.failed);
    CHECK_STR(m.code, "103");
    classify_str(cf_classify, "{}", &m);
    CHECK_INT(m.kind, IN_PING);
    const char *unsub = "{\"push\":{\"channel\":\"bench:bench-0\",\"unsubscribe\":{\"code\":2500,"
                        "\"reason\":\"insufficient state\"}}}";
    classify_str(cf_classify, unsub, &m);
    CHECK_INT(m.kind, IN_ERROR);
    CHECK_STR(m.code, "unsubscribe_2500");
}

static void test_publish_size(void) {
    bench_t *b = calloc(1, sizeof *b);
    CHECK(b != NULL);
    bconn_t c;
    memset(&c, 0, sizeof c);
    c.idx = 7;
    c.chat = 2;
    c.next_id = 3;
    b->o.size = 100;
    sbuf_t sb = {0};
    chatd_publish(b, &c, 1234, &sb);
    const char *pre = "{\"event\":\"message:message\",\"message\":\"t=1234;s=7;n=0;xxx";
    CHECK(sb.len == strlen("{\"event\":\"message:message\",\"message\":\"\"}") + 100);
    CHECK_MEM(sb.p, pre, strlen(pre));
    sb.len = 0;
    cf_publish(b, &c, 1234, &sb);
    const char *cpre = "{\"id\":3,\"publish\":{\"channel\":\"bench:bench-2\",\"data\":{\"t\":1234,";
    CHECK_MEM(sb.p, cpre, strlen(cpre));
    const char *data = strstr(sb.p, "\"data\":") + 7;
    CHECK_INT((long long)(sb.p + sb.len - 2 - data), 100); /* the data object is --size bytes */

    /* a cluster of 3: connection 7 is on node 1, and its messages say so */
    b->o.n_ports = 3;
    sb.len = 0;
    chatd_publish(b, &c, 1234, &sb);
    pre = "{\"event\":\"message:message\",\"message\":\"t=1234;s=7;n=1;xxx";
    CHECK(sb.len == strlen("{\"event\":\"message:message\",\"message\":\"\"}") + 100);
    CHECK_MEM(sb.p, pre, strlen(pre));
    in_msg_t m;
    memset(&m, 0, sizeof m);
    chatd_classify(sb.p, sb.len, &m); /* the event carries the text as sent */
    CHECK_INT(m.kind, IN_PUB);
    CHECK_INT(m.t_ns, 1234);
    CHECK_INT(m.sender, 7);
    CHECK(m.has_node);
    CHECK_INT(m.node, 1);
    sb.len = 0;
    cf_publish(b, &c, 1234, &sb);
    data = strstr(sb.p, "\"data\":") + 7;
    CHECK_INT((long long)(sb.p + sb.len - 2 - data), 100);
    sbuf_t push = {0}; /* what a subscriber gets: the data object inside a push */
    sbuf_puts(&push, "{\"push\":{\"channel\":\"bench:bench-2\",\"pub\":{\"data\":");
    sbuf_put(&push, data, (size_t)(sb.p + sb.len - 2 - data));
    sbuf_puts(&push, ",\"offset\":1}}}");
    memset(&m, 0, sizeof m);
    cf_classify(push.p, push.len, &m);
    CHECK_INT(m.kind, IN_PUB);
    CHECK_INT(m.t_ns, 1234);
    CHECK_INT(m.sender, 7);
    CHECK(m.has_node);
    CHECK_INT(m.node, 1);
    sbuf_free(&push);
    sbuf_free(&sb);
    free(b);
}

/* Deliveries split by node: same node when the sender's node is the receiver's. */
static void test_node_split(void) {
    bench_t *b = calloc(1, sizeof *b);
    CHECK(b != NULL);
    bconn_t c;
    memset(&c, 0, sizeof c);
    c.idx = 4; /* node 1 of 3 */
    in_msg_t m;
    memset(&m, 0, sizeof m);
    m.kind = IN_PUB;
    m.sender = 1;
    b->o.n_ports = 1;
    CHECK(node_hist(b, &c, &m) == NULL); /* one node: no split */
    b->o.n_ports = 3;
    CHECK(node_hist(b, &c, &m) == &b->lat_same); /* derived: sender 1 is on node 1 */
    m.sender = 2;
    CHECK(node_hist(b, &c, &m) == &b->lat_cross);
    m.has_node = true; /* carried: it wins over the derivation */
    m.node = 1;
    CHECK(node_hist(b, &c, &m) == &b->lat_same);
    m.node = 0;
    CHECK(node_hist(b, &c, &m) == &b->lat_cross);
    free(b);
}

static int self_test(void) {
    RUN(test_hist_exact);
    RUN(test_hist_precision);
    RUN(test_chatd_classify);
    RUN(test_centrifugo_classify);
    RUN(test_publish_size);
    RUN(test_node_split);
    return test_summary("chat-bench self-test");
}

/* ---- options ----------------------------------------------------------------------------- */
static void usage(FILE *f) {
    fputs("usage: chat-bench [options]      results: one JSON object on stdout\n"
          "  --host ADDR            server address (127.0.0.1)\n"
          "  --port N[,N...]        server port (8000); a list spreads connection i over\n"
          "                         the nodes of a cluster: port (i % count)\n"
          "  --target T             chatd | centrifugo (chatd)\n"
          "  --secret S             HS256 secret for the tokens it mints (CHAT_JWT_SECRET)\n"
          "  --connections N        WebSocket connections (100)\n"
          "  --chats R              connection i joins chat bench-(i % R) (10)\n"
          "  --publishers P         the first P connections publish (10)\n"
          "  --rate R               messages/s per publisher; 0: closed loop, see --window (10)\n"
          "  --window W             --rate 0: messages in flight per publisher (16)\n"
          "  --size B               message text size in bytes (100)\n"
          "  --duration S           measurement window, seconds (10)\n"
          "  --warmup S             publishing before the window, not counted (2)\n"
          "  --drain S              most time to wait for late deliveries after it (5)\n"
          "  --sources K            bind client i to 127.0.0.(1 + i % K); 0: no bind\n"
          "                         (default: enough for the ephemeral port range)\n"
          "  --connect-rate N       most new connections per second (unlimited)\n"
          "  --connect-inflight N   most connections being set up at once (512)\n"
          "  --connect-timeout S    give up on pending connects after S s without progress (30)\n"
          "  --deflate              offer permessage-deflate (RFC 7692); messages are sent\n"
          "                         plain, the server's compressed ones are inflated\n"
          "  --words                pad the text with random words instead of 'x' (for\n"
          "                         compression: a run of 'x' compresses to nothing)\n"
          "  --idle                 connect all, hold --hold seconds, report (no publishing)\n"
          "  --hold S               --idle: how long to hold (5)\n"
          "  --server-pid PID[,..]  sample the server's CPU and RSS from /proc per phase\n"
          "                         (a list: the sums over the nodes)\n"
          "  --query Q              chatd: appended to the WebSocket URL's query, e.g.\n"
          "                         presence=1 (presence events to every connection)\n"
          "  --tls                  wss:// (TLS on memory BIOs, as chatd --tls-cert)\n"
          "  --ca FILE              --tls: verify the server's certificate against this CA\n"
          "  --insecure             --tls: no certificate check\n"
          "  --label L              copied into the JSON\n"
          "  --json-only            no progress on stderr\n"
          "  --self-test            run the internal tests and exit\n",
          f);
}

/* "8001,8002": a comma-separated list of up to MAX_NODES positive numbers. */
static int int_list_parse(const char *s, int *out, unsigned *n) {
    *n = 0;
    while (*s) {
        char *e;
        long v = strtol(s, &e, 10);
        if (e == s || v <= 0 || v > 0x7FFFFFFF || *n == MAX_NODES || (*e && *e != ',')) return -1;
        out[(*n)++] = (int)v;
        s = *e ? e + 1 : e;
    }
    return *n ? 0 : -1;
}

static int parse_opts(int argc, char **argv, opts_t *o) {
    enum {
        O_HOST = 256,
        O_PORT,
        O_TARGET,
        O_SECRET,
        O_CONNS,
        O_CHATS,
        O_PUBS,
        O_RATE,
        O_WINDOW,
        O_SIZE,
        O_DURATION,
        O_WARMUP,
        O_DRAIN,
        O_SOURCES,
        O_CRATE,
        O_CINFL,
        O_CTIMEOUT,
        O_IDLE,
        O_HOLD,
        O_PID,
        O_LABEL,
        O_JSON,
        O_SELF,
        O_HELP,
        O_TLS,
        O_CA,
        O_INSECURE,
        O_DEFLATE,
        O_WORDS,
        O_QUERY
    };
    static const struct option lo[] = {{"host", 1, 0, O_HOST},
                                       {"port", 1, 0, O_PORT},
                                       {"target", 1, 0, O_TARGET},
                                       {"secret", 1, 0, O_SECRET},
                                       {"connections", 1, 0, O_CONNS},
                                       {"chats", 1, 0, O_CHATS},
                                       {"publishers", 1, 0, O_PUBS},
                                       {"rate", 1, 0, O_RATE},
                                       {"window", 1, 0, O_WINDOW},
                                       {"size", 1, 0, O_SIZE},
                                       {"duration", 1, 0, O_DURATION},
                                       {"warmup", 1, 0, O_WARMUP},
                                       {"drain", 1, 0, O_DRAIN},
                                       {"sources", 1, 0, O_SOURCES},
                                       {"connect-rate", 1, 0, O_CRATE},
                                       {"connect-inflight", 1, 0, O_CINFL},
                                       {"connect-timeout", 1, 0, O_CTIMEOUT},
                                       {"idle", 0, 0, O_IDLE},
                                       {"hold", 1, 0, O_HOLD},
                                       {"server-pid", 1, 0, O_PID},
                                       {"label", 1, 0, O_LABEL},
                                       {"json-only", 0, 0, O_JSON},
                                       {"self-test", 0, 0, O_SELF},
                                       {"help", 0, 0, O_HELP},
                                       {"tls", 0, 0, O_TLS},
                                       {"ca", 1, 0, O_CA},
                                       {"insecure", 0, 0, O_INSECURE},
                                       {"deflate", 0, 0, O_DEFLATE},
                                       {"words", 0, 0, O_WORDS},
                                       {"query", 1, 0, O_QUERY},
                                       {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        char *e = NULL;
        switch (ch) {
        case O_HOST: o->host = optarg; break;
        case O_PORT:
            if (int_list_parse(optarg, o->ports, &o->n_ports) < 0) goto bad;
            o->port = o->ports[0];
            break;
        case O_TARGET: o->target = optarg; break;
        case O_SECRET: o->secret = optarg; break;
        case O_CONNS: o->connections = (unsigned)strtoul(optarg, &e, 10); break;
        case O_CHATS: o->chats = (unsigned)strtoul(optarg, &e, 10); break;
        case O_PUBS: o->publishers = (unsigned)strtoul(optarg, &e, 10); break;
        case O_RATE: o->rate = strtod(optarg, &e); break;
        case O_WINDOW: o->window = (unsigned)strtoul(optarg, &e, 10); break;
        case O_SIZE: o->size = (unsigned)strtoul(optarg, &e, 10); break;
        case O_DURATION: o->duration = strtod(optarg, &e); break;
        case O_WARMUP: o->warmup = strtod(optarg, &e); break;
        case O_DRAIN: o->drain = strtod(optarg, &e); break;
        case O_SOURCES:
            o->sources = (unsigned)strtoul(optarg, &e, 10);
            o->sources_set = 1;
            break;
        case O_CRATE: o->connect_rate = strtod(optarg, &e); break;
        case O_CINFL: o->connect_inflight = (unsigned)strtoul(optarg, &e, 10); break;
        case O_CTIMEOUT: o->connect_timeout = strtod(optarg, &e); break;
        case O_IDLE: o->idle = true; break;
        case O_DEFLATE: o->deflate = true; break;
        case O_WORDS: o->words = true; break;
        case O_HOLD: o->hold = strtod(optarg, &e); break;
        case O_PID:
            if (int_list_parse(optarg, o->server_pids, &o->n_pids) < 0) goto bad;
            break;
        case O_LABEL: o->label = optarg; break;
        case O_QUERY: o->query = optarg; break;
        case O_JSON: o->json_only = true; break;
        case O_TLS: o->tls = true; break;
        case O_CA: o->ca = optarg; break;
        case O_INSECURE: o->insecure = true; break;
        case O_SELF: return 1;
        case 'h':
        case O_HELP: usage(stdout); exit(0);
        default: usage(stderr); return -1;
        }
        if (e && *e) {
        bad:
            fprintf(stderr, "chat-bench: bad value \"%s\" for an option\n", optarg);
            return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "chat-bench: unexpected argument \"%s\"\n", argv[optind]);
        return -1;
    }
    return 0;
}

static int check_opts(opts_t *o) {
    if (!o->secret) o->secret = getenv("CHAT_JWT_SECRET");
    if (!o->secret || !*o->secret) {
        fprintf(stderr, "chat-bench: --secret (or CHAT_JWT_SECRET) is required to mint tokens\n");
        return -1;
    }
    if (!o->connections || !o->chats || o->chats > o->connections) {
        fprintf(stderr, "chat-bench: need 1 <= --chats <= --connections\n");
        return -1;
    }
    if (o->publishers > o->connections) {
        fprintf(stderr, "chat-bench: --publishers is more than --connections\n");
        return -1;
    }
    if (o->rate < 0 || (o->rate == 0 && !o->window) || o->duration <= 0 || o->warmup < 0 ||
        o->drain < 0 || o->hold < 0 || !o->connect_inflight || o->sources > 254) {
        fprintf(stderr, "chat-bench: bad --rate/--window/--duration/--warmup/--drain/--hold/"
                        "--connect-inflight/--sources\n");
        return -1;
    }
    if (o->idle) o->publishers = 0;
    if (o->tls && !o->ca == !o->insecure) {
        fprintf(stderr, "chat-bench: --tls needs exactly one of --ca FILE or --insecure\n");
        return -1;
    }
    if (!o->tls && (o->ca || o->insecure)) {
        fprintf(stderr, "chat-bench: --ca and --insecure go with --tls\n");
        return -1;
    }
    return 0;
}

/* A client context: TLS 1.2 or 1.3, no session reuse (every connection is a full handshake,
 * the cost a server pays for a fleet of new clients). */
static SSL_CTX *tls_client(const opts_t *o) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) return NULL;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    static const unsigned char alpn[] = "\x08http/1.1";
    SSL_CTX_set_alpn_protos(ctx, alpn, sizeof alpn - 1);
    if (o->ca) {
        if (SSL_CTX_load_verify_locations(ctx, o->ca, NULL) != 1) {
            fprintf(stderr, "chat-bench: cannot read the CA file %s\n", o->ca);
            SSL_CTX_free(ctx);
            return NULL;
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    }
    return ctx;
}

/* Enough source addresses that no one of them runs out of ephemeral ports. */
static unsigned auto_sources(unsigned n) {
    unsigned lo = 32768, hi = 60999;
    FILE *f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");
    if (f) {
        if (fscanf(f, "%u %u", &lo, &hi) != 2) lo = 32768, hi = 60999;
        fclose(f);
    }
    unsigned per = hi > lo ? (hi - lo + 1) * 9 / 10 : 1;
    unsigned k = (n + per - 1) / per;
    return k < 1 ? 1 : k > 254 ? 254 : k;
}

static int raise_fd_limit(unsigned need) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0) return -1;
    if (rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        (void)setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    if (rl.rlim_cur < need) {
        fprintf(stderr,
                "chat-bench: %u connections need %u file descriptors but the limit is %llu: "
                "raise it first (ulimit -n %u, as root for a higher hard limit)\n",
                need - 64, need, (unsigned long long)rl.rlim_cur, need);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    bench_t *b = calloc(1, sizeof *b);
    if (!b) return 2;
    opts_t *o = &b->o;
    *o = (opts_t){.host = "127.0.0.1",
                  .port = 8000,
                  .ports = {8000},
                  .n_ports = 1,
                  .target = "chatd",
                  .connections = 100,
                  .chats = 10,
                  .publishers = 10,
                  .rate = 10,
                  .window = 16,
                  .size = 100,
                  .duration = 10,
                  .warmup = 2,
                  .drain = 5,
                  .connect_inflight = 512,
                  .connect_timeout = 30,
                  .hold = 5};
    int rc = parse_opts(argc, argv, o);
    if (rc == 1) {
        free(b);
        return self_test();
    }
    if (rc < 0 || check_opts(o) < 0) {
        free(b);
        return 2;
    }
    int status = 2;
    if (strcmp(o->target, "chatd") == 0) b->proto = &proto_chatd;
    else if (strcmp(o->target, "centrifugo") == 0) b->proto = &proto_centrifugo;
    else {
        fprintf(stderr, "chat-bench: unknown --target %s (chatd, centrifugo)\n", o->target);
        goto out;
    }
    for (unsigned i = 0; i < o->n_ports; i++)
        if (uv_ip4_addr(o->host, o->ports[i], &b->addr[i]) < 0) {
            fprintf(stderr, "chat-bench: --host must be an IPv4 address: %s\n", o->host);
            goto out;
        }
    bool loopback = (ntohl(b->addr[0].sin_addr.s_addr) >> 24) == 127;
    b->sources = o->sources_set ? o->sources : loopback ? auto_sources(o->connections) : 0;
    if (b->sources && !loopback) {
        fprintf(stderr, "chat-bench: --sources binds 127.0.0.x, which cannot reach %s\n", o->host);
        goto out;
    }
    if (raise_fd_limit(o->connections + 64) < 0) goto out;
    if (o->tls && !(b->tls = tls_client(o))) goto out;

    b->conns = calloc(o->connections, sizeof *b->conns);
    b->members = calloc(o->chats, sizeof *b->members);
    b->rbuf = malloc(RBUF_SIZE);
    if (!b->conns || !b->members || !b->rbuf) {
        fprintf(stderr, "chat-bench: out of memory\n");
        goto out;
    }
    b->rng = now_ns() ^ ((uint64_t)getpid() << 32) ^ 0x2545F4914F6CDD1Dull;
    b->key_nonce = xorshift(&b->rng);
    for (uint32_t i = 0; i < o->connections; i++) {
        bconn_t *c = &b->conns[i];
        c->b = b;
        c->idx = i;
        c->chat = i % o->chats;
        c->publisher = i < o->publishers;
        c->next_id = 3;
        if (c->publisher && b->proto->ack_by_reply) {
            c->ring = calloc(ACK_RING, sizeof *c->ring);
            if (!c->ring) {
                fprintf(stderr, "chat-bench: out of memory\n");
                goto out;
            }
        }
    }
    b->t_meas_start = UINT64_MAX;
    b->t_meas_end = UINT64_MAX;
    if (o->deflate && !(b->zip = ws_zip_new())) {
        fprintf(stderr, "chat-bench: out of memory\n");
        goto out;
    }

    b->loop = uv_default_loop();
    uv_prepare_init(b->loop, &b->flusher);
    b->flusher.data = b;
    uv_prepare_start(&b->flusher, on_prepare);
    uv_timer_init(b->loop, &b->tick);
    b->tick.data = b;
    uv_timer_init(b->loop, &b->phase_timer);
    b->phase_timer.data = b;
    uv_timer_init(b->loop, &b->progress_timer);
    b->progress_timer.data = b;
    uv_signal_init(b->loop, &b->sigint);
    b->sigint.data = b;
    uv_signal_start(&b->sigint, on_sigint, SIGINT);

    if (!o->json_only)
        fprintf(stderr,
                "chat-bench: %s at %s:%d: %u connections (%u source addresses), %u chats, "
                "%u publishers, %s\n",
                b->proto->name, o->host, o->port, o->connections, b->sources, o->chats,
                o->publishers,
                o->idle       ? "idle"
                : o->rate > 0 ? "fixed rate"
                              : "windowed");
    getrusage(RUSAGE_SELF, &b->ru_start);
    b->srv_start = proc_sample(o);
    b->host_start = host_sample();
    if (o->n_pids && !b->srv_start.ok)
        fprintf(stderr, "chat-bench: cannot read /proc of --server-pid: no server samples\n");
    b->t0 = b->t_last_progress = b->t_last_connect_progress = now_ns();
    b->phase = PH_CONNECT;
    uv_timer_start(&b->tick, on_tick, 1, 1);
    uv_timer_start(&b->progress_timer, on_progress, 1000, 1000);
    connect_more(b);
    uv_run(b->loop, UV_RUN_DEFAULT);
    report(b);
    status = 0;
    uv_loop_close(b->loop);

out:
    if (b->conns)
        for (uint32_t i = 0; i < o->connections; i++) free(b->conns[i].ring);
    free(b->conns);
    ws_zip_free(b->zip);
    free(b->members);
    free(b->rbuf);
    SSL_CTX_free(b->tls);
    free(b->errors.v);
    free(b->closes.v);
    sbuf_free(&b->scratch);
    free(b);
    return status;
}
