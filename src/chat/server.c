/* server: the wiring of one chat server: it opens the store, search, bus and stream, hands
 * the bus's events to rooms (room.c), presence and read positions, listens, sweeps the
 * connections, and runs the graceful shutdown. The work itself lives in the files below it:
 * room.c (rooms and delivery), command.c (a command through the store), session.c (a
 * WebSocket member), routes.c (HTTP), cluster.c (the node among others), peer.c, metrics.c,
 * static.c.
 *
 * One timer sweeps every connection for keepalive instead of a timer per connection: a
 * connection costs no timer handle, and the sweep is a walk of a list a few times per
 * idle period. The same walk closes connections whose token expired (4001): 4 bytes per
 * session, no timer, no heap; a close comes at most one sweep period (<= 1 s) after exp.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "chat_internal.h"
#include "stream/stream.h"

/* ---- the loop's load ---------------------------------------------------------------- */

/* Once per loop turn, just before it polls: the time since the previous turn less what the
 * poll spent waiting is the work of one turn. A long turn delays every connection at once
 * (each waits for its events to be read and its output flushed), so this is the histogram
 * to watch when latency grows while the CPU is not full. */
static void chat__on_turn(uv_prepare_t *h) {
    chat_server_t *s = h->data;
    uint64_t now = uv_hrtime();
    uint64_t idle = uv_metrics_idle_time(s->loop);
    if (s->turn_at && now - s->turn_at >= idle - s->turn_idle)
        chat_hist_record(&s->m.loop_busy,
                         (double)((now - s->turn_at) - (idle - s->turn_idle)) / 1e9);
    s->turn_at = now;
    s->turn_idle = idle;
}

/* ---- keepalive sweep ------------------------------------------------------------------ */

#define HTTP_IDLE_MS 60000  /* an HTTP connection with nothing read nor written this long */
#define CLOSING_MAX_MS 5000 /* a closing connection whose output makes no progress this long */

static void chat__sweep(uv_timer_t *t) {
    chat_server_t *s = t->data;
    uint64_t now = uv_now(s->loop), idle = s->cfg.idle_timeout_ms;
    int64_t wall = (int64_t)time(NULL); /* token exp is wall-clock seconds */
    chat_presence_sweep(s, now);
    peer_t *p = chat_peer_first(s);
    while (p) {
        peer_t *next = chat_peer_next(s, p); /* closing never unlinks at once, but be safe */
        conn_t *c = p->conn;
        if (!c) {
            p = next;
            continue;
        }
        if (conn_is_closing(c)) {
            /* A peer that never reads our close keeps its queue: give up on it. One that
             * reads, however slowly, gets the rest (progress is the last write). */
            if (!p->closing_since) p->closing_since = now;
            else if (now -
                         (conn_last_tx(c) > p->closing_since ? conn_last_tx(c) : p->closing_since) >
                     CLOSING_MAX_MS)
                conn_abort(c);
        } else if (p->kind == PEER_WS) {
            session_t *ss = (session_t *)p;
            chat_session_expire_replayed(ss, now);
            chat_session_check_expiry(ss, wall);
            if (conn_is_closing(c)) {
                /* closed for an expired token */
            } else if (ss->flow_paused) {
                /* Not read while its echoes drain, so a ping's answer could not be seen:
                 * alive while it reads what we write. A queue that has not moved for two
                 * idle periods is a client gone (a queue drained to empty waits on the
                 * store, not on it). */
                uint64_t since = conn_last_tx(c) > ss->paused_at ? conn_last_tx(c) : ss->paused_at;
                if (conn_queued(c) && now - since >= 2 * (uint64_t)idle) {
                    log_info("write_timeout user=%s queued=%zu", LOG_STR(ss->user), conn_queued(c));
                    chat_session_close(ss, WS_CLOSE_GOING_AWAY, "write timeout");
                }
            } else if (ss->ping_sent && now - ss->ping_sent >= idle) {
                log_info("ping_timeout user=%s", LOG_STR(ss->user));
                chat_session_close(ss, WS_CLOSE_GOING_AWAY, "ping timeout");
            } else if (!ss->ping_sent && now - p->last_rx >= idle) {
                buf_t *ping = ws_frame_new(WS_OP_PING, "keepalive", 9);
                if (ping && conn_send_force(c, ping) == 0) ss->ping_sent = now;
                buf_unref(ping);
            }
        } else {
            chat_http_sweep((http_peer_t *)p, now, HTTP_IDLE_MS);
        }
        p = next;
    }
}

