/* stream: the outbox relay (stream.h), on the loop thread.
 *
 * The one idea: the outbox is the truth about what Kafka still owes; the relay only ever
 * removes a prefix of it. Rows are read in seq order into a window, produced in that order,
 * and deleted "through seq S" only when every row up to S was acknowledged, so a crash at
 * any point leaves every unacknowledged event in the outbox, to be produced again by the
 * next run (at least once). Per-chat order: one key per chat, so one partition per chat,
 * and the idempotent producer keeps a partition's order across its retries.
 *
 * Rows reach the relay two ways. A store that offers it hands each commit's rows over on the
 * loop (store_outbox_opts_t.handoff): they wait in memory (pend) and are produced from
 * there, so the outbox is written and deleted but, as long as Kafka keeps up, never read
 * back. The outbox itself is read (STORE_OUTBOX_READ) at the start (what a previous run
 * left), on a tick without hand-offs (rows of another process sharing the store, when ours
 * cannot show them as a gap), after pend overflowed
 * (Kafka slow or away), after a failed delivery, and whenever the handed rows do not follow
 * the last row produced (a gap: rows of another process, or rows dropped): reading from the
 * last row produced until pend follows on again. The one rule that keeps the order: rows are
 * produced strictly in seq order, from a read or from pend, never both at once.
 *
 * Kafka away: librdkafka retries for ever (message.timeout.ms=0), so nothing fails; the
 * window fills, pend fills and is dropped (the rows are in the outbox), the relay stops
 * reading, and the outbox grows in the store until outbox_max_rows, where the store refuses
 * changes. A delivery that fails anyway (an error
 * Kafka will not get over by itself, e.g. a topic deleted under us) purges what is in
 * flight and produces again from the oldest unacknowledged row after a pause: consumers see
 * some events twice, the last copy of each in order; the version header orders them.
 */
#include "stream.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Events produced and not yet acknowledged. Bounds memory here and in librdkafka (whose
 * own queue limit, 100,000, it stays below) while Kafka is away; large enough for the
 * events of a few group commits (thousands each at full load) while a batch of them waits
 * for linger.ms and the broker's acknowledgement. */
#define WINDOW 32768
#define READ_MAX 1000
/* Handed-over rows waiting for room in the window. Past this many (Kafka slow or away)
 * they are dropped and read back from the outbox when there is room again: the memory a
 * long outage costs stays bounded (at about 350 bytes an event, about 6 MB). */
#define PEND_MAX 16384
/* Rows another process added, or a notify that raced a read, are found by this tick; it
 * also deletes what was acknowledged since the last one. */
#define TICK_MS 200
#define RETRY_MS 2000
/* A notify (a commit that added rows) reads after this delay, so that one read collects the
 * rows of many group commits instead of one each: measured, reading per commit cost more
 * CPU than the producing itself. It adds at most this much to the way to Kafka. */
#define READ_DELAY_MS 5
/* Acknowledged rows are deleted on the tick, or as soon as this many are: a delete is a write
 * transaction, and a crash only costs duplicates of what was acknowledged and not deleted. */
#define DELETE_EVERY 2048

enum { E_SENT, E_DONE, E_FAILED };

typedef struct entry {
    uint64_t seq;
    int64_t at;
    int state;
} entry_t;

struct stream {
    uv_loop_t *loop;
    store_t *store;
    rd_kafka_t *rk;
    rd_kafka_topic_t *rkt; /* the topic's handle, once: by name, each record looked it up */
    rd_kafka_queue_t *mainq;
    char *topic;
    int pipefd[2];
    uv_poll_t poll;
    uv_timer_t tick;
    uv_timer_t soon; /* READ_DELAY_MS after a notify */
    int handles;     /* open uv handles */

    /* the window: entries [tail, head) in seq order, at index abs % WINDOW */
    entry_t win[WINDOW];
    uint64_t head, tail;
    uint64_t read_seq;    /* the last row produced */
    uint64_t acked_seq;   /* every row through this one is acknowledged */
    uint64_t deleted_seq; /* ... and deleted */
    bool more;            /* rows may be waiting: read when there is room */
    bool failed;          /* a delivery failed: purge and start again from acked_seq */
    int64_t retry_at;     /* no reads before this (Unix ms), after a failure */

