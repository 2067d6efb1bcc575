/* server: the chat server's lifecycle and shared state: connections (peers), rooms,
 * metrics, static files, the keepalive sweep, and the graceful shutdown.
 *
 * A room is the set of this node's sessions in one chat. It exists while it has members;
 * its first member subscribes the node to the chat on the bus and its last unsubscribes,
 * so the bus sees one subscription per node per chat however many clients join.
 *
 * One timer sweeps every connection for keepalive instead of a timer per connection: a
 * connection costs no timer handle, and the sweep is a walk of a list a few times per
 * idle period. The same walk closes connections whose token expired (4001): 4 bytes per
 * session, no timer, no heap; a close comes at most one sweep period (<= 1 s) after exp.
 */
#include <dirent.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>

#include "chat_internal.h"
#include "stream/stream.h"

/* ---- peers ---------------------------------------------------------------------------- */

void chat_peer_link(chat_server_t *s, peer_t *p, int kind, conn_t *c) {
    p->kind = kind;
    p->srv = s;
    p->conn = c;
    p->refs = 1;
    p->last_rx = uv_now(s->loop);
    p->prev = NULL;
    p->next = s->peers;
    if (s->peers) s->peers->prev = p;
    s->peers = p;
    s->n_peers++;
}

void chat_peer_unlink(peer_t *p) {
    chat_server_t *s = p->srv;
    if (p->prev) p->prev->next = p->next;
    else s->peers = p->next;
    if (p->next) p->next->prev = p->prev;
    p->prev = p->next = NULL;
    p->conn = NULL;
    s->n_peers--;
    chat_peer_unref(p);
    chat_maybe_finish_stop(s);
}

void chat_peer_unref(peer_t *p) {
    if (--p->refs > 0) return;
    if (p->kind == PEER_WS) {
        ws_parser_free(&((session_t *)p)->parser);
    } else {
        http_reader_free(&((http_peer_t *)p)->reader);
        sbuf_free(&((http_peer_t *)p)->pending);
    }
    free(p);
}

/* ---- metrics -------------------------------------------------------------------------- */

static const double lat_bounds[METRIC_LAT_BUCKETS] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                                       0.005,  0.01,    0.025,  0.05,  0.1,
                                                       0.25,   0.5,     1.0};

static void chat__hist_record(metric_hist_t *h, double secs) {
    h->count++;
    h->sum += secs;
    for (int i = 0; i < METRIC_LAT_BUCKETS; i++)
        if (secs <= lat_bounds[i]) {
            h->buckets[i]++;
            break;
        }
}

static void chat__hist_render(sbuf_t *sb, const char *name, const char *help,
                              const metric_hist_t *h) {
    sbuf_printf(sb, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < METRIC_LAT_BUCKETS; i++) {
        cum += h->buckets[i];
        sbuf_printf(sb, "%s_bucket{le=\"%g\"} %" PRIu64 "\n", name, lat_bounds[i], cum);
    }
    sbuf_printf(sb, "%s_bucket{le=\"+Inf\"} %" PRIu64 "\n", name, h->count);
    sbuf_printf(sb, "%s_sum %.6f\n", name, h->sum);
    sbuf_printf(sb, "%s_count %" PRIu64 "\n", name, h->count);
}

void chat_record_latency(chat_server_t *s, uint64_t t0) {
    chat__hist_record(&s->m.store_lat, (double)(uv_hrtime() - t0) / 1e9);
}

/* Once per loop turn, just before it polls: the time since the previous turn less what the
 * poll spent waiting is the work of one turn. A long turn delays every connection at once
 * (each waits for its events to be read and its output flushed), so this is the histogram
 * to watch when latency grows while the CPU is not full. */