/* ---- start and stop ------------------------------------------------------------------- */

static void chat__bus_message(void *ud, const char *chat_id, const uint8_t *payload, size_t len) {
    chat_server_t *s = ud;
    if (chat_presence_bus(s, chat_id, payload, len)) return;
    room_t *r = room_find(&s->rooms, chat_id);
    if (!r || chat_read_from_bus(s, r, payload, len)) return;
    bool is_new;
    uint64_t id;
    if (!proto_peek(payload, len, &is_new, &id)) {
        log_warn("bus_bad_event chat=%s len=%zu", chat_id, len);
        return;
    }
    buf_t *frame = ws_frame_new(WS_OP_TEXT, payload, len);
    if (!frame) return;
    room_broadcast(&s->rooms, r, frame, is_new, id);
    buf_unref(frame);
}

/* The room table's hooks: a room's first member subscribes the node to the chat, its last
 * unsubscribes; members are sessions. */
static int chat__room_open(void *ud, const char *chat_id) {
    chat_server_t *s = ud;
    int rc = bus_subscribe(s->bus, chat_id);
    if (rc < 0) log_warn("bus_subscribe_failed chat=%s", chat_id);
    return rc;
}

static void chat__room_close(void *ud, const char *chat_id) {
    chat_server_t *s = ud;
    if (bus_unsubscribe(s->bus, chat_id) < 0) log_warn("bus_unsubscribe_failed chat=%s", chat_id);
}

/* A lease lost (cluster.c) with no on_fatal configured: drain (1012) to the other nodes. */
static void chat__fatal_drain(void *arg, const char *why) {
    chat_server_shutdown(arg, 1012, NULL, NULL);
}

static void chat__maybe_finish_stop(chat_server_t *s);
static void chat__peer_gone(chat_server_t *s) { chat__maybe_finish_stop(s); }

static int chat__room_deliver(room_member_t *m, chat_frames_t *f, bool is_new, uint64_t id) {
    return chat_session_deliver(chat_session_of(m), f, is_new, id);
}

static void chat__bus_state(void *ud, bool up) { chat_cluster_bus_state(ud, up); }

static void chat__bus_subscribed(void *ud, const char *chat_id) {
    chat_server_t *s = ud;
    room_t *r = room_find(&s->rooms, chat_id);
    if (!r || r->subscribed) return;
    r->subscribed = true;
    chat_presence_subscribed(s, chat_id);
    room_member_t *next;
    for (room_member_t *m = room_first(r); m; m = next) {
        next = room_member_next(r, m);
        chat_session_subscribed(chat_session_of(m));
    }
}

/* After a failed listen conn_server_init has closed the listener embedded in s->cs, and
 * libuv touches that handle again when it finishes the close, in the close phase of a loop
 * turn: s may be freed only after that phase. A prepare handle runs once per turn, before
 * the poll, so by its second run a close phase has passed; its own close callback frees s.
 * stop_step counts the runs (a server that never started has no shutdown steps). */
static void chat__failed_freed(uv_handle_t *h) { free(h->data); }

static void chat__failed_turn(uv_prepare_t *h) {
    chat_server_t *s = h->data;
    if (++s->stop_step < 2) return;
    uv_prepare_stop(h);
    uv_close((uv_handle_t *)h, chat__failed_freed);
}