    /* handed-over rows not yet produced, in seq order, each following the one before:
     * pend[pend_head .. pend_n) */
    store_outbox_row_t *pend;
    size_t pend_head, pend_n, pend_cap;
    uint64_t read_gap; /* the first pend row when the read in flight was asked for, or 0 */
    bool handed;       /* rows were handed over since the last tick */

    store_req_t read_req, del_req;
    bool reading, deleting;
    bool closing;

    /* metrics */
    uint64_t produced, produce_errors, client_errors, restarts;
    uint64_t rows_read;
    int64_t last_err_log;
    uint64_t errors_unlogged;
    bool erring; /* errors since the last acknowledgement: say when deliveries resume */
};

static void stream__kick(stream_t *st);

/* ---- librdkafka callbacks (rd_kafka_poll, on the loop thread; log_cb on its threads) ---- */

static void stream__log(const rd_kafka_t *rk, int level, const char *fac, const char *buf) {
    (void)rk;
    /* syslog levels. Connection failures (3) also come to stream__error, which rate-limits
     * them; here only what is worse, the rest is chatter. */
    if (level <= 2) log_warn("kafka_log fac=%s msg=%s", LOG_STR(fac), LOG_STR(buf));
    else log_debug("kafka_log fac=%s msg=%s", LOG_STR(fac), LOG_STR(buf));
}

static void stream__error(rd_kafka_t *rk, int err, const char *reason, void *opaque) {
    (void)rk;
    stream_t *st = opaque;
    st->client_errors++;
    /* A broker away repeats its errors at every reconnect attempt: one line per 10 s. */
    int64_t now = time_now_ms();
    if (now - st->last_err_log >= 10000) {
        log_warn("kafka_error err=%s reason=%s suppressed=%" PRIu64, rd_kafka_err2name(err),
                 LOG_STR(reason), st->errors_unlogged);
        st->last_err_log = now;
        st->errors_unlogged = 0;
    } else {
        st->errors_unlogged++;
    }
    st->erring = true;
}

static void stream__delivered(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque) {
    (void)rk;
    stream_t *st = opaque;
    uint64_t abs = (uint64_t)(uintptr_t)m->_private;
    if (abs < st->tail || abs >= st->head) return; /* from before a restart of the window */
    entry_t *e = &st->win[abs % WINDOW];
    if (m->err) {
        if (m->err == RD_KAFKA_RESP_ERR__PURGE_QUEUE || m->err == RD_KAFKA_RESP_ERR__PURGE_INFLIGHT)
            return;
        st->produce_errors++;
        e->state = E_FAILED;
        if (!st->failed)
            log_error("kafka_delivery_failed seq=%" PRIu64 " err=%s: resending from seq=%" PRIu64,
                      e->seq, rd_kafka_err2str(m->err), st->acked_seq + 1);
        st->failed = true;
        return;
    }
    e->state = E_DONE;
    st->produced++;
    if (st->erring) {
        st->erring = false;
        log_info("kafka_delivering outbox_seq=%" PRIu64, e->seq);
    }
}

/* ---- the relay ------------------------------------------------------------------------- */

static void stream__maybe_free(stream_t *st) {
    if (!st->closing || st->reading || st->deleting || st->handles) return;
    for (size_t i = st->pend_head; i < st->pend_n; i++) {
        free(st->pend[i].chat_id);
        free(st->pend[i].event);
    }
    free(st->pend);
    free(st->topic);
    free(st);
}

static void stream__deleted(store_req_t *r) {
    stream_t *st = r->data;
    st->deleting = false;
    if (r->status == 0) st->deleted_seq = r->id;
    else
        log_warn("outbox_delete_failed through=%" PRIu64 " err=%s", r->id,
                 chat_strerror(r->status));
    store_req_cleanup(r);
    if (st->closing) {
        stream__maybe_free(st);
        return;
    }
    stream__kick(st);
}

/* Acknowledged rows leave the window in order; the outbox loses its acknowledged prefix
 * (on the tick, or when a lot was acknowledged). */