static void chat__on_turn(uv_prepare_t *h) {
    chat_server_t *s = h->data;
    uint64_t now = uv_hrtime();
    uint64_t idle = uv_metrics_idle_time(s->loop);
    if (s->turn_at && now - s->turn_at >= idle - s->turn_idle)
        chat__hist_record(&s->m.loop_busy,
                          (double)((now - s->turn_at) - (idle - s->turn_idle)) / 1e9);
    s->turn_at = now;
    s->turn_idle = idle;
}

void chat_record_close(chat_server_t *s, uint16_t code) {
    if (code >= 1000 && code < 1000 + CLOSE_CODE_SLOTS) s->m.closes[code - 1000]++;
    else s->m.closes[CLOSE_CODE_SLOTS]++;
}

void chat_metrics_render(chat_server_t *s, sbuf_t *sb) {
    sbuf_puts(sb, "# HELP chat_connections Open WebSocket connections.\n"
                  "# TYPE chat_connections gauge\n");
    sbuf_printf(sb, "chat_connections %zu\n", s->n_sessions);
    sbuf_puts(sb, "# HELP chat_http_connections Open connections still speaking HTTP.\n"
                  "# TYPE chat_http_connections gauge\n");
    sbuf_printf(sb, "chat_http_connections %zu\n", s->n_peers - s->n_sessions);
    sbuf_puts(sb, "# HELP chat_rooms Chats with at least one member on this node.\n"
                  "# TYPE chat_rooms gauge\n");
    sbuf_printf(sb, "chat_rooms %zu\n", s->n_rooms);
    sbuf_puts(sb, "# HELP chat_websocket_opened_total WebSocket connections accepted.\n"
                  "# TYPE chat_websocket_opened_total counter\n");
    sbuf_printf(sb, "chat_websocket_opened_total %" PRIu64 "\n", s->m.ws_opened);
    sbuf_puts(sb, "# HELP chat_websocket_deflate_total WebSocket connections accepted with "
                  "permessage-deflate.\n"
                  "# TYPE chat_websocket_deflate_total counter\n");
    sbuf_printf(sb, "chat_websocket_deflate_total %" PRIu64 "\n", s->m.ws_deflate);
    sbuf_puts(sb, "# HELP chat_deflate_frames_total Frames compressed (one per event, whatever "
                  "the number of compressing members it went to).\n"
                  "# TYPE chat_deflate_frames_total counter\n");
    sbuf_printf(sb, "chat_deflate_frames_total %" PRIu64 "\n", s->m.deflate_frames);
    sbuf_puts(sb, "# HELP chat_deflate_deliveries_total Compressed frames queued to members.\n"
                  "# TYPE chat_deflate_deliveries_total counter\n");
    sbuf_printf(sb, "chat_deflate_deliveries_total %" PRIu64 "\n", s->m.deflate_out);
    sbuf_puts(sb, "# HELP chat_messages_in_total Chat events received from clients.\n"
                  "# TYPE chat_messages_in_total counter\n");
    sbuf_printf(sb, "chat_messages_in_total %" PRIu64 "\n", s->m.messages_in);
    sbuf_puts(sb, "# HELP chat_messages_out_total Event frames queued to WebSocket members.\n"
                  "# TYPE chat_messages_out_total counter\n");
    sbuf_printf(sb, "chat_messages_out_total %" PRIu64 "\n", s->m.messages_out);
    sbuf_puts(sb, "# HELP chat_http_requests_total HTTP requests answered.\n"
                  "# TYPE chat_http_requests_total counter\n");
    sbuf_printf(sb, "chat_http_requests_total %" PRIu64 "\n", s->m.http_requests);
    sbuf_puts(sb, "# HELP chat_store_errors_total Store requests that failed.\n"
                  "# TYPE chat_store_errors_total counter\n");
    sbuf_printf(sb, "chat_store_errors_total %" PRIu64 "\n", s->m.store_errors);
    sbuf_puts(sb, "# HELP chat_rate_limited_total Sends refused by --rate-limit.\n"
                  "# TYPE chat_rate_limited_total counter\n");
    sbuf_printf(sb, "chat_rate_limited_total %" PRIu64 "\n", s->m.rate_limited);
    chat__hist_render(sb, "chat_store_latency_seconds",
                      "Time from store submit to completion.", &s->m.store_lat);
    store_metrics(s->store, sb);
    if (s->stream) stream_metrics(s->stream, sb);
    if (s->idle_metrics) {
        chat__hist_render(sb, "chat_loop_turn_seconds",
                          "Work of each event loop turn, its wait for events excluded.",
                          &s->m.loop_busy);
        sbuf_puts(sb, "# HELP chat_loop_idle_seconds_total Time the event loop waited for "
                      "events (busy = elapsed - idle).\n"
                      "# TYPE chat_loop_idle_seconds_total counter\n");
        sbuf_printf(sb, "chat_loop_idle_seconds_total %.6f\n",
                    (double)uv_metrics_idle_time(s->loop) / 1e9);
    }
    sbuf_puts(sb, "# HELP chat_ws_closes_total WebSocket connections closed, by close code "
                  "(1006: dropped without a close frame).\n"
                  "# TYPE chat_ws_closes_total counter\n");
    for (int i = 0; i < CLOSE_CODE_SLOTS; i++)
        if (s->m.closes[i])
            sbuf_printf(sb, "chat_ws_closes_total{code=\"%d\"} %" PRIu64 "\n", 1000 + i,
                        s->m.closes[i]);
    if (s->m.closes[CLOSE_CODE_SLOTS])
        sbuf_printf(sb, "chat_ws_closes_total{code=\"other\"} %" PRIu64 "\n",
                    s->m.closes[CLOSE_CODE_SLOTS]);
}