int chat_server_start(chat_server_t **out, uv_loop_t *loop, const chat_config_t *cfg, char *err,
                      size_t errlen) {
    chat_server_t *s = calloc(1, sizeof(*s));
    if (!s) return CHAT_ENOMEM;
    queue_init(&s->peers);
    s->loop = loop;
    s->cfg = *cfg;
    if (!s->cfg.on_fatal) {
        s->cfg.on_fatal = chat__fatal_drain;
        s->cfg.fatal_arg = s;
    }
    s->on_peer_gone = chat__peer_gone;
    room_table_init(&s->rooms);
    s->rooms.deliver = chat__room_deliver;
    s->rooms.on_open = chat__room_open;
    s->rooms.on_close = chat__room_close;
    s->rooms.ud = s;
    if (!s->cfg.max_message_bytes) s->cfg.max_message_bytes = 65536;
    if (!s->cfg.max_outbound_bytes) s->cfg.max_outbound_bytes = 4u << 20;
    s->rooms.held_max = ROOM_HELD_MAX(s->cfg.max_outbound_bytes);
    if (!s->cfg.max_body_bytes) s->cfg.max_body_bytes = 1u << 20;
    if (!s->cfg.idle_timeout_ms) s->cfg.idle_timeout_ms = 60000;
    if (!s->cfg.replay_limit) s->cfg.replay_limit = 1000;
    if (!s->cfg.header_timeout_ms) s->cfg.header_timeout_ms = 10000;
    if (!s->cfg.max_connections) {
        /* What the open-files limit allows, less room for the store, the bus and the
         * static files: beyond it accept() fails and clients get a reset, not a 503. */
        struct rlimit rl;
        rlim_t n = getrlimit(RLIMIT_NOFILE, &rl) == 0 ? rl.rlim_cur : 1024;
        if (n == RLIM_INFINITY || n > (1u << 20)) n = 1u << 20;
        s->cfg.max_connections = n > 256 ? (size_t)n - 128 : (size_t)n / 2;
    }

    int rc = search_check(cfg->search_url, cfg->store_url, err, errlen);
    if (rc < 0) goto fail;
    if ((rc = store_open(&s->store, loop, cfg->store_url, err, errlen)) < 0) goto fail;
    if ((rc = search_open(&s->search, loop, cfg->search_url, s->store, err, errlen)) < 0)
        goto fail_store;
    bus_callbacks_t bus_cb = {chat__bus_message, chat__bus_state, chat__bus_subscribed, s};
    if ((rc = bus_open(&s->bus, loop, cfg->bus_url, &bus_cb, err, errlen)) < 0) goto fail_store;
    /* until the bus says it is up, treat it as down since now: the first "up" then reads
     * back whatever rooms missed while it connected */
    if (s->bus->ops->has_peers) s->bus_down_ms = time_now_ms();
    if ((rc = chat_cluster_lease(s, err, errlen)) < 0) goto fail_bus;
    if (cfg->kafka_brokers) {
        stream_opts_t so = {.brokers = cfg->kafka_brokers,
                            .topic = cfg->kafka_topic,
                            .outbox_max_rows = cfg->outbox_max_rows,
                            .encode = proto_put_event};
        if ((rc = stream_open(&s->stream, loop, s->store, &so, err, errlen)) < 0) goto fail_bus;
    }
    if (cfg->web_root) chat_static_load(s, cfg->web_root, "", 0);
    if (cfg->compression && !(s->zip = ws_zip_new())) {
        snprintf(err, errlen, "out of memory for the compressor");
        rc = CHAT_ENOMEM;
        goto fail_listen;
    }

    conn_server_opts_t o = {
        .host = cfg->host,
        .port = cfg->port,
        .max_outbound_bytes = s->cfg.max_outbound_bytes,
        .max_conns = s->cfg.max_connections,
        .max_conns_per_ip = s->cfg.max_connections_per_ip,
        .handler = &chat_http_handler,
        .handler_data = s,
        .tls = cfg->tls,
        .handshake_timeout_ms = s->cfg.header_timeout_ms,
    };
    if ((rc = conn_server_init(&s->cs, loop, &o)) < 0) {
        snprintf(err, errlen, "cannot listen on %s:%d (the reason is in listen_failed above)",
                 cfg->host ? cfg->host : "0.0.0.0", cfg->port);
        goto fail_listen;
    }
    uv_timer_init(loop, &s->sweep);
    s->sweep.data = s;
    uint64_t every =
        (s->cfg.idle_timeout_ms < s->cfg.header_timeout_ms ? s->cfg.idle_timeout_ms
                                                           : s->cfg.header_timeout_ms) /
        4;
    /* at most a second: a request head's deadline is then kept to within a second (a
     * sweep visits every connection, a few tens of ns each) */
    if (every < 50) every = 50;
    if (every > 1000) every = 1000;
    uv_timer_start(&s->sweep, chat__sweep, every, every);
    s->idle_metrics = uv_loop_configure(loop, UV_METRICS_IDLE_TIME) == 0;
    uv_prepare_init(loop, &s->turn);
    s->turn.data = s;
    if (s->idle_metrics) uv_prepare_start(&s->turn, chat__on_turn); /* else: no histogram */
    uv_unref((uv_handle_t *)&s->turn); /* measuring keeps no loop alive */
    uv_timer_init(loop, &s->stop_timer);
    s->stop_timer.data = s;
    chat_cluster_start(s);
    *out = s;
    return 0;

fail_listen:
    chat_static_free(s);
    ws_zip_free(s->zip);
    s->zip = NULL;
    stream_close(s->stream);
    /* nothing was submitted: no search is in flight */
    search_close(s->search);
    s->search = NULL;
    bus_close(s->bus, NULL, NULL);
    store_close(s->store, NULL, NULL);
    s->stop_step = 0;
    uv_prepare_init(loop, &s->turn);
    s->turn.data = s;
    uv_prepare_start(&s->turn, chat__failed_turn);
    return rc;
fail_bus:
    bus_close(s->bus, NULL, NULL);
fail_store:
    search_close(s->search);
    /* nothing was submitted: the store closes at once */
    store_close(s->store, NULL, NULL);
fail:
    free(s);
    return rc;
}