static void stream__advance(stream_t *st, bool tick) {
    while (st->tail < st->head && st->win[st->tail % WINDOW].state == E_DONE) {
        st->acked_seq = st->win[st->tail % WINDOW].seq;
        st->tail++;
    }
    if (st->failed) {
        /* Produce everything unacknowledged again, in order, after a pause. */
        rd_kafka_purge(st->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        st->tail = st->head; /* late reports of the abandoned ones are ignored */
        st->read_seq = st->acked_seq;
        st->failed = false;
        st->more = true;
        st->restarts++;
        st->retry_at = time_now_ms() + RETRY_MS;
    }
    if (!st->deleting && st->acked_seq > st->deleted_seq &&
        (tick || st->acked_seq - st->deleted_seq >= DELETE_EVERY)) {
        store_req_t *r = &st->del_req;
        memset(r, 0, sizeof *r);
        r->op = STORE_OUTBOX_DELETE;
        r->id = st->acked_seq;
        r->data = st;
        r->cb = stream__deleted;
        if (store_submit(st->store, r) == 0) st->deleting = true;
    }
}

/* Produce one row (librdkafka copies it: its message and payload are one allocation, made
 * and freed on this thread). */
static void stream__produce(stream_t *st, const store_outbox_row_t *row) {
    char version[24];
    int vlen =
        snprintf(version, sizeof version, "%" PRIu64, row->version ? row->version : row->seq);
    char mid[24];
    int mlen = snprintf(mid, sizeof mid, "%" PRIu64, row->message_id);
    rd_kafka_headers_t *h = rd_kafka_headers_new(2);
    rd_kafka_header_add(h, "version", -1, version, vlen);
    rd_kafka_header_add(h, "message_id", -1, mid, mlen);
    uint64_t abs = st->head;
    rd_kafka_resp_err_t err = rd_kafka_producev(
        st->rk, RD_KAFKA_V_RKT(st->rkt), RD_KAFKA_V_KEY(row->chat_id, strlen(row->chat_id)),
        RD_KAFKA_V_VALUE(row->event, row->event_len), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
        RD_KAFKA_V_HEADERS(h), RD_KAFKA_V_OPAQUE((void *)(uintptr_t)abs), RD_KAFKA_V_END);
    if (err) {
        /* Not queued (the headers stay ours): treat it as a failed delivery of this row. */
        rd_kafka_headers_destroy(h);
        st->produce_errors++;
        if (!st->failed)
            log_error("kafka_produce_failed seq=%" PRIu64 " err=%s", row->seq,
                      rd_kafka_err2str(err));
        st->failed = true;
        return;
    }
    entry_t *e = &st->win[abs % WINDOW];
    e->seq = row->seq;
    e->at = row->at;
    e->state = E_SENT;
    st->head++;
    st->read_seq = row->seq;
}

/* ---- pend: rows handed over by the store, waiting for room ------------------------------ */

static store_outbox_row_t *stream__pend_first(stream_t *st) {
    return st->pend_head < st->pend_n ? &st->pend[st->pend_head] : NULL;
}

static void stream__pend_pop(stream_t *st) {
    store_outbox_row_t *r = &st->pend[st->pend_head++];
    free(r->chat_id);
    free(r->event);
    if (st->pend_head == st->pend_n) st->pend_head = st->pend_n = 0;
}

/* Drop every pending row: the outbox has them, a read will find them. */
static void stream__pend_drop(stream_t *st) {
    while (stream__pend_first(st)) stream__pend_pop(st);
    st->more = true;
}

/* A copy of row at pend's end. false: no memory (pend was dropped). */
static bool stream__pend_push(stream_t *st, const store_outbox_row_t *row) {
    if (st->pend_n == st->pend_cap) {
        if (st->pend_head) { /* room at the front first */
            st->pend_n -= st->pend_head;
            memmove(st->pend, st->pend + st->pend_head, st->pend_n * sizeof *st->pend);
            st->pend_head = 0;
        } else {
            size_t ncap = st->pend_cap ? st->pend_cap * 2 : 256;
            store_outbox_row_t *p = realloc(st->pend, ncap * sizeof *p);
            if (!p) goto oom;
            st->pend = p;
            st->pend_cap = ncap;
        }
    }
    store_outbox_row_t *o = &st->pend[st->pend_n];
    *o = *row;
    o->chat_id = strdup(row->chat_id);
    o->event = malloc(row->event_len + 1);
    if (!o->chat_id || !o->event) {
        free(o->chat_id);
        free(o->event);
        goto oom;
    }
    memcpy(o->event, row->event, row->event_len + 1);
    st->pend_n++;
    return true;
oom:
    stream__pend_drop(st);
    return false;
}

/* Rows a commit just added (lent for the call): produced at once while they follow on the
 * last row produced and there is room, else kept in pend (or left to a read). */
static void stream__handoff(void *arg, const store_outbox_row_t *rows, size_t n) {
    stream_t *st = arg;
    if (st->closing) return;
    st->handed = true;
    for (size_t i = 0; i < n; i++) {
        const store_outbox_row_t *row = &rows[i];
        store_outbox_row_t *last = st->pend_n ? &st->pend[st->pend_n - 1] : NULL;
        if (row->seq <= (last ? last->seq : st->read_seq)) continue; /* read already */
        if (!last && row->seq == st->read_seq + 1 && !st->reading && !st->failed && !st->retry_at &&
            st->head - st->tail < WINDOW) {
            stream__produce(st, row); /* the common case: Kafka keeps up */
            continue;
        }
        /* A gap inside pend (rows of another process between two commits of ours), or too
         * many waiting: what pend held is read from the outbox, pend starts again here. */
        if ((last && row->seq != last->seq + 1) || st->pend_n - st->pend_head >= PEND_MAX)
            stream__pend_drop(st);
        stream__pend_push(st, row);
    }
    stream__kick(st);
}

/* ---- reading the outbox ------------------------------------------------------------------ */

static void stream__read_done(store_req_t *r) {
    stream_t *st = r->data;
    st->reading = false;
    if (st->closing) {
        store_req_cleanup(r);
        stream__maybe_free(st);
        return;
    }
    if (r->status != 0) {
        log_warn("outbox_read_failed err=%s", chat_strerror(r->status));
        st->retry_at = time_now_ms() + RETRY_MS;
        st->more = true;
    } else if (r->id != st->read_seq) {
        st->more = true; /* a restart while reading: these rows are from before it */
    } else {
        st->rows_read += r->n_rows;
        for (size_t i = 0; i < r->n_rows && !st->failed; i++) stream__produce(st, &r->rows[i]);
        bool full = r->n_rows == (size_t)r->limit;
        /* The first pend row was committed before this read began, so a complete read that
         * stopped short of it leaves nothing between: rows missing there were deleted by a
         * relay that had them acknowledged (another process sharing the store). */
        if (!full && !st->failed && st->read_gap > st->read_seq + 1)
            st->read_seq = st->read_gap - 1;
        store_outbox_row_t *p = stream__pend_first(st);
        st->more = full && !(p && p->seq <= st->read_seq + 1);
    }
    store_req_cleanup(r);
    stream__advance(st, false);
    stream__kick(st);
}

/* Produce what is there to produce, in seq order: from pend while it follows on the last row
 * produced, else (a gap, or rows pend never had) from the outbox. */
static void stream__kick(stream_t *st) {
    if (st->closing || st->reading || st->failed) return;
    if (st->retry_at && time_now_ms() < st->retry_at) return;
    st->retry_at = 0;
    store_outbox_row_t *p;
    while ((p = stream__pend_first(st)) && p->seq <= st->read_seq) stream__pend_pop(st);
    while ((p = stream__pend_first(st)) && p->seq == st->read_seq + 1 &&
           st->head - st->tail < WINDOW && !st->failed) {
        stream__produce(st, p);
        stream__pend_pop(st);
    }
    if (p && p->seq == st->read_seq + 1) return; /* the window is full: acks make room */
    if (!st->more && !p) return;
    size_t room = WINDOW - (size_t)(st->head - st->tail);
    if (room < READ_MAX / 4 && st->head != st->tail) return; /* wait for a useful amount */
    store_req_t *r = &st->read_req;
    memset(r, 0, sizeof *r);
    r->op = STORE_OUTBOX_READ;
    r->id = st->read_seq;
    r->limit = (int)(room < READ_MAX ? room : READ_MAX);
    r->data = st;
    r->cb = stream__read_done;
    st->read_gap = p ? p->seq : 0;
    st->more = false;
    if (store_submit(st->store, r) == 0) st->reading = true;
    else st->more = true;
}

static void stream__on_soon(uv_timer_t *t) { stream__kick(t->data); }

static void stream__notify(void *arg) {
    stream_t *st = arg;
    if (st->closing) return;
    st->more = true;
    if (!uv_is_active((uv_handle_t *)&st->soon))
        uv_timer_start(&st->soon, stream__on_soon, READ_DELAY_MS, 0);
}

static void stream__serve(stream_t *st, bool tick) {
    while (rd_kafka_poll(st->rk, 0) > 0) {
    }
    stream__advance(st, tick);
    stream__kick(st);
}

static void stream__on_poll(uv_poll_t *h, int status, int events) {
    (void)status;
    (void)events;
    stream_t *st = h->data;
    char buf[64];
    while (read(st->pipefd[0], buf, sizeof buf) > 0) {
    }
    stream__serve(st, false);
}

static void stream__on_tick(uv_timer_t *t) {
    stream_t *st = t->data;
    /* Rows another process sharing the store added, or a missed notify. Not while commits
     * of ours are handed over: one of another process's would show as a gap in their seqs,
     * and a read now would only race them (measured: a third of the events read back). */
    if (!st->handed) st->more = true;
    st->handed = false;
    stream__serve(st, true);
}

/* ---- open, close, metrics ---------------------------------------------------------------- */

static int stream__set(rd_kafka_conf_t *conf, const char *k, const char *v, char *err,
                       size_t errlen) {
    char why[256];
    if (rd_kafka_conf_set(conf, k, v, why, sizeof why) != RD_KAFKA_CONF_OK) {
        snprintf(err, errlen, "kafka: %s=%s: %s", k, v, why);
        return CHAT_EINVAL;
    }
    return 0;
}

int stream_open(stream_t **out, uv_loop_t *loop, store_t *store, const stream_opts_t *o, char *err,
                size_t errlen) {
    *out = NULL;
    if (!o->brokers || !*o->brokers || !o->encode) {
        snprintf(err, errlen, "kafka: no brokers");
        return CHAT_EINVAL;
    }
    stream_t *st = calloc(1, sizeof *st);
    if (!st) return CHAT_ENOMEM;
    st->loop = loop;
    st->store = store;
    st->pipefd[0] = st->pipefd[1] = -1;
    st->topic = strdup(o->topic && *o->topic ? o->topic : STREAM_DEFAULT_TOPIC);
    if (!st->topic) {
        free(st);
        return CHAT_ENOMEM;
    }
    int rc = CHAT_EINVAL;
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    /* acks=all and idempotence: a retry never duplicates or reorders within a partition;
     * no message timeout: Kafka away for an hour is a wait, never a loss. */
    if ((rc = stream__set(conf, "bootstrap.servers", o->brokers, err, errlen)) ||
        (rc = stream__set(conf, "enable.idempotence", "true", err, errlen)) ||
        (rc = stream__set(conf, "acks", "all", err, errlen)) ||
        (rc = stream__set(conf, "max.in.flight.requests.per.connection", "5", err, errlen)) ||
        (rc = stream__set(conf, "message.timeout.ms", "0", err, errlen)) ||
        /* Fewer, larger batches: the broker's work is per request more than per record,
         * and on a machine it shares with chatd that is chatd's CPU too (measured once at
         * full ingest: its CPU per event 1.3 us with 5 ms, 1.0 us with 50 ms, 0.9 us with
         * 50 ms and lz4; 20 ms is a middle not measured apart). At most 20 ms more on the
         * way to the topic. */
        (rc = stream__set(conf, "linger.ms", "20", err, errlen)) ||
        (rc = stream__set(conf, "batch.num.messages", "10000", err, errlen)) ||
        (rc = stream__set(conf, "compression.type", "lz4", err, errlen)) ||
        /* the Java clients' partitioner: any producer of ours keys a chat to one partition */
        (rc = stream__set(conf, "partitioner", "murmur2_random", err, errlen)) ||
        (rc = stream__set(conf, "reconnect.backoff.max.ms", "1000", err, errlen)) ||
        (rc = stream__set(conf, "client.id", "chatd", err, errlen))) {
        rd_kafka_conf_destroy(conf);
        goto fail;
    }
    rd_kafka_conf_set_opaque(conf, st);
    rd_kafka_conf_set_dr_msg_cb(conf, stream__delivered);
    rd_kafka_conf_set_error_cb(conf, stream__error);
    rd_kafka_conf_set_log_cb(conf, stream__log);
    char why[512];
    st->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, why, sizeof why);
    if (!st->rk) { /* conf is still ours */
        rd_kafka_conf_destroy(conf);
        snprintf(err, errlen, "kafka: %s", why);
        rc = CHAT_EIO;
        goto fail;
    }
    rc = CHAT_EIO;
    if (!(st->rkt = rd_kafka_topic_new(st->rk, st->topic, NULL))) {
        snprintf(err, errlen, "kafka: topic %s: %s", st->topic,
                 rd_kafka_err2str(rd_kafka_last_error()));
        goto fail;
    }
    if (pipe2(st->pipefd, O_NONBLOCK | O_CLOEXEC) != 0) {
        snprintf(err, errlen, "kafka: pipe: %s", strerror(errno));
        goto fail;
    }
    store_outbox_opts_t so = {.encode = o->encode,
                              .max_rows = o->outbox_max_rows,
                              .notify = stream__notify,
                              .handoff = stream__handoff,
                              .arg = st};
    if ((rc = store_outbox_enable(store, &so)) != 0) {
        snprintf(err, errlen,
                 rc == CHAT_EINVAL ? "kafka: the %s store has no outbox (use a sqlite store)"
                                   : "kafka: cannot create the %s store's outbox",
                 store->ops->name);
        goto fail;
    }
    st->mainq = rd_kafka_queue_get_main(st->rk);
    rd_kafka_queue_io_event_enable(st->mainq, st->pipefd[1], "1", 1);
    uv_poll_init(loop, &st->poll, st->pipefd[0]);
    st->poll.data = st;
    uv_poll_start(&st->poll, UV_READABLE, stream__on_poll);
    uv_timer_init(loop, &st->tick);
    st->tick.data = st;
    uv_timer_start(&st->tick, stream__on_tick, 0, TICK_MS);
    uv_timer_init(loop, &st->soon);
    st->soon.data = st;
    st->handles = 3;
    st->more = true;
    log_info("stream_opened brokers=%s topic=%s outbox_max_rows=%" PRIu64, LOG_STR(o->brokers),
             LOG_STR(st->topic), o->outbox_max_rows);
    *out = st;
    return 0;
fail:
    if (st->rkt) rd_kafka_topic_destroy(st->rkt);
    if (st->rk) rd_kafka_destroy(st->rk);
    if (st->pipefd[0] >= 0) close(st->pipefd[0]);
    if (st->pipefd[1] >= 0) close(st->pipefd[1]);
    free(st->topic);
    free(st);
    return rc;
}