/* ---- rooms ---------------------------------------------------------------------------- */

uint32_t chat_hash(const char *s) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

room_t *chat_room_find(chat_server_t *s, const char *chat_id) {
    if (!s->rooms_cap) return NULL;
    uint32_t h = chat_hash(chat_id);
    for (room_t *r = s->rooms[h & (s->rooms_cap - 1)]; r; r = r->hnext)
        if (r->hash == h && strcmp(r->chat_id, chat_id) == 0) return r;
    return NULL;
}

static int chat__rooms_grow(chat_server_t *s) {
    size_t ncap = s->rooms_cap ? s->rooms_cap * 2 : 64;
    room_t **nt = calloc(ncap, sizeof(*nt));
    if (!nt) return CHAT_ENOMEM;
    for (size_t i = 0; i < s->rooms_cap; i++) {
        room_t *r = s->rooms[i];
        while (r) {
            room_t *next = r->hnext;
            r->hnext = nt[r->hash & (ncap - 1)];
            nt[r->hash & (ncap - 1)] = r;
            r = next;
        }
    }
    free(s->rooms);
    s->rooms = nt;
    s->rooms_cap = ncap;
    return 0;
}

int chat_room_join(chat_server_t *s, session_t *ss, const char *chat_id) {
    room_t *r = chat_room_find(s, chat_id);
    if (!r) {
        if (!s->rooms_cap || s->n_rooms + 1 > s->rooms_cap * 3 / 4)
            if (chat__rooms_grow(s) < 0) return CHAT_ENOMEM;
        r = calloc(1, sizeof(*r));
        if (!r || !(r->chat_id = strdup(chat_id))) {
            free(r);
            return CHAT_ENOMEM;
        }
        r->hash = chat_hash(chat_id);
        r->gen = ++s->room_gen;
        r->hnext = s->rooms[r->hash & (s->rooms_cap - 1)];
        s->rooms[r->hash & (s->rooms_cap - 1)] = r;
        s->n_rooms++;
        int rc = bus_subscribe(s->bus, chat_id);
        if (rc < 0) log_warn("bus_subscribe_failed chat=%s", chat_id);
        r->subscribed = rc == 1;
    }
    ss->room = r;
    ss->rprev = NULL;
    ss->rnext = r->members;
    if (r->members) r->members->rprev = ss;
    r->members = ss;
    r->n++;
    return 0;
}

