/* cql client: a pool of native-protocol connections to a Cassandra cluster, on one loop.
 *
 * The one idea: a request is always in exactly one place, and that place says who will
 * finish it. It waits in the client's pending queue (no connection can take it yet), or on
 * a connection waiting for its statement to be prepared there, or in flight on a stream id,
 * or in the deferred list (already failed, its callback due on the next loop turn). Every
 * request is also on one deadline list, ordered by deadline, watched by one timer. When a
 * connection dies, what was never sent goes back to be routed elsewhere and only what was
 * in flight fails: the server may or may not have applied it, and only the caller knows if a
 * retry is safe.
 *
 * Streams: 0 is the setup conversation (OPTIONS, STARTUP, AUTH_RESPONSE, USE); 1..max are
 * requests. A request that times out leaves its stream reserved ("orphaned") until the late
 * answer arrives, so an answer can never be matched to the wrong request.
 *
 * Output is corked like the server's connections: frames queued during a loop turn go out
 * in one write per connection from a check handle at the end of the turn.
 */
#include "cql_internal.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_PORT "9042"
#define READ_CHUNK 65536
#define SETUP_STREAM 0
#define SCHEMA_RETRY_MS 200

typedef struct cql_req cql_req_t;
typedef struct cq_conn cq_conn_t;
typedef struct host host_t;

enum req_kind { RK_QUERY, RK_EXECUTE, RK_PREPARE, RK_BATCH };
enum req_where { W_NONE, W_PENDING, W_WAIT_PREP, W_FLIGHT, W_DEFERRED, W_AGREE };

typedef struct rlist {
    cql_req_t *head, *tail;
} rlist_t;

struct cql_stmt {
    char *query;
    unsigned idx;
    cql_stmt_t *next;
};

struct cql_req {
    cql_client_t *c;
    int kind;
    int where;
    cql_stmt_t *stmt;  /* EXECUTE, PREPARE, BATCH */
    char *query;       /* QUERY: our copy */
    sbuf_t params;     /* QUERY, EXECUTE: the encoded <query_parameters>; BATCH: the values
                         of each statement, then the batch's tail */
    size_t *batch_off; /* BATCH: n_batch + 1 offsets into params (the last: the tail) */
    size_t n_batch;
    uint8_t batch_type;
    cql_cb cb;
    void *data;
    cq_conn_t *conn; /* W_WAIT_PREP, W_FLIGHT; PREPARE: the connection it prepares for */
    int16_t stream;
    bool reprepared;
    bool internal; /* schema agreement probes: not counted in the caller's stats */
    uint64_t deadline, sent_at;
    unsigned timeout_ms;
    cql_req_t *tprev, *tnext; /* the deadline list */
    cql_req_t *qprev, *qnext; /* pending, waiters, deferred or agreement list */
    /* a failure waiting to be delivered (W_DEFERRED), or the saved Schema_change answer */
    int status, error_code;
    char *message;
    char *host;
    uint8_t *saved; /* header + body of a Schema_change result, replayed after agreement */
    size_t saved_len;
    uint64_t agree_deadline;
};

enum conn_state {
    CS_RESOLVING,
    CS_CONNECTING,
    CS_OPTIONS,
    CS_STARTUP,
    CS_AUTH,
    CS_USE,
    CS_READY,
    CS_CLOSED
};

typedef struct prep {
    uint8_t *id;
    uint16_t id_len;
    enum { PREP_NONE, PREP_PENDING, PREP_READY } state;
    rlist_t waiters;
} prep_t;

struct cq_conn {
    cql_client_t *c;
    host_t *host;
    int state;
    int handles; /* libuv handles and requests still to come back before the free */
    uv_getaddrinfo_t gai;
    uv_connect_t creq;
    uv_tcp_t tcp;
    uv_timer_t setup_timer;
    bool tcp_open, timer_open, gai_active;
    /* output */
    sbuf_t out, wbuf;
    bool writing;
    uv_write_t wreq;
    cq_conn_t *dprev, *dnext; /* the client's dirty list */
    bool dirty;
    /* input */
    uint8_t *rbuf;
    size_t rlen, rcap;
    /* streams 1..max_streams */
    cql_req_t **streams;
    int16_t *free_ids;
    unsigned n_free;
    unsigned load; /* streams in use (orphans included) + waiters */
    prep_t *preps;
    unsigned n_preps;
    uint64_t last_read;
};

struct host {
    cql_client_t *c;
    char *name; /* "addr:port" for messages */
    char *addr;
    char port[8];
    cq_conn_t **conns;
    uv_timer_t reconnect;
    unsigned backoff_ms;
    unsigned n_ready, n_setup;
    char last_err[256];
};

static cql_req_t ORPHAN_; /* the marker of a stream whose request timed out */
#define ORPHAN (&ORPHAN_)

struct cql_client {
    uv_loop_t *loop;
    cql_client_opts_t o;
    char *keyspace, *user, *password;
    host_t *hosts;
    size_t n_hosts;
    size_t rr; /* round robin over hosts */
    cql_stmt_t *stmts, **stmts_tail;
    unsigned n_stmts;
    rlist_t pending, deferred, agree, agree_checking;
    cql_req_t *thead, *ttail; /* deadline list */
    uv_timer_t timer;         /* fires at the earliest deadline */
    uint64_t timer_at;
    uv_timer_t agree_timer;
    bool agree_running;
    int agree_left, agree_status;
    char *agree_version; /* the first schema version seen in this round */
    bool agree_mismatch;
    uv_check_t flusher;
    uv_idle_t kick;
    cq_conn_t *dirty;
    int handles;      /* the client's own handles not yet closed */
    unsigned n_conns; /* connection objects not yet freed (closing ones included) */
    bool closing;
    void (*done)(void *);
    void *done_arg;
    cql_cb on_ready;
    void *on_ready_data;
    bool ready_reported;
    char last_err[300];
    int last_status;
    cql_client_stats_t stats;
};