static void stream__handle_closed(uv_handle_t *h) {
    stream_t *st = h->data;
    if (--st->handles == 0) {
        close(st->pipefd[0]);
        close(st->pipefd[1]);
    }
    stream__maybe_free(st);
}

void stream_close(stream_t *st) {
    if (!st || st->closing) return;
    st->closing = true;
    size_t inflight = (size_t)(st->head - st->tail);
    if (inflight)
        log_info("stream_closing unacknowledged=%zu: they stay in the outbox for the next run",
                 inflight);
    rd_kafka_queue_io_event_enable(st->mainq, -1, NULL, 0);
    rd_kafka_queue_destroy(st->mainq);
    /* Nothing waits for Kafka: what is unacknowledged is still in the outbox. */
    rd_kafka_purge(st->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
    rd_kafka_poll(st->rk, 0);
    rd_kafka_topic_destroy(st->rkt);
    rd_kafka_destroy(st->rk);
    st->rk = NULL;
    uv_close((uv_handle_t *)&st->poll, stream__handle_closed);
    uv_close((uv_handle_t *)&st->tick, stream__handle_closed);
    uv_close((uv_handle_t *)&st->soon, stream__handle_closed);
}

void stream_metrics(stream_t *st, sbuf_t *sb) {
    store_outbox_stats_t os;
    store_outbox_stats(st->store, &os);
    double age = 0;
    if (st->head > st->tail) age = (double)(time_now_ms() - st->win[st->tail % WINDOW].at) / 1e3;
    if (age < 0) age = 0;
    sbuf_printf(sb,
                "# HELP chat_outbox_depth Events stored and not yet acknowledged by Kafka "
                "(in the outbox).\n# TYPE chat_outbox_depth gauge\nchat_outbox_depth %" PRIu64 "\n",
                os.rows);
    sbuf_printf(sb,
                "# HELP chat_outbox_oldest_age_seconds Age of the oldest event in flight to "
                "Kafka (0: none).\n# TYPE chat_outbox_oldest_age_seconds gauge\n"
                "chat_outbox_oldest_age_seconds %.3f\n",
                age);
    const struct {
        const char *name, *type, *help;
        uint64_t v;
    } rows[] = {
        {"chat_outbox_written_total", "counter", "Events this node wrote to the outbox.",
         os.written},
        {"chat_outbox_refused_total", "counter",
         "Changes refused because the outbox was full (outbox_max_rows).", os.refused},
        {"chat_kafka_inflight", "gauge", "Events produced and not yet acknowledged.",
         st->head - st->tail},
        {"chat_outbox_read_total", "counter",
         "Events the relay read back from the outbox (what a previous run left, what waited "
         "while Kafka was slow or away); the others it got in memory from the store.",
         st->rows_read},
        {"chat_kafka_produced_total", "counter", "Events Kafka acknowledged.", st->produced},
        {"chat_kafka_produce_errors_total", "counter",
         "Events Kafka refused or failed to take (each is produced again).", st->produce_errors},
        {"chat_kafka_client_errors_total", "counter",
         "Errors the Kafka client reported (brokers down, ...), retried by it.", st->client_errors},
        {"chat_kafka_resends_total", "counter",
         "Times the relay produced again from the oldest unacknowledged event.", st->restarts},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
        sbuf_metric(sb, rows[i].name, rows[i].type, rows[i].help, rows[i].v);
}

/* ---- the topic (chatctl migrate) ---------------------------------------------------------- */

int stream_create_topic(const char *brokers, const char *topic, int partitions, int replication,
                        int timeout_ms, bool *created, char *err, size_t errlen) {
    if (created) *created = false;
    char why[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    if (stream__set(conf, "bootstrap.servers", brokers, err, errlen)) {
        rd_kafka_conf_destroy(conf);
        return CHAT_EINVAL;
    }
    rd_kafka_conf_set_log_cb(conf, stream__log);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, why, sizeof why);
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        snprintf(err, errlen, "kafka: %s", why);
        return CHAT_EIO;
    }
    int rc = CHAT_EIO;
    rd_kafka_NewTopic_t *nt =
        rd_kafka_NewTopic_new(topic, partitions, replication, why, sizeof why);
    rd_kafka_AdminOptions_t *ao = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_CREATETOPICS);
    rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
    rd_kafka_event_t *ev = NULL;
    if (!nt) {
        snprintf(err, errlen, "kafka: topic %s: %s", topic, why);
        rc = CHAT_EINVAL;
        goto out;
    }
    rd_kafka_AdminOptions_set_request_timeout(ao, timeout_ms, why, sizeof why);
    rd_kafka_AdminOptions_set_operation_timeout(ao, timeout_ms, why, sizeof why);
    rd_kafka_CreateTopics(rk, &nt, 1, ao, q);
    ev = rd_kafka_queue_poll(q, timeout_ms + 5000);
    if (!ev) {
        snprintf(err, errlen, "kafka %s: no answer within %d ms", brokers, timeout_ms);
        goto out;
    }
    if (rd_kafka_event_error(ev)) {
        snprintf(err, errlen, "kafka %s: %s", brokers, rd_kafka_event_error_string(ev));
        goto out;
    }
    size_t n = 0;
    const rd_kafka_topic_result_t **res =
        rd_kafka_CreateTopics_result_topics(rd_kafka_event_CreateTopics_result(ev), &n);
    rd_kafka_resp_err_t terr = n ? rd_kafka_topic_result_error(res[0]) : RD_KAFKA_RESP_ERR__FAIL;
    if (terr == RD_KAFKA_RESP_ERR_NO_ERROR || terr == RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS) {
        if (created) *created = terr == RD_KAFKA_RESP_ERR_NO_ERROR;
        rc = 0;
    } else {
        const char *msg = n ? rd_kafka_topic_result_error_string(res[0]) : NULL;
        snprintf(err, errlen, "kafka %s: topic %s: %s", brokers, topic,
                 msg ? msg : rd_kafka_err2str(terr));
    }
out:
    if (ev) rd_kafka_event_destroy(ev);
    rd_kafka_queue_destroy(q);
    rd_kafka_AdminOptions_destroy(ao);
    if (nt) rd_kafka_NewTopic_destroy(nt);
    rd_kafka_destroy(rk);
    return rc;
}