int chat_server_port(const chat_server_t *s) { return s->cs.port; }

/* Shutdown runs in steps, each started when the previous one finished:
 * 0 closing connections -> 1 store flushed -> 2 bus closed -> 3 handles closed -> done. */
static void chat__stop_step(void *arg);

static void chat__handle_closed(uv_handle_t *h) {
    chat_server_t *s = h->data;
    if (--s->stop_step == 100) chat__stop_step(s);
}

static void chat__stop_step(void *arg) {
    chat_server_t *s = arg;
    switch (s->stop_step) {
    case 1:
        s->stop_step = 2;
        stream_close(s->stream); /* before the store: it must not ask it for more */
        s->stream = NULL;
        store_close(s->store, chat__stop_step, s);
        return;
    case 2:
        s->stop_step = 3;
        /* the sweep (presence refresh) and the heartbeat use the bus: not after it closed */
        uv_timer_stop(&s->sweep);
        uv_timer_stop(&s->heartbeat);
        bus_close(s->bus, chat__stop_step, s);
        return;
    case 3:
        s->stop_step = 4;
        conn_server_close(&s->cs, chat__stop_step, s);
        return;
    case 4:
        s->stop_step = 104; /* four handles to close; chat__handle_closed counts down */
        uv_close((uv_handle_t *)&s->turn, chat__handle_closed);
        uv_close((uv_handle_t *)&s->sweep, chat__handle_closed);
        uv_close((uv_handle_t *)&s->stop_timer, chat__handle_closed);
        uv_close((uv_handle_t *)&s->heartbeat, chat__handle_closed);
        return;
    case 100: {
        void (*done)(void *) = s->stop_done;
        void *darg = s->stop_arg;
        /* the store closed long ago, with its last callback: no search is in flight */
        search_close(s->search);
        chat_static_free(s);
        room_table_free(&s->rooms);
        rate_table_free(s->rate);
        ws_zip_free(s->zip);
        chat_presence_free(s);
        free(s);
        if (done) done(darg);
        return;
    }
    }
}

static void chat__maybe_finish_stop(chat_server_t *s) {
    if (!s->stopping || s->stop_step != 0 || s->n_peers) return;
    uv_timer_stop(&s->stop_timer);
    s->stop_step = 1;
    chat__stop_step(s);
}

static void chat__stop_deadline(uv_timer_t *t) {
    chat_server_t *s = t->data;
    log_warn("shutdown_deadline open_connections=%zu: dropping them", s->n_peers);
    for (peer_t *p = chat_peer_first(s); p; p = chat_peer_next(s, p))
        if (p->conn) conn_abort(p->conn);
}

void chat_server_shutdown(chat_server_t *s, uint16_t close_code, void (*done)(void *), void *arg) {
    if (s->stopping) return;
    s->stopping = true;
    s->stop_code = close_code;
    s->stop_done = done;
    s->stop_arg = arg;
    conn_server_stop_listening(&s->cs);
    chat_cluster_stop(s);
    log_info("shutdown connections=%zu code=%u", s->n_peers, close_code);
    for (peer_t *p = chat_peer_first(s); p; p = chat_peer_next(s, p)) {
        if (!p->conn) continue;
        if (p->kind == PEER_WS)
            chat_session_close((session_t *)p, close_code, "server shutting down");
        else if (!((http_peer_t *)p)->http.busy) conn_close(p->conn);
        /* a busy HTTP peer closes once its answer is written (its driver drains: cfg.draining) */
    }
    uv_timer_start(&s->stop_timer, chat__stop_deadline, 5000, 0);
    chat__maybe_finish_stop(s);
}