void chat_room_leave(chat_server_t *s, session_t *ss) {
    room_t *r = ss->room;
    if (!r) return;
    if (ss->rprev) ss->rprev->rnext = ss->rnext;
    else r->members = ss->rnext;
    if (ss->rnext) ss->rnext->rprev = ss->rprev;
    ss->room = NULL;
    ss->rprev = ss->rnext = NULL;
    if (--r->n) return;
    room_t **pp = &s->rooms[r->hash & (s->rooms_cap - 1)];
    while (*pp != r) pp = &(*pp)->hnext;
    *pp = r->hnext;
    s->n_rooms--;
    if (bus_unsubscribe(s->bus, r->chat_id) < 0)
        log_warn("bus_unsubscribe_failed chat=%s", r->chat_id);
    chat_room_free_held(r);
    chat_room_free_filter(r);
    free(r->chat_id);
    free(r);
}

buf_t *chat_frames_pick(chat_server_t *s, chat_frames_t *f, const session_t *ss) {
    if (!ss->parser.zip) return f->plain;
    if (!f->tried) {
        f->tried = true;
        f->zipped = ws_zip_frame(s->zip, f->plain);
        if (f->zipped) s->m.deflate_frames++;
    }
    if (!f->zipped) return f->plain;
    s->m.deflate_out++;
    return f->zipped;
}

size_t chat_room_broadcast(chat_server_t *s, room_t *r, buf_t *frame, bool is_new, uint64_t id) {
    if (r->catching_up) {
        /* not admitted yet: the backlog goes first, then these through the filter */
        if (r->held_bytes + frame->len > ROOM_HELD_MAX(s->cfg.max_outbound_bytes)) {
            /* Every held event was stored before it was published, so a store read
             * started after this point sees them all: drop them and let the catch-up read
             * on past its page cap (cluster.c). What follows is held afresh. */
            log_warn("room_held_overflow chat=%s held=%zu: the catch-up reads them instead",
                     r->chat_id, r->held_bytes);
            chat_room_free_held(r);
            r->held_dropped = true;
        }
        held_event_t *h = malloc(sizeof(*h));
        if (!h) {
            r->held_dropped = true; /* the catch-up's next read covers it */
            return 0;
        }
        *h = (held_event_t){.frame = buf_ref(frame), .id = id, .is_new = is_new};
        if (r->held_tail) r->held_tail->next = h;
        else r->held = h;
        r->held_tail = h;
        r->held_bytes += frame->len;
        return 0;
    }
    if (!chat_room_admit(r, is_new, id)) return 0;
    return chat_room_deliver(s, r, frame, is_new, id);
}

size_t chat_room_deliver(chat_server_t *s, room_t *r, buf_t *frame, bool is_new, uint64_t id) {
    chat_frames_t f = {.plain = frame};
    size_t n = 0;
    for (session_t *m = r->members; m; m = m->rnext)
        if (chat_session_deliver(m, &f, is_new, id) == 0) n++;
    buf_unref(f.zipped);
    s->m.messages_out += n;
    return n;
}

/* ---- static files --------------------------------------------------------------------- */

static const char *chat__mime(const char *name) {
    const char *dot = strrchr(name, '.');
    if (!dot) return "application/octet-stream";
    static const struct { const char *ext, *type; } types[] = {
        {".html", "text/html; charset=utf-8"},
        {".js", "text/javascript; charset=utf-8"},
        {".mjs", "text/javascript; charset=utf-8"},
        {".css", "text/css; charset=utf-8"},
        {".json", "application/json"},
        {".svg", "image/svg+xml"},
        {".png", "image/png"},
        {".ico", "image/x-icon"},
        {".txt", "text/plain; charset=utf-8"},
        {".webmanifest", "application/manifest+json"},
    };
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        if (strcmp(dot, types[i].ext) == 0) return types[i].type;
    return "application/octet-stream";
}