static void cc_fail(cq_conn_t *k, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void cc_start(cql_client_t *c, host_t *h, unsigned slot);
static void dispatch(cql_client_t *c, cql_req_t *r);
static void drain_pending(cql_client_t *c);
static void req_finish(cql_req_t *r, int status, int code, const char *msg,
                       const cql_response_t *resp, const char *host);
static void agree_start(cql_client_t *c);
static void maybe_free_client(cql_client_t *c);

/* ---- small lists ----------------------------------------------------------------------- */

static void rl_push(rlist_t *l, cql_req_t *r) {
    r->qnext = NULL;
    r->qprev = l->tail;
    if (l->tail) {
        l->tail->qnext = r;
    } else {
        l->head = r;
    }
    l->tail = r;
}

static void rl_remove(rlist_t *l, cql_req_t *r) {
    if (r->qprev) {
        r->qprev->qnext = r->qnext;
    } else {
        l->head = r->qnext;
    }
    if (r->qnext) {
        r->qnext->qprev = r->qprev;
    } else {
        l->tail = r->qprev;
    }
    r->qprev = r->qnext = NULL;
}

static cql_req_t *rl_pop(rlist_t *l) {
    cql_req_t *r = l->head;
    if (r) rl_remove(l, r);
    return r;
}

/* ---- deadlines ---------------------------------------------------------------------------- */

static void on_timer(uv_timer_t *t);

static void arm_timer(cql_client_t *c) {
    if (c->closing) return;
    if (!c->thead) {
        uv_timer_stop(&c->timer);
        c->timer_at = 0;
        return;
    }
    if (c->timer_at && c->timer_at <= c->thead->deadline) return;
    uint64_t now = uv_now(c->loop);
    uint64_t at = c->thead->deadline;
    uv_timer_start(&c->timer, on_timer, at > now ? at - now : 0, 0);
    c->timer_at = at;
}

/* Sorted insert from the tail: with one timeout for everything, O(1). */
static void deadline_add(cql_client_t *c, cql_req_t *r) {
    cql_req_t *p = c->ttail;
    while (p && p->deadline > r->deadline) p = p->tprev;
    r->tprev = p;
    r->tnext = p ? p->tnext : c->thead;
    if (r->tnext) {
        r->tnext->tprev = r;
    } else {
        c->ttail = r;
    }
    if (p) {
        p->tnext = r;
    } else {
        c->thead = r;
    }
    arm_timer(c);
}

static void deadline_remove(cql_client_t *c, cql_req_t *r) {
    if (r->tprev) {
        r->tprev->tnext = r->tnext;
    } else if (c->thead == r) {
        c->thead = r->tnext;
    } else {
        return; /* not on the list */
    }
    if (r->tnext) {
        r->tnext->tprev = r->tprev;
    } else {
        c->ttail = r->tprev;
    }
    r->tprev = r->tnext = NULL;
}

/* ---- requests ------------------------------------------------------------------------------ */

static void req_free(cql_req_t *r) {
    free(r->query);
    free(r->batch_off);
    sbuf_free(&r->params);
    free(r->message);
    free(r->host);
    free(r->saved);
    free(r);
}

/* The idle handle only keeps the loop's poll from blocking while the check handle has
 * work (frames to write, failures to deliver); it does nothing itself. */
static void on_kick(uv_idle_t *h) { (void)h; }

static void kick(cql_client_t *c) {
    if (!c->closing && !uv_is_active((uv_handle_t *)&c->kick)) uv_idle_start(&c->kick, on_kick);
}

static char *dup_str(const char *s) { return s ? strdup(s) : NULL; }

/* Fail later: the callback runs on the next loop turn, never inside the caller's call. */
static void defer_fail(cql_client_t *c, cql_req_t *r, int status, const char *msg) {
    r->status = status;
    r->error_code = -1;
    free(r->message);
    r->message = dup_str(msg);
    r->where = W_DEFERRED;
    rl_push(&c->deferred, r);
    kick(c);
}

/* Complete a request that is on no queue any more (its stream, if any, is released). */
static void req_finish(cql_req_t *r, int status, int code, const char *msg,
                       const cql_response_t *resp, const char *host) {
    cql_client_t *c = r->c;
    deadline_remove(c, r);
    r->where = W_NONE;
    if (!r->internal) {
        if (status) c->stats.errors++;
    }
    if (r->cb) {
        cql_result_t res = {
            .status = status,
            .error_code = code,
            .message = status ? (msg ? msg : chat_strerror(status)) : NULL,
            .resp = status ? NULL : resp,
            .host = host,
        };
        r->cb(&res, r->data);
    }
    req_free(r);
}

static cql_req_t *req_new(cql_client_t *c, int kind, const cql_params_t *p, cql_cb cb, void *data) {
    cql_req_t *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->c = c;
    r->kind = kind;
    r->cb = cb;
    r->data = data;
    r->error_code = -1;
    r->timeout_ms = p && p->timeout_ms ? p->timeout_ms : c->o.request_timeout_ms;
    r->deadline = uv_now(c->loop) + r->timeout_ms;
    return r;
}

/* ---- connections: output --------------------------------------------------------------------- */

static void mark_dirty(cq_conn_t *k) {
    cql_client_t *c = k->c;
    if (k->dirty) return;
    k->dirty = true;
    k->dprev = NULL;
    k->dnext = c->dirty;
    if (c->dirty) c->dirty->dprev = k;
    c->dirty = k;
    kick(c);
}

static void unmark_dirty(cq_conn_t *k) {
    if (!k->dirty) return;
    if (k->dprev) {
        k->dprev->dnext = k->dnext;
    } else {
        k->c->dirty = k->dnext;
    }
    if (k->dnext) k->dnext->dprev = k->dprev;
    k->dirty = false;
    k->dprev = k->dnext = NULL;
}

static void on_written(uv_write_t *w, int status);
static void maybe_free_conn(cq_conn_t *k);

static void cc_flush(cq_conn_t *k) {
    if (k->writing || k->state == CS_CLOSED || !k->out.len) return;
    sbuf_t t = k->wbuf;
    k->wbuf = k->out;
    k->out = t;
    k->out.len = 0;
    uv_buf_t b = uv_buf_init(k->wbuf.p, (unsigned)k->wbuf.len);
    int rc = uv_write(&k->wreq, (uv_stream_t *)&k->tcp, &b, 1, on_written);
    if (rc < 0) {
        cc_fail(k, CHAT_EIO, "write failed: %s", uv_strerror(rc));
        return;
    }
    k->writing = true;
    k->handles++;
}

static void on_written(uv_write_t *w, int status) {
    cq_conn_t *k = w->handle->data;
    k->writing = false;
    k->handles--;
    k->wbuf.len = 0;
    if (k->state == CS_CLOSED) {
        maybe_free_conn(k);
        return;
    }
    if (status < 0) {
        cc_fail(k, CHAT_EIO, "write failed: %s", uv_strerror(status));
        return;
    }
    if (k->out.len) mark_dirty(k);
}

/* The frame of r on stream s into k->out. false: out of memory (nothing appended). */
static bool encode_req(cq_conn_t *k, cql_req_t *r, int16_t s) {
    sbuf_t *sb = &k->out;
    size_t at = sb->len; /* where the frame starts, whichever way it is written */
    int rc;
    if (r->kind == RK_PREPARE) {
        rc = cql_encode_prepare(sb, s, r->stmt->query);
    } else if (r->kind == RK_BATCH) {
        /* the prepared id is this connection's: it goes between the encoded values */
        prep_t *pp = &k->preps[r->stmt->idx];
        cql__frame_begin(sb, s, CQL_OP_BATCH);
        uint8_t head[3] = {r->batch_type, (uint8_t)(r->n_batch >> 8), (uint8_t)r->n_batch};
        sbuf_put(sb, head, sizeof head);
        for (size_t i = 0; i < r->n_batch; i++) {
            uint8_t kind = 1;
            sbuf_put(sb, &kind, 1);
            cql__put_short_bytes(sb, pp->id, pp->id_len);
            sbuf_put(sb, r->params.p + r->batch_off[i], r->batch_off[i + 1] - r->batch_off[i]);
        }
        sbuf_put(sb, r->params.p + r->batch_off[r->n_batch],
                 r->params.len - r->batch_off[r->n_batch]);
        rc = cql__frame_end(sb, at);
    } else {
        if (r->kind == RK_EXECUTE) {
            prep_t *pp = &k->preps[r->stmt->idx];
            cql__frame_begin(sb, s, CQL_OP_EXECUTE);
            cql__put_short_bytes(sb, pp->id, pp->id_len);
        } else {
            cql__frame_begin(sb, s, CQL_OP_QUERY);
            cql__put_long_string(sb, r->query, strlen(r->query));
        }
        sbuf_put(sb, r->params.p, r->params.len);
        rc = cql__frame_end(sb, at);
    }
    if (rc != 0 || sb->oom) {
        sb->oom = false;
        sb->len = at;
        return false;
    }
    return true;
}

/* Put r on a free stream of k (the caller made sure there is one). */
static bool send_on(cq_conn_t *k, cql_req_t *r) {
    int16_t s = k->free_ids[k->n_free - 1];
    if (!encode_req(k, r, s)) return false;
    k->n_free--;
    k->streams[s] = r;
    r->where = W_FLIGHT;
    r->conn = k;
    r->stream = s;
    r->sent_at = uv_now(k->c->loop);
    mark_dirty(k);
    return true;
}

static void stream_release(cq_conn_t *k, int16_t s) {
    k->streams[s] = NULL;
    k->free_ids[k->n_free++] = s;
    k->load--;
}

/* ---- prepared statements per connection ------------------------------------------------------ */

static prep_t *cc_prep(cq_conn_t *k, cql_stmt_t *st) {
    if (st->idx >= k->n_preps) {
        unsigned n = k->c->n_stmts > st->idx ? k->c->n_stmts : st->idx + 1;
        prep_t *p = realloc(k->preps, n * sizeof *p);
        if (!p) return NULL;
        memset(p + k->n_preps, 0, (n - k->n_preps) * sizeof *p);
        k->preps = p;
        k->n_preps = n;
    }
    return &k->preps[st->idx];
}

/* Route r onto k: k has room for it (and for a PREPARE if the statement needs one). */
static bool needs_prep(const cql_req_t *r) { return r->kind == RK_EXECUTE || r->kind == RK_BATCH; }

static bool cc_take(cq_conn_t *k, cql_req_t *r) {
    if (!needs_prep(r)) {
        if (!send_on(k, r)) return false;
        k->load++;
        return true;
    }
    prep_t *pp = cc_prep(k, r->stmt);
    if (!pp) return false;
    if (pp->state == PREP_READY) {
        if (!send_on(k, r)) return false;
        k->load++;
        return true;
    }
    if (pp->state == PREP_NONE) {
        cql_req_t *pr = req_new(k->c, RK_PREPARE, NULL, NULL, NULL);
        if (!pr) return false;
        pr->stmt = r->stmt;
        pr->internal = true;
        if (!send_on(k, pr)) {
            req_free(pr);
            return false;
        }
        k->load++;
        pr->conn = k;
        deadline_add(k->c, pr);
        pp->state = PREP_PENDING;
    }
    r->where = W_WAIT_PREP;
    r->conn = k;
    rl_push(&pp->waiters, r);
    k->load++;
    return true;
}

static bool cc_has_room(const cq_conn_t *k, const cql_req_t *r) {
    unsigned cost = 1;
    if (needs_prep(r) &&
        (r->stmt->idx >= k->n_preps || k->preps[r->stmt->idx].state == PREP_NONE)) {
        cost = 2;
    }
    return k->state == CS_READY && k->load + cost <= k->c->o.max_streams && k->n_free >= cost;
}

/* Pick the least loaded ready connection of the next host that has one. */
static bool try_send(cql_client_t *c, cql_req_t *r) {
    for (size_t i = 0; i < c->n_hosts; i++) {
        host_t *h = &c->hosts[(c->rr + i) % c->n_hosts];
        if (!h->n_ready) continue;
        cq_conn_t *best = NULL;
        for (unsigned j = 0; j < c->o.conns_per_host; j++) {
            cq_conn_t *k = h->conns[j];
            if (k && cc_has_room(k, r) && (!best || k->load < best->load)) best = k;
        }
        if (best && cc_take(best, r)) {
            c->rr = (c->rr + i + 1) % c->n_hosts;
            return true;
        }
    }
    return false;
}

static unsigned conns_ready(const cql_client_t *c) {
    unsigned n = 0;
    for (size_t i = 0; i < c->n_hosts; i++) n += c->hosts[i].n_ready;
    return n;
}

static unsigned conns_in_setup(const cql_client_t *c) {
    unsigned n = 0;
    for (size_t i = 0; i < c->n_hosts; i++) n += c->hosts[i].n_setup;
    return n;
}

static void no_host_message(cql_client_t *c, char *out, size_t n) {
    snprintf(out, n, "no Cassandra host available (%zu configured); last error: %s", c->n_hosts,
             c->last_err[0] ? c->last_err : "none yet");
}

static void dispatch(cql_client_t *c, cql_req_t *r) {
    if (try_send(c, r)) return;
    if (conns_ready(c) || conns_in_setup(c)) {
        r->where = W_PENDING;
        rl_push(&c->pending, r);
        return;
    }
    char msg[400];
    no_host_message(c, msg, sizeof msg);
    defer_fail(c, r, c->last_status ? c->last_status : CHAT_EIO, msg);
}

static void drain_pending(cql_client_t *c) {
    while (c->pending.head && !c->closing) {
        cql_req_t *r = c->pending.head;
        rl_remove(&c->pending, r);
        r->where = W_NONE;
        if (!try_send(c, r)) {
            /* no room anywhere: back to the front, in order */
            r->where = W_PENDING;
            r->qprev = NULL;
            r->qnext = c->pending.head;
            if (c->pending.head) {
                c->pending.head->qprev = r;
            } else {
                c->pending.tail = r;
            }
            c->pending.head = r;
            return;
        }
    }
}

/* Nothing can take requests now or soon: fail what waits. */
static void fail_pending_if_hopeless(cql_client_t *c) {
    if (conns_ready(c) || conns_in_setup(c) || !c->pending.head) return;
    char msg[400];
    no_host_message(c, msg, sizeof msg);
    rlist_t l = c->pending;
    c->pending = (rlist_t){0};
    cql_req_t *r;
    while ((r = rl_pop(&l)))
        req_finish(r, c->last_status ? c->last_status : CHAT_EIO, -1, msg, NULL, NULL);
}

/* ---- connections: lifecycle ------------------------------------------------------------------ */

static void maybe_free_conn(cq_conn_t *k) {
    if (k->handles > 0) return;
    for (unsigned i = 0; i < k->n_preps; i++) free(k->preps[i].id);
    free(k->preps);
    free(k->streams);
    free(k->free_ids);
    free(k->rbuf);
    sbuf_free(&k->out);
    sbuf_free(&k->wbuf);
    cql_client_t *c = k->c;
    free(k);
    c->n_conns--;
    maybe_free_client(c);
}

static void on_conn_handle_closed(uv_handle_t *h) {
    cq_conn_t *k = h->data;
    k->handles--;
    maybe_free_conn(k);
}

static void report_ready(cql_client_t *c, int status, const char *msg, const char *host) {
    if (c->ready_reported || !c->on_ready) return;
    c->ready_reported = true;
    cql_result_t res = {.status = status, .error_code = -1, .message = msg, .host = host};
    c->on_ready(&res, c->on_ready_data);
}

static void schedule_reconnect(host_t *h, bool after_failure);

/* Close k: requests never sent go back to routing, those in flight fail. */
static void cc_close(cq_conn_t *k, int status, const char *why) {
    if (k->state == CS_CLOSED) return;
    cql_client_t *c = k->c;
    host_t *h = k->host;
    bool was_ready = k->state == CS_READY;
    k->state = CS_CLOSED;
    unmark_dirty(k);
    for (unsigned j = 0; j < c->o.conns_per_host; j++) {
        if (h->conns[j] == k) h->conns[j] = NULL;
    }
    if (was_ready) {
        h->n_ready--;
    } else {
        h->n_setup--;
    }
    snprintf(h->last_err, sizeof h->last_err, "%s: %s", h->name, why);
    snprintf(c->last_err, sizeof c->last_err, "%s", h->last_err);
    c->last_status = status;
    if (!was_ready && !c->closing) c->stats.connect_failures++;
    if (c->closing) {
        /* expected: nothing to report */
    } else if (was_ready) {
        log_warn("cql_conn_lost host=%s err=%s", LOG_STR(h->name), LOG_STR(why));
    } else {
        log_debug("cql_conn_failed host=%s err=%s", LOG_STR(h->name), LOG_STR(why));
    }

    if (k->gai_active) uv_cancel((uv_req_t *)&k->gai);
    if (k->timer_open) uv_close((uv_handle_t *)&k->setup_timer, on_conn_handle_closed);
    if (k->tcp_open) uv_close((uv_handle_t *)&k->tcp, on_conn_handle_closed);

    /* waiters were never sent: route them again */
    rlist_t again = {0};
    for (unsigned i = 0; i < k->n_preps; i++) {
        cql_req_t *r;
        while ((r = rl_pop(&k->preps[i].waiters))) rl_push(&again, r);
    }
    /* in flight: fail (the PREPAREs among them now have no waiters) */
    char msg[400];
    snprintf(msg, sizeof msg, "connection to %s lost: %s", h->name, why);
    for (unsigned s = 1; s <= c->o.max_streams && k->streams; s++) {
        cql_req_t *r = k->streams[s];
        if (!r) continue;
        k->streams[s] = NULL;
        if (r == ORPHAN) continue;
        req_finish(r, status == CHAT_ECLOSED ? CHAT_ECLOSED : CHAT_EIO, -1,
                   status == CHAT_ECLOSED ? "client closed" : msg, NULL, h->name);
    }
    k->load = 0;
    cql_req_t *r;
    while ((r = rl_pop(&again))) {
        r->where = W_NONE;
        r->conn = NULL;
        if (c->closing) {
            req_finish(r, CHAT_ECLOSED, -1, "client closed", NULL, NULL);
        } else {
            dispatch(c, r);
        }
    }
    if (!c->closing) {
        schedule_reconnect(h, !was_ready);
        fail_pending_if_hopeless(c);
        if (!conns_ready(c) && !conns_in_setup(c)) {
            char m[400];
            no_host_message(c, m, sizeof m);
            report_ready(c, status, m, NULL);
        }
    }
    maybe_free_conn(k);
}

static void cc_fail(cq_conn_t *k, int status, const char *fmt, ...) {
    char why[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    if (status != CHAT_EAUTH) status = CHAT_EIO;
    cc_close(k, status, why);
}

/* Restart every empty slot of the host. */
static void on_reconnect(uv_timer_t *t) {
    host_t *h = t->data;
    for (unsigned j = 0; j < h->c->o.conns_per_host; j++) {
        if (!h->conns[j]) cc_start(h->c, h, j);
    }
}

/* After a failed attempt wait the host's backoff and double it; after losing a connection
 * that worked, try again soon (a restart of the node, a dropped socket). */
static void schedule_reconnect(host_t *h, bool after_failure) {
    cql_client_t *owner = h->c;
    unsigned delay = h->backoff_ms;
    if (after_failure) {
        unsigned next = h->backoff_ms * 2;
        h->backoff_ms = next > owner->o.reconnect_max_ms ? owner->o.reconnect_max_ms : next;
    } else {
        delay = owner->o.reconnect_min_ms;
    }
    if (!uv_is_active((uv_handle_t *)&h->reconnect)) {
        uv_timer_start(&h->reconnect, on_reconnect, delay, 0);
    }
}

static void cc_ready(cq_conn_t *k) {
    cql_client_t *c = k->c;
    host_t *h = k->host;
    k->state = CS_READY;
    h->n_setup--;
    h->n_ready++;
    h->backoff_ms = c->o.reconnect_min_ms;
    uv_timer_stop(&k->setup_timer);
    c->stats.connects++;
    log_info("cql_conn_ready host=%s ready=%u", h->name, h->n_ready);
    report_ready(c, 0, NULL, h->name);
    drain_pending(c);
}

static void setup_send(cq_conn_t *k, int rc) {
    if (rc || k->out.oom) {
        k->out.oom = false;
        cc_fail(k, CHAT_EIO, "cannot encode a setup frame");
        return;
    }
    mark_dirty(k);
}

static void send_startup(cq_conn_t *k) {
    static const char *const kv[] = {"CQL_VERSION", "3.0.0", NULL};
    k->state = CS_STARTUP;
    setup_send(k, cql_encode_startup(&k->out, SETUP_STREAM, kv));
}

static void send_use_or_ready(cq_conn_t *k) {
    cql_client_t *c = k->c;
    if (!c->keyspace) {
        cc_ready(k);
        return;
    }
    k->state = CS_USE;
    char q[160];
    snprintf(q, sizeof q, "USE \"%s\"", c->keyspace);
    setup_send(k, cql_encode_query(&k->out, SETUP_STREAM, q, NULL, 0, NULL, CQL_ONE, CQL_SERIAL));
}

static void setup_error(cq_conn_t *k, const cql_response_t *resp, const char *during) {
    char msg[512];
    cql_error_format(resp, msg, sizeof msg);
    int status = CHAT_EIO;
    if (resp->error.code == CQL_ERR_AUTH) status = CHAT_EAUTH;
    cc_fail(k, status, "%s: %s", during, msg);
}

/* The setup conversation on stream 0. */
static void setup_frame(cq_conn_t *k, const cql_response_t *resp) {
    cql_client_t *c = k->c;
    int op = resp->hdr.opcode;
    switch (k->state) {
    case CS_OPTIONS:
        if (op == CQL_OP_ERROR) return setup_error(k, resp, "OPTIONS");
        if (op != CQL_OP_SUPPORTED) break;
        for (uint16_t i = 0; i < resp->n_supported; i++) {
            const cql_kvs_t *kv = &resp->supported[i];
            if (kv->key.n == 11 && memcmp(kv->key.p, "CQL_VERSION", 11) == 0 && kv->n_vals) {
                log_debug("cql_supported host=%s cql_version=%.*s", k->host->name,
                          (int)kv->vals[0].n, kv->vals[0].p);
            }
        }
        send_startup(k);
        return;
    case CS_STARTUP:
        if (op == CQL_OP_ERROR) return setup_error(k, resp, "STARTUP");
        if (op == CQL_OP_READY) return send_use_or_ready(k);
        if (op != CQL_OP_AUTHENTICATE) break;
        if (!c->user) {
            cc_fail(k, CHAT_EAUTH,
                    "the server requires authentication (%.*s) but no user and password "
                    "were given",
                    (int)(resp->authenticator.n > 100 ? 100 : resp->authenticator.n),
                    resp->authenticator.p);
            return;
        }
        {
            /* SASL PLAIN: authzid (empty), NUL, user, NUL, password */
            size_t un = strlen(c->user), pn = strlen(c->password ? c->password : "");
            char *tok = malloc(un + pn + 2);
            if (!tok) {
                cc_fail(k, CHAT_EIO, "out of memory");
                return;
            }
            tok[0] = '\0';
            memcpy(tok + 1, c->user, un);
            tok[1 + un] = '\0';
            if (pn) memcpy(tok + 2 + un, c->password, pn);
            k->state = CS_AUTH;
            int rc = cql_encode_auth_response(&k->out, SETUP_STREAM, tok, un + pn + 2);
            memset(tok, 0, un + pn + 2);
            free(tok);
            setup_send(k, rc);
        }
        return;
    case CS_AUTH:
        if (op == CQL_OP_ERROR) {
            char msg[512];
            cql_error_format(resp, msg, sizeof msg);
            cc_fail(k, CHAT_EAUTH, "authentication failed for user \"%s\": %s", c->user, msg);
            return;
        }
        if (op == CQL_OP_AUTH_SUCCESS) return send_use_or_ready(k);
        if (op == CQL_OP_AUTH_CHALLENGE) {
            cc_fail(k, CHAT_EAUTH, "unexpected SASL challenge (only PLAIN is supported)");
            return;
        }
        break;
    case CS_USE:
        if (op == CQL_OP_ERROR) return setup_error(k, resp, "USE keyspace");
        if (op == CQL_OP_RESULT && resp->kind == CQL_RESULT_SET_KEYSPACE) return cc_ready(k);
        break;
    default: break;
    }
    cc_fail(k, CHAT_EIO, "unexpected opcode 0x%02x during connection setup", op);
}

/* ---- connections: input ------------------------------------------------------------------ */

static void prepare_done(cq_conn_t *k, cql_req_t *pr, int status, const char *msg,
                         const cql_response_t *resp) {
    prep_t *pp = cc_prep(k, pr->stmt);
    rlist_t w = {0};
    if (pp) {
        w = pp->waiters;
        pp->waiters = (rlist_t){0};
    }
    if (status == 0 && pp && resp->prepared.id.n > 0) {
        free(pp->id);
        pp->id = malloc((size_t)resp->prepared.id.n);
        if (pp->id) {
            memcpy(pp->id, resp->prepared.id.p, (size_t)resp->prepared.id.n);
            pp->id_len = (uint16_t)resp->prepared.id.n;
            pp->state = PREP_READY;
        } else {
            status = CHAT_ENOMEM;
            msg = "out of memory";
        }
    } else if (status == 0) {
        status = CHAT_EIO;
        msg = "PREPARE answered without an id";
    }
    if (status && pp) pp->state = PREP_NONE;
    char m[600];
    if (status) {
        snprintf(m, sizeof m, "preparing \"%.200s\": %s", pr->stmt->query, msg ? msg : "");
        log_warn("cql_prepare_failed host=%s err=%s", LOG_STR(k->host->name), LOG_STR(m));
    }
    cql_req_t *r;
    while ((r = rl_pop(&w))) {
        k->load--;
        r->where = W_NONE;
        if (status == 0 && k->state == CS_READY) {
            k->load++;
            if (send_on(k, r)) continue;
            k->load--;
            req_finish(r, CHAT_ENOMEM, -1, "out of memory", NULL, k->host->name);
        } else {
            req_finish(r, status ? status : CHAT_EIO, -1, status ? m : "connection closed", NULL,
                       k->host->name);
        }
    }
    req_finish(pr, status, -1, NULL, NULL, NULL);
}

static void agree_add(cql_client_t *c, cql_req_t *r, const cql_header_t *h, const uint8_t *body) {
    r->saved_len = CQL_HEADER_LEN + h->length;
    r->saved = malloc(r->saved_len);
    if (!r->saved) {
        req_finish(r, CHAT_ENOMEM, -1, "out of memory", NULL, NULL);
        return;
    }
    cql_header_encode(r->saved, h);
    memcpy(r->saved + CQL_HEADER_LEN, body, h->length);
    free(r->host);
    r->host = r->conn ? dup_str(r->conn->host->name) : NULL;
    r->where = W_AGREE;
    r->agree_deadline = uv_now(c->loop) + c->o.schema_agreement_ms;
    /* the request's own timeout no longer applies: agreement has its own */
    deadline_remove(c, r);
    rl_push(&c->agree, r);
    if (!c->agree_running && !uv_is_active((uv_handle_t *)&c->agree_timer)) agree_start(c);
}

/* One response for a request in flight. */
static void handle_response(cq_conn_t *k, cql_req_t *r, const cql_header_t *h,
                            const uint8_t *body) {
    cql_client_t *c = k->c;
    cql_response_t resp;
    int rc = cql_response_decode(&resp, h, body, h->length);
    if (rc) {
        char m[200];
        snprintf(m, sizeof m, "malformed response from %s (opcode 0x%02x, %u bytes)", k->host->name,
                 h->opcode, h->length);
        if (r->kind == RK_PREPARE) {
            prepare_done(k, r, CHAT_EIO, m, NULL);
        } else {
            req_finish(r, CHAT_EIO, -1, m, NULL, k->host->name);
        }
        return;
    }
    if (h->opcode == CQL_OP_ERROR) {
        char m[600];
        cql_error_format(&resp, m, sizeof m);
        int code = resp.error.code;
        if (needs_prep(r) && code == CQL_ERR_UNPREPARED && !r->reprepared) {
            /* the node forgot the statement (restarted, evicted): prepare again, once */
            c->stats.reprepares++;
            log_info("cql_reprepare host=%s query=\"%.80s\"", k->host->name, r->stmt->query);
            prep_t *pp = cc_prep(k, r->stmt);
            if (pp && pp->state == PREP_READY) {
                free(pp->id);
                pp->id = NULL;
                pp->state = PREP_NONE;
            }
            r->reprepared = true;
            r->where = W_NONE;
            cql_response_free(&resp);
            if (cc_has_room(k, r) && cc_take(k, r)) return;
            dispatch(c, r);
            return;
        }
        char full[700];
        snprintf(full, sizeof full, "%s [%s]", m, k->host->name);
        if (r->kind == RK_PREPARE) {
            prepare_done(k, r, CHAT_EIO, m, NULL);
        } else {
            req_finish(r, CHAT_EIO, code, full, NULL, k->host->name);
        }
        cql_response_free(&resp);
        return;
    }
    if (h->opcode != CQL_OP_RESULT) {
        char m[200];
        snprintf(m, sizeof m, "unexpected opcode 0x%02x from %s", h->opcode, k->host->name);
        if (r->kind == RK_PREPARE) {
            prepare_done(k, r, CHAT_EIO, m, NULL);
        } else {
            req_finish(r, CHAT_EIO, -1, m, NULL, k->host->name);
        }
        cql_response_free(&resp);
        return;
    }
    if (r->kind == RK_PREPARE) {
        if (resp.kind == CQL_RESULT_PREPARED) {
            prepare_done(k, r, 0, NULL, &resp);
        } else {
            prepare_done(k, r, CHAT_EIO, "PREPARE answered with another result kind", NULL);
        }
    } else if (resp.kind == CQL_RESULT_SCHEMA_CHANGE && !r->internal) {
        agree_add(c, r, h, body);
    } else {
        req_finish(r, 0, -1, NULL, &resp, k->host->name);
    }
    cql_response_free(&resp);
}

static void handle_frame(cq_conn_t *k, const cql_header_t *h, const uint8_t *body) {
    k->last_read = uv_now(k->c->loop);
    if (h->stream < 0) return; /* an EVENT: we never REGISTER, so nothing to do */
    if (k->state != CS_READY) {
        if (h->stream != SETUP_STREAM) return;
        cql_response_t resp;
        int rc = cql_response_decode(&resp, h, body, h->length);
        if (rc) {
            cc_fail(k, CHAT_EIO, "malformed setup response (opcode 0x%02x)", h->opcode);
            return;
        }
        setup_frame(k, &resp);
        cql_response_free(&resp);
        return;
    }
    if (h->stream == SETUP_STREAM || (unsigned)h->stream > k->c->o.max_streams) {
        log_warn("cql_unexpected_stream host=%s stream=%d", k->host->name, h->stream);
        return;
    }
    cql_req_t *r = k->streams[h->stream];
    if (!r) {
        log_warn("cql_unexpected_stream host=%s stream=%d", k->host->name, h->stream);
        return;
    }
    stream_release(k, h->stream);
    if (r == ORPHAN) return; /* its request timed out already */
    r->where = W_NONE;
    handle_response(k, r, h, body);
}

static void on_alloc(uv_handle_t *hd, size_t suggested, uv_buf_t *buf) {
    cq_conn_t *k = hd->data;
    if (k->rcap - k->rlen < READ_CHUNK) {
        size_t ncap = k->rcap ? k->rcap * 2 : READ_CHUNK * 2;
        while (ncap - k->rlen < READ_CHUNK) ncap *= 2;
        uint8_t *p = realloc(k->rbuf, ncap);
        if (!p) {
            *buf = uv_buf_init(NULL, 0);
            return;
        }
        k->rbuf = p;
        k->rcap = ncap;
    }
    *buf = uv_buf_init((char *)k->rbuf + k->rlen, (unsigned)(k->rcap - k->rlen));
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
    cq_conn_t *k = st->data;
    cql_client_t *c = k->c;
    if (k->state == CS_CLOSED) return;
    if (nread < 0) {
        cc_fail(k, CHAT_EIO, "%s",
                nread == UV_EOF ? "closed by the server" : uv_strerror((int)nread));
        return;
    }
    if (nread == 0) return;
    k->rlen += (size_t)nread;
    size_t off = 0;
    while (k->state != CS_CLOSED && !c->closing) {
        cql_header_t h;
        int rc = cql_header_decode(k->rbuf + off, k->rlen - off, &h);
        if (rc == CHAT_EAGAIN) break;
        if (rc) {
            cc_fail(k, CHAT_EIO, "%s in a response header (version byte 0x%02x)",
                    rc == CHAT_ETOOBIG ? "frame too big" : "protocol error", k->rbuf[off]);
            return;
        }
        size_t need = CQL_HEADER_LEN + (size_t)h.length;
        if (k->rlen - off < need) {
            if (need > k->rcap) {
                /* make room for the whole frame at the front of the buffer */
                memmove(k->rbuf, k->rbuf + off, k->rlen - off);
                k->rlen -= off;
                off = 0;
                uint8_t *p = realloc(k->rbuf, need + READ_CHUNK);
                if (!p) {
                    cc_fail(k, CHAT_EIO, "out of memory for a %zu-byte frame", need);
                    return;
                }
                k->rbuf = p;
                k->rcap = need + READ_CHUNK;
            }
            break;
        }
        const uint8_t *body = k->rbuf + off + CQL_HEADER_LEN;
        off += need;
        handle_frame(k, &h, body);
    }
    if (k->state == CS_CLOSED || c->closing) return;
    if (off) {
        memmove(k->rbuf, k->rbuf + off, k->rlen - off);
        k->rlen -= off;
    }
    /* give back a buffer that one huge page made huge */
    if (k->rlen == 0 && k->rcap > (4u << 20)) {
        free(k->rbuf);
        k->rbuf = NULL;
        k->rcap = 0;
    }
    drain_pending(c);
}

/* ---- connections: start ------------------------------------------------------------------ */

static void on_setup_timeout(uv_timer_t *t) {
    cq_conn_t *k = t->data;
    cc_fail(k, CHAT_EIO, "timed out after %u ms connecting", k->c->o.connect_timeout_ms);
}

static void on_connected(uv_connect_t *cr, int status) {
    cq_conn_t *k = cr->data;
    k->handles--;
    if (k->state == CS_CLOSED) {
        maybe_free_conn(k);
        return;
    }
    if (status < 0) {
        cc_fail(k, CHAT_EIO, "%s", uv_strerror(status));
        return;
    }
    uv_tcp_nodelay(&k->tcp, 1);
    uv_tcp_keepalive(&k->tcp, 1, 30);
    int rc = uv_read_start((uv_stream_t *)&k->tcp, on_alloc, on_read);
    if (rc < 0) {
        cc_fail(k, CHAT_EIO, "%s", uv_strerror(rc));
        return;
    }
    k->state = CS_OPTIONS;
    setup_send(k, cql_encode_options(&k->out, SETUP_STREAM));
}

static void on_resolved(uv_getaddrinfo_t *g, int status, struct addrinfo *res) {
    cq_conn_t *k = g->data;
    k->gai_active = false;
    k->handles--;
    if (k->state == CS_CLOSED) {
        uv_freeaddrinfo(res);
        maybe_free_conn(k);
        return;
    }
    if (status < 0 || !res) {
        uv_freeaddrinfo(res);
        cc_fail(k, CHAT_EIO, "cannot resolve %s: %s", k->host->addr,
                status < 0 ? uv_strerror(status) : "no address");
        return;
    }
    /* One address per attempt: IPv4 first when the name has both ("localhost" is often
     * ::1 first, and Cassandra listens where its yaml says, usually IPv4); the next attempt
     * resolves again anyway. */
    struct addrinfo *ai = res;
    for (struct addrinfo *p = res; p; p = p->ai_next) {
        if (p->ai_family == AF_INET) {
            ai = p;
            break;
        }
    }
    int rc = uv_tcp_init(k->c->loop, &k->tcp);
    if (rc == 0) {
        k->tcp.data = k;
        k->tcp_open = true;
        k->handles++;
        k->creq.data = k;
        rc = uv_tcp_connect(&k->creq, &k->tcp, ai->ai_addr, on_connected);
    }
    uv_freeaddrinfo(res);
    if (rc < 0) {
        cc_fail(k, CHAT_EIO, "connect: %s", uv_strerror(rc));
        return;
    }
    k->handles++;
    k->state = CS_CONNECTING;
}

static void cc_start(cql_client_t *c, host_t *h, unsigned slot) {
    if (c->closing) return;
    cq_conn_t *k = calloc(1, sizeof *k);
    unsigned max = c->o.max_streams;
    if (k) {
        k->streams = calloc(max + 1, sizeof *k->streams);
        k->free_ids = malloc(max * sizeof *k->free_ids);
    }
    if (!k || !k->streams || !k->free_ids) {
        if (k) {
            free(k->streams);
            free(k->free_ids);
            free(k);
        }
        snprintf(h->last_err, sizeof h->last_err, "%s: out of memory", h->name);
        if (!uv_is_active((uv_handle_t *)&h->reconnect)) {
            uv_timer_start(&h->reconnect, on_reconnect, c->o.reconnect_max_ms, 0);
        }
        return;
    }
    /* lowest ids handed out first: they are popped from the end */
    for (unsigned i = 0; i < max; i++) k->free_ids[i] = (int16_t)(max - i);
    k->n_free = max;
    k->c = c;
    k->host = h;
    k->state = CS_RESOLVING;
    c->n_conns++;
    h->conns[slot] = k;
    h->n_setup++;
    uv_timer_init(c->loop, &k->setup_timer);
    k->setup_timer.data = k;
    k->timer_open = true;
    k->handles++;
    uv_timer_start(&k->setup_timer, on_setup_timeout, c->o.connect_timeout_ms, 0);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    k->gai.data = k;
    int rc = uv_getaddrinfo(c->loop, &k->gai, on_resolved, h->addr, h->port, &hints);
    if (rc < 0) {
        cc_fail(k, CHAT_EIO, "cannot resolve %s: %s", h->addr, uv_strerror(rc));
        return;
    }
    k->gai_active = true;
    k->handles++;
}

/* ---- the flusher and the deadline timer ------------------------------------------------------ */

static void on_check(uv_check_t *ch) {
    cql_client_t *c = ch->data;
    if (c->closing) return;
    /* failures decided during the turn */
    rlist_t l = c->deferred;
    c->deferred = (rlist_t){0};
    cql_req_t *r;
    while ((r = rl_pop(&l))) {
        int st = r->status;
        char *m = r->message;
        r->message = NULL;
        req_finish(r, st, -1, m, NULL, NULL);
        free(m);
        if (c->closing) {
            /* close() failed everything else already; finish what we took off the list */
            while ((r = rl_pop(&l))) req_finish(r, CHAT_ECLOSED, -1, "client closed", NULL, NULL);
            return;
        }
    }
    while (c->dirty) {
        cq_conn_t *k = c->dirty;
        unmark_dirty(k);
        cc_flush(k);
    }
    if (!c->deferred.head && !c->dirty) uv_idle_stop(&c->kick);
}

static void on_timer(uv_timer_t *t) {
    cql_client_t *c = t->data;
    c->timer_at = 0;
    uint64_t now = uv_now(c->loop);
    while (c->thead && c->thead->deadline <= now && !c->closing) {
        cql_req_t *r = c->thead;
        deadline_remove(c, r);
        cq_conn_t *k = r->conn;
        char m[300];
        snprintf(m, sizeof m, "timed out after %u ms%s%s", r->timeout_ms,
                 r->where == W_FLIGHT ? " waiting for " : " waiting for a connection",
                 r->where == W_FLIGHT ? k->host->name : "");
        if (!r->internal) c->stats.timeouts++;
        bool defunct = false;
        switch (r->where) {
        case W_PENDING: rl_remove(&c->pending, r); break;
        case W_WAIT_PREP:
            rl_remove(&k->preps[r->stmt->idx].waiters, r);
            k->load--;
            break;
        case W_FLIGHT:
            /* keep the stream until its answer comes, so it is never matched to another */
            k->streams[r->stream] = ORPHAN;
            /* nothing at all heard since it was sent: the node is gone without a word */
            defunct = k->last_read < r->sent_at;
            break;
        case W_DEFERRED: rl_remove(&c->deferred, r); break;
        default: break;
        }
        r->where = W_NONE;
        if (r->kind == RK_PREPARE) {
            prepare_done(k, r, CHAT_EIO, m, NULL);
        } else {
            req_finish(r, CHAT_EIO, -1, m, NULL, k ? k->host->name : NULL);
        }
        if (defunct && k->state == CS_READY) {
            cc_fail(k, CHAT_EIO, "nothing received for %" PRIu64 " ms", now - k->last_read);
        }
    }
    arm_timer(c);
}

/* ---- schema agreement ------------------------------------------------------------------------ */

static void agree_deliver(cql_client_t *c, rlist_t *l, bool agreed) {
    cql_req_t *r;
    while ((r = rl_pop(l))) {
        r->where = W_NONE;
        cql_header_t h;
        cql_response_t resp;
        int rc = cql_header_decode(r->saved, r->saved_len, &h);
        if (rc == 0) rc = cql_response_decode(&resp, &h, r->saved + CQL_HEADER_LEN, h.length);
        if (rc) {
            req_finish(r, CHAT_EIO, -1, "cannot replay a schema change result", NULL, NULL);
            continue;
        }
        if (!agreed) {
            log_warn("cql_schema_agreement_timeout ms=%u", c->o.schema_agreement_ms);
        }
        char *host = r->host;
        r->host = NULL;
        req_finish(r, 0, -1, NULL, &resp, host);
        free(host);
        cql_response_free(&resp);
        if (c->closing) return;
    }
}

static void on_agree_timer(uv_timer_t *t) { agree_start(t->data); }

static void agree_round_done(cql_client_t *c) {
    c->agree_running = false;
    bool agreed = c->agree_status == 0 && !c->agree_mismatch && c->agree_version;
    free(c->agree_version);
    c->agree_version = NULL;
    if (c->closing) return;
    if (agreed) {
        rlist_t l = c->agree_checking;
        c->agree_checking = (rlist_t){0};
        agree_deliver(c, &l, true);
    } else {
        /* back with the others; those past their wait are delivered anyway */
        uint64_t now = uv_now(c->loop);
        cql_req_t *r;
        rlist_t late = {0};
        while ((r = rl_pop(&c->agree_checking))) {
            rl_push(r->agree_deadline <= now ? &late : &c->agree, r);
        }
        agree_deliver(c, &late, false);
    }
    if (c->closing) return;
    if (c->agree.head) {
        uv_timer_start(&c->agree_timer, on_agree_timer, agreed ? 0 : SCHEMA_RETRY_MS, 0);
    }
}

static void note_version(cql_client_t *c, const cql_bytes_t *cell) {
    if (cell->n != 16) return; /* a peer without a version yet is not voting */
    char v[33];
    for (int i = 0; i < 16; i++) snprintf(v + 2 * i, 3, "%02x", cell->p[i]);
    if (!c->agree_version) {
        c->agree_version = strdup(v);
    } else if (strcmp(c->agree_version, v) != 0) {
        c->agree_mismatch = true;
    }
}

static void on_agree_answer(const cql_result_t *res, void *data) {
    cql_client_t *c = data;
    if (res->status) {
        c->agree_status = res->status;
    } else if (res->resp && res->resp->kind == CQL_RESULT_ROWS) {
        const cql_rows_t *rows = &res->resp->rows;
        int col = cql_rows_col(rows, "schema_version");
        for (int32_t i = 0; col >= 0 && i < rows->n_rows; i++) {
            note_version(c, cql_rows_cell(rows, i, col));
        }
    }
    if (--c->agree_left == 0) agree_round_done(c);
}

/* One round: read the local and the peers' schema versions from one node. */
static void agree_start(cql_client_t *c) {
    if (c->agree_running || c->closing || !c->agree.head) return;
    c->agree_running = true;
    c->agree_status = 0;
    c->agree_mismatch = false;
    /* every change acknowledged before this round is covered by its answer */
    while (c->agree.head) rl_push(&c->agree_checking, rl_pop(&c->agree));
    static const char *const qs[2] = {
        "SELECT schema_version FROM system.local WHERE key='local'",
        "SELECT peer, schema_version FROM system.peers",
    };
    c->agree_left = 2;
    for (int i = 0; i < 2; i++) {
        cql_req_t *r = req_new(c, RK_QUERY, NULL, on_agree_answer, c);
        sbuf_t p = {0};
        if (r) {
            r->internal = true;
            r->query = strdup(qs[i]);
            cql_encode_params(&p, NULL, 0, NULL, CQL_ONE, CQL_SERIAL);
            r->params = p;
        }
        if (!r || !r->query || p.oom) {
            if (r) req_free(r);
            c->agree_status = CHAT_ENOMEM;
            if (--c->agree_left == 0) agree_round_done(c);
            continue;
        }
        deadline_add(c, r);
        dispatch(c, r);
    }
}

/* ---- the public calls ------------------------------------------------------------------------ */

static int parse_host(const char *spec, host_t *h) {
    const char *port = NULL;
    char *addr = NULL;
    if (spec[0] == '[') {
        const char *end = strchr(spec, ']');
        if (!end || end == spec + 1) return CHAT_EINVAL;
        addr = strndup(spec + 1, (size_t)(end - spec - 1));
        if (end[1] == ':') {
            port = end + 2;
        } else if (end[1]) {
            free(addr);
            return CHAT_EINVAL;
        }
    } else {
        const char *colon = strrchr(spec, ':');
        if (colon && strchr(spec, ':') != colon) colon = NULL; /* a bare IPv6 address */
        addr = colon ? strndup(spec, (size_t)(colon - spec)) : strdup(spec);
        if (colon) port = colon + 1;
    }
    if (!addr) return CHAT_ENOMEM;
    if (!*addr) {
        free(addr);
        return CHAT_EINVAL;
    }
    if (port) {
        char *end;
        long v = strtol(port, &end, 10);
        if (!*port || *end || v <= 0 || v > 65535) {
            free(addr);
            return CHAT_EINVAL;
        }
        snprintf(h->port, sizeof h->port, "%ld", v);
    } else {
        snprintf(h->port, sizeof h->port, "%s", DEFAULT_PORT);
    }
    h->addr = addr;
    size_t n = strlen(addr) + strlen(h->port) + 4;
    h->name = malloc(n);
    if (!h->name) return CHAT_ENOMEM;
    snprintf(h->name, n, strchr(addr, ':') ? "[%s]:%s" : "%s:%s", addr, h->port);
    return 0;
}

static void free_hosts(cql_client_t *c) {
    for (size_t i = 0; i < c->n_hosts; i++) {
        host_t *h = &c->hosts[i];
        free(h->name);
        free(h->addr);
        free(h->conns);
    }
    free(c->hosts);
}

static void free_client(cql_client_t *c) {
    free_hosts(c);
    cql_stmt_t *st = c->stmts;
    while (st) {
        cql_stmt_t *next = st->next;
        free(st->query);
        free(st);
        st = next;
    }
    free(c->keyspace);
    if (c->password) memset(c->password, 0, strlen(c->password));
    free(c->user);
    free(c->password);
    free(c);
}

int cql_client_new(cql_client_t **out, uv_loop_t *loop, const cql_client_opts_t *o) {
    *out = NULL;
    if (!loop || !o || !o->hosts || o->n_hosts == 0) return CHAT_EINVAL;
    int cl = o->consistency < 0 ? CQL_LOCAL_QUORUM : o->consistency;
    int serial = o->serial_consistency < 0 ? CQL_SERIAL : o->serial_consistency;
    if (cl > CQL_LOCAL_ONE || (serial != CQL_SERIAL && serial != CQL_LOCAL_SERIAL)) {
        return CHAT_EINVAL;
    }
    if (o->keyspace && (strlen(o->keyspace) > 48 || strchr(o->keyspace, '"'))) return CHAT_EINVAL;
    cql_client_t *c = calloc(1, sizeof *c);
    if (!c) return CHAT_ENOMEM;
    c->loop = loop;
    c->o = *o;
    c->o.hosts = NULL;
    c->o.consistency = cl;
    c->o.serial_consistency = serial;
    if (!c->o.conns_per_host) c->o.conns_per_host = 2;
    if (!c->o.max_streams) c->o.max_streams = 1024;
    if (c->o.max_streams > CQL_MAX_STREAMS - 1) c->o.max_streams = CQL_MAX_STREAMS - 1;
    if (c->o.max_streams < 2) c->o.max_streams = 2;
    if (!c->o.request_timeout_ms) c->o.request_timeout_ms = 12000;
    if (!c->o.connect_timeout_ms) c->o.connect_timeout_ms = 5000;
    if (!c->o.reconnect_min_ms) c->o.reconnect_min_ms = 100;
    if (!c->o.reconnect_max_ms) c->o.reconnect_max_ms = 5000;
    if (c->o.reconnect_max_ms < c->o.reconnect_min_ms) {
        c->o.reconnect_max_ms = c->o.reconnect_min_ms;
    }
    if (!c->o.schema_agreement_ms) c->o.schema_agreement_ms = 10000;
    c->stmts_tail = &c->stmts;
    int rc = CHAT_ENOMEM;
    if (o->keyspace && !(c->keyspace = strdup(o->keyspace))) goto fail;
    if (o->user && !(c->user = strdup(o->user))) goto fail;
    if (o->user && !(c->password = strdup(o->password ? o->password : ""))) goto fail;
    c->hosts = calloc(o->n_hosts, sizeof *c->hosts);
    if (!c->hosts) goto fail;
    c->n_hosts = o->n_hosts;
    for (size_t i = 0; i < o->n_hosts; i++) {
        host_t *h = &c->hosts[i];
        if (!o->hosts[i] || (rc = parse_host(o->hosts[i], h)) != 0) {
            if (!o->hosts[i]) rc = CHAT_EINVAL;
            goto fail;
        }
        h->c = c;
        h->conns = calloc(c->o.conns_per_host, sizeof *h->conns);
        if (!h->conns) {
            rc = CHAT_ENOMEM;
            goto fail;
        }
        h->backoff_ms = c->o.reconnect_min_ms;
    }
    /* from here on nothing fails: handles are initialized and counted */
    uv_timer_init(loop, &c->timer);
    c->timer.data = c;
    uv_timer_init(loop, &c->agree_timer);
    c->agree_timer.data = c;
    uv_check_init(loop, &c->flusher);
    c->flusher.data = c;
    uv_check_start(&c->flusher, on_check);
    uv_idle_init(loop, &c->kick);
    c->kick.data = c;
    c->handles = 4;
    for (size_t i = 0; i < c->n_hosts; i++) {
        uv_timer_init(loop, &c->hosts[i].reconnect);
        c->hosts[i].reconnect.data = &c->hosts[i];
        c->handles++;
    }
    for (size_t i = 0; i < c->n_hosts; i++) {
        for (unsigned j = 0; j < c->o.conns_per_host; j++) cc_start(c, &c->hosts[i], j);
    }
    *out = c;
    return 0;
fail:
    free_hosts(c);
    free(c->keyspace);
    free(c->user);
    free(c->password);
    free(c);
    return rc;
}

void cql_client_on_ready(cql_client_t *c, cql_cb cb, void *data) {
    c->on_ready = cb;
    c->on_ready_data = data;
    c->ready_reported = false;
}

cql_stmt_t *cql_stmt_new(cql_client_t *c, const char *query) {
    cql_stmt_t *st = calloc(1, sizeof *st);
    if (!st) return NULL;
    if (!(st->query = strdup(query))) {
        free(st);
        return NULL;
    }
    st->idx = c->n_stmts++;
    *c->stmts_tail = st;
    c->stmts_tail = &st->next;
    return st;
}

static int submit(cql_client_t *c, int kind, const char *query, cql_stmt_t *st,
                  const cql_value_t *vals, size_t n_vals, const cql_params_t *p, cql_cb cb,
                  void *data) {
    if (c->closing) return CHAT_ECLOSED;
    if (!cb) return CHAT_EINVAL;
    cql_params_t dp = CQL_PARAMS_DEFAULT;
    if (!p) p = &dp;
    int cl = p->consistency < 0 ? c->o.consistency : p->consistency;
    int serial = p->serial_consistency < 0 ? c->o.serial_consistency : p->serial_consistency;
    cql_req_t *r = req_new(c, kind, p, cb, data);
    if (!r) return CHAT_ENOMEM;
    int rc = cql_encode_params(&r->params, vals, n_vals, p, cl, serial);
    if (rc == 0 && r->params.oom) rc = CHAT_ENOMEM;
    if (rc == 0 && query && !(r->query = strdup(query))) rc = CHAT_ENOMEM;
    if (rc) {
        req_free(r);
        return rc;
    }
    r->stmt = st;
    c->stats.requests++;
    deadline_add(c, r);
    dispatch(c, r);
    return 0;
}

int cql_query(cql_client_t *c, const char *query, const cql_value_t *vals, size_t n_vals,
              const cql_params_t *p, cql_cb cb, void *data) {
    if (!query) return CHAT_EINVAL;
    return submit(c, RK_QUERY, query, NULL, vals, n_vals, p, cb, data);
}

int cql_execute(cql_client_t *c, cql_stmt_t *st, const cql_value_t *vals, size_t n_vals,
                const cql_params_t *p, cql_cb cb, void *data) {
    if (!st) return CHAT_EINVAL;
    return submit(c, RK_EXECUTE, NULL, st, vals, n_vals, p, cb, data);
}

int cql_batch(cql_client_t *c, int type, cql_stmt_t *st, const cql_value_t *vals, size_t n_per,
              size_t n_stmts, const cql_params_t *p, cql_cb cb, void *data) {
    if (c->closing) return CHAT_ECLOSED;
    if (!cb || !st || n_stmts == 0 || n_stmts > 0xffff || n_per > 0xffff ||
        type < CQL_BATCH_LOGGED || type > CQL_BATCH_COUNTER) {
        return CHAT_EINVAL;
    }
    cql_params_t dp = CQL_PARAMS_DEFAULT;
    if (!p) p = &dp;
    int cl = p->consistency < 0 ? c->o.consistency : p->consistency;
    int serial = p->serial_consistency < 0 ? c->o.serial_consistency : p->serial_consistency;
    cql_req_t *r = req_new(c, RK_BATCH, p, cb, data);
    if (!r) return CHAT_ENOMEM;
    int rc = 0;
    if (!(r->batch_off = malloc((n_stmts + 1) * sizeof *r->batch_off))) rc = CHAT_ENOMEM;
    for (size_t i = 0; rc == 0 && i < n_stmts; i++) {
        r->batch_off[i] = r->params.len;
        rc = cql__put_batch_values(&r->params, vals + i * n_per, n_per);
    }
    if (rc == 0) {
        r->batch_off[n_stmts] = r->params.len;
        rc = cql__put_batch_tail(&r->params, p, cl, serial);
    }
    if (rc == 0 && r->params.oom) rc = CHAT_ENOMEM;
    if (rc) {
        req_free(r);
        return rc;
    }
    r->stmt = st;
    r->n_batch = n_stmts;
    r->batch_type = (uint8_t)type;
    c->stats.requests++;
    deadline_add(c, r);
    dispatch(c, r);
    return 0;
}

void cql_client_stats(const cql_client_t *c, cql_client_stats_t *out) {
    *out = c->stats;
    out->conns_ready = conns_ready(c);
    out->hosts_up = 0;
    out->in_flight = 0;
    for (size_t i = 0; i < c->n_hosts; i++) {
        const host_t *h = &c->hosts[i];
        if (h->n_ready) out->hosts_up++;
        for (unsigned j = 0; j < c->o.conns_per_host; j++) {
            if (h->conns[j]) out->in_flight += h->conns[j]->load;
        }
    }
}

/* ---- close ----------------------------------------------------------------------------------- */

static void maybe_free_client(cql_client_t *c) {
    if (!c->closing || c->handles > 0 || c->n_conns > 0) return;
    void (*done)(void *) = c->done;
    void *arg = c->done_arg;
    free_client(c);
    if (done) done(arg);
}

static void on_client_handle_closed(uv_handle_t *h) {
    cql_client_t *c = h->data;
    c->handles--;
    maybe_free_client(c);
}

static void on_host_timer_closed(uv_handle_t *hd) {
    cql_client_t *c = ((host_t *)hd->data)->c;
    c->handles--;
    maybe_free_client(c);
}

void cql_client_close(cql_client_t *c, void (*done)(void *), void *arg) {
    if (c->closing) return;
    c->closing = true;
    c->done = done;
    c->done_arg = arg;
    cql_req_t *r;
    while ((r = rl_pop(&c->pending))) req_finish(r, CHAT_ECLOSED, -1, "client closed", NULL, NULL);
    while ((r = rl_pop(&c->deferred))) {
        /* a failure already decided is still the truer answer */
        int st = r->status;
        char *m = r->message;
        r->message = NULL;
        req_finish(r, st, -1, m, NULL, NULL);
        free(m);
    }
    while ((r = rl_pop(&c->agree))) req_finish(r, CHAT_ECLOSED, -1, "client closed", NULL, NULL);
    while ((r = rl_pop(&c->agree_checking))) {
        req_finish(r, CHAT_ECLOSED, -1, "client closed", NULL, NULL);
    }
    for (size_t i = 0; i < c->n_hosts; i++) {
        host_t *h = &c->hosts[i];
        for (unsigned j = 0; j < c->o.conns_per_host; j++) {
            if (h->conns[j]) cc_close(h->conns[j], CHAT_ECLOSED, "client closed");
        }
        uv_close((uv_handle_t *)&h->reconnect, on_host_timer_closed);
    }
    uv_close((uv_handle_t *)&c->timer, on_client_handle_closed);
    uv_close((uv_handle_t *)&c->agree_timer, on_client_handle_closed);
    uv_close((uv_handle_t *)&c->flusher, on_client_handle_closed);
    uv_close((uv_handle_t *)&c->kick, on_client_handle_closed);
}

void cql_run_until(uv_loop_t *loop, const bool *flag) {
    while (!*flag) {
        if (uv_run(loop, UV_RUN_ONCE) == 0 && !*flag) break;
    }
}