/* The web client is small and fixed: read it once at start so serving it never touches
 * the disk from the loop. Two levels deep is all the page uses. */
static void chat__load_dir(chat_server_t *s, const char *dir, const char *prefix, int depth) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[4096], url[1024];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        snprintf(url, sizeof url, "%s/%s", prefix, e->d_name);
        struct stat st;
        if (stat(path, &st) < 0) continue;
        if (S_ISDIR(st.st_mode)) {
            if (depth < 2) chat__load_dir(s, path, url, depth + 1);
            continue;
        }
        if (!S_ISREG(st.st_mode) || st.st_size > (8 << 20)) continue;
        FILE *f = fopen(path, "rb");
        if (!f) continue;
        buf_t *b = buf_new((size_t)st.st_size);
        char *upath = NULL;
        if (b && fread(b->data, 1, (size_t)st.st_size, f) == (size_t)st.st_size &&
            (upath = strdup(url))) {
            /* a file without its path would make every lookup's strlen read NULL */
            b->len = (size_t)st.st_size;
            static_file_t *nf = realloc(s->files, sizeof(*nf) * (s->n_files + 1));
            if (nf) {
                s->files = nf;
                s->files[s->n_files++] =
                    (static_file_t){.path = upath, .type = chat__mime(e->d_name), .body = b};
                b = NULL;
                upath = NULL;
            }
        }
        if (b) log_warn("static_file_skipped path=%s", path);
        free(upath);
        buf_unref(b);
        fclose(f);
    }
    closedir(d);
}

static void chat__free_files(chat_server_t *s) {
    for (size_t i = 0; i < s->n_files; i++) {
        free(s->files[i].path);
        buf_unref(s->files[i].body);
    }
    free(s->files);
    s->files = NULL;
    s->n_files = 0;
}

const static_file_t *chat_static_find(chat_server_t *s, const char *path, size_t n) {
    if (n == 1 && path[0] == '/') {
        path = "/index.html";
        n = strlen(path);
    }
    for (size_t i = 0; i < s->n_files; i++)
        if (strlen(s->files[i].path) == n && memcmp(s->files[i].path, path, n) == 0)
            return &s->files[i];
    return NULL;
}

/* ---- keepalive sweep ------------------------------------------------------------------ */

#define HTTP_IDLE_MS 60000 /* an HTTP connection with nothing read nor written this long */
#define CLOSING_MAX_MS 5000 /* a closing connection whose output makes no progress this long */

static void chat__sweep(uv_timer_t *t) {
    chat_server_t *s = t->data;
    uint64_t now = uv_now(s->loop), idle = s->cfg.idle_timeout_ms;
    int64_t wall = (int64_t)time(NULL); /* token exp is wall-clock seconds */
    chat_presence_sweep(s, now);
    peer_t *p = s->peers;
    while (p) {
        peer_t *next = p->next; /* closing below never unlinks synchronously, but be safe */
        conn_t *c = p->conn;
        if (!c) {
            p = next;
            continue;
        }
        if (conn_is_closing(c)) {
            /* A peer that never reads our close keeps its queue: give up on it. One that
             * reads, however slowly, gets the rest (progress is the last write). */
            if (!p->closing_since) p->closing_since = now;
            else if (now - (c->last_tx > p->closing_since ? c->last_tx : p->closing_since) >
                     CLOSING_MAX_MS)
                conn_abort(c);
        } else if (p->kind == PEER_WS) {
            session_t *ss = (session_t *)p;
            chat_session_expire_replayed(ss, now);
            chat_session_check_expiry(ss, wall);
            if (conn_is_closing(c)) {
                /* closed for an expired token */
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

static void chat__bus_message(void *ud, const char *chat_id, const uint8_t *payload,
                              size_t len) {
    chat_server_t *s = ud;
    if (chat_presence_bus(s, chat_id, payload, len)) return;
    room_t *r = chat_room_find(s, chat_id);
    if (!r || chat_read_from_bus(r, payload, len)) return;
    bool is_new;
    uint64_t id;
    if (!proto_peek(payload, len, &is_new, &id)) {
        log_warn("bus_bad_event chat=%s len=%zu", chat_id, len);
        return;
    }
    buf_t *frame = ws_frame_new(WS_OP_TEXT, payload, len);
    if (!frame) return;
    chat_room_broadcast(s, r, frame, is_new, id);
    buf_unref(frame);
}

static void chat__bus_state(void *ud, bool up) { chat_cluster_bus_state(ud, up); }

static void chat__bus_subscribed(void *ud, const char *chat_id) {
    chat_server_t *s = ud;
    room_t *r = chat_room_find(s, chat_id);
    if (!r || r->subscribed) return;
    r->subscribed = true;
    chat_presence_subscribed(s, chat_id);
    session_t *next;
    for (session_t *m = r->members; m; m = next) {
        next = m->rnext;
        chat_session_subscribed(m);
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

int chat_server_start(chat_server_t **out, uv_loop_t *loop, const chat_config_t *cfg,
                      char *err, size_t errlen) {
    chat_server_t *s = calloc(1, sizeof(*s));
    if (!s) return CHAT_ENOMEM;
    s->loop = loop;
    s->cfg = *cfg;
    if (!s->cfg.max_message_bytes) s->cfg.max_message_bytes = 65536;
    if (!s->cfg.max_outbound_bytes) s->cfg.max_outbound_bytes = 4u << 20;
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
        stream_opts_t so = {.brokers = cfg->kafka_brokers, .topic = cfg->kafka_topic,
                            .outbox_max_rows = cfg->outbox_max_rows, .encode = proto_put_event};
        if ((rc = stream_open(&s->stream, loop, s->store, &so, err, errlen)) < 0) goto fail_bus;
    }
    if (cfg->web_root) chat__load_dir(s, cfg->web_root, "", 0);
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
    uint64_t every = (s->cfg.idle_timeout_ms < s->cfg.header_timeout_ms
                          ? s->cfg.idle_timeout_ms
                          : s->cfg.header_timeout_ms) / 4;
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
    chat__free_files(s);
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
        chat__free_files(s);
        free(s->rooms);
        rate_table_free(s->rate);
        ws_zip_free(s->zip);
        chat_presence_free(s);
        free(s);
        if (done) done(darg);
        return;
    }
    }
}

void chat_maybe_finish_stop(chat_server_t *s) {
    if (!s->stopping || s->stop_step != 0 || s->n_peers) return;
    uv_timer_stop(&s->stop_timer);
    s->stop_step = 1;
    chat__stop_step(s);
}

static void chat__stop_deadline(uv_timer_t *t) {
    chat_server_t *s = t->data;
    log_warn("shutdown_deadline open_connections=%zu: dropping them", s->n_peers);
    for (peer_t *p = s->peers; p; p = p->next)
        if (p->conn) conn_abort(p->conn);
}

void chat_server_shutdown(chat_server_t *s, uint16_t close_code, void (*done)(void *),
                          void *arg) {
    if (s->stopping) return;
    s->stopping = true;
    s->stop_code = close_code;
    s->stop_done = done;
    s->stop_arg = arg;
    conn_server_stop_listening(&s->cs);
    chat_cluster_stop(s);
    log_info("shutdown connections=%zu code=%u", s->n_peers, close_code);
    for (peer_t *p = s->peers; p; p = p->next) {
        if (!p->conn) continue;
        if (p->kind == PEER_WS)
            chat_session_close((session_t *)p, close_code, "server shutting down");
        else if (!((http_peer_t *)p)->busy)
            conn_close(p->conn);
        /* a busy HTTP peer closes once its answer is written (routes.c checks stopping) */
    }
    uv_timer_start(&s->stop_timer, chat__stop_deadline, 5000, 0);
    chat_maybe_finish_stop(s);
}
