/* http/server: the HTTP/1.1 connection driver (server.h): requests read with
 * http_reader_t, handed to the owner one at a time, answers queued on the conn_t with
 * backpressure and deadlines. Every error it answers itself is a status with a JSON body.
 */
#include "http/server.h"

#include <stdlib.h>
#include <string.h>

#define HTTP_PENDING_MAX (1u << 20) /* bytes kept while a request waits for its answer */
#define BODY_MIN_RATE 1024          /* bytes per second a request body must keep up on average */

static const conn_handler_t http__handler;

static void http__drive(http_conn_t *hc, const uint8_t *data, size_t len);

void http_conn_start(http_conn_t *hc, conn_t *c, const http_conn_ops_t *ops,
                     const http_conn_cfg_t *cfg, void *data) {
    memset(hc, 0, sizeof(*hc));
    hc->conn = c;
    hc->ops = ops;
    hc->cfg = *cfg;
    hc->data = data;
    hc->last_rx = uv_now(cfg->loop);
    http_reader_init(&hc->reader);
    hc->reader.max_body_bytes = cfg->max_body_bytes;
    conn_set_handler(c, &http__handler, hc);
}

void http_conn_free(http_conn_t *hc) {
    http_reader_free(&hc->reader);
    sbuf_free(&hc->pending);
}

/* ---- answering ------------------------------------------------------------------------ */

/* Answers are forced past the outbound limit: they are bounded by the request limits and
 * the owner's page sizes, and the client is waiting for them. */
void http_conn_respond(http_conn_t *hc, buf_t *resp, bool keep_alive) {
    conn_t *c = hc->conn;
    if (hc->cfg.answered) (*hc->cfg.answered)++;
    if (!c || conn_is_closing(c)) {
        buf_unref(resp);
        return;
    }
    if (resp && hc->head) {
        /* HEAD: the GET answer's head, Content-Length included, without its body. */
        const char *end = memmem(resp->data, resp->len, "\r\n\r\n", 4);
        if (end) resp->len = (size_t)(end + 4 - (const char *)resp->data);
    }
    hc->head = false;
    size_t q = conn_queued(c);
    if (resp && q && q + resp->len > hc->cfg.max_outbound_bytes) {
        /* Earlier answers still wait unread: this client pipelines and does not read. */
        char peer[80];
        conn_peer(c, peer, sizeof peer);
        log_warn("slow_consumer peer=%s queued=%zu (http)", peer, q);
        buf_unref(resp);
        conn_abort(c);
        return;
    }
    if (resp) conn_send_force(c, resp);
    buf_unref(resp);
    if (!resp || !keep_alive || (hc->cfg.draining && *hc->cfg.draining)) conn_close(c);
}

void http_conn_error(http_conn_t *hc, int status, const char *code, const char *detail,
                     bool keep_alive) {
    http_conn_respond(hc, http_error_new(status, code, detail, keep_alive), keep_alive);
}

void http_conn_json(http_conn_t *hc, int status, const sbuf_t *body, bool keep_alive) {
    if (body->oom) {
        http_conn_error(hc, 500, "internal", "out of memory", false);
        return;
    }
    http_conn_respond(
        hc, http_response_new(status, "application/json", body->p, body->len, keep_alive, NULL),
        keep_alive);
}

void http_conn_not_allowed(http_conn_t *hc, const char *allow, bool keep_alive) {
    char extra[64], body[128];
    snprintf(extra, sizeof extra, "Allow: %s\r\n", allow);
    int n = snprintf(body, sizeof body,
                     "{\"error\":\"method_not_allowed\",\"detail\":\"allowed: %s\"}", allow);
    http_conn_respond(
        hc, http_response_new(405, "application/json", body, (size_t)n, keep_alive, extra),
        keep_alive);
}

void http_conn_wait(http_conn_t *hc) { hc->busy = true; }

void http_conn_resume(http_conn_t *hc) {
    hc->busy = false;
    sbuf_t pending = hc->pending;
    memset(&hc->pending, 0, sizeof(hc->pending));
    if (hc->conn && !conn_is_closing(hc->conn)) {
        http_reader_consume(&hc->reader);
        http__drive(hc, (const uint8_t *)pending.p, pending.len);
    }
    sbuf_free(&pending);
}

conn_t *http_conn_detach(http_conn_t *hc, const uint8_t **rest, size_t *rest_len) {
    conn_t *c = hc->conn;
    *rest = (const uint8_t *)http_reader_rest(&hc->reader, rest_len);
    hc->conn = NULL;
    return c;
}

/* ---- reading -------------------------------------------------------------------------- */

/* Too many answers wait unread: stop reading and parsing until they drain. */
static bool http__backlogged(http_conn_t *hc) {
    conn_t *c = hc->conn;
    size_t high = hc->cfg.max_outbound_bytes / 2;
    if (conn_queued(c) <= high) return false;
    hc->out_paused = true;
    conn_pause_read(c);
    conn_notify_drain(c, high / 2);
    return true;
}

static void http__drive(http_conn_t *hc, const uint8_t *data, size_t len) {
    http_request_t req;
    hc->ops->hold(hc);
    int rc = http_reader_feed(&hc->reader, (const char *)data, len, &req);
    while (rc == 1) {
        hc->req_started = 0;
        if (http__backlogged(hc)) break; /* the request stays in the reader */
        hc->head = req.method == HTTP_HEAD;
        hc->ops->on_request(hc, &req);
        if (!hc->conn) break; /* detached or gone */
        if (hc->busy || conn_is_closing(hc->conn)) break;
        http_reader_consume(&hc->reader);
        rc = http_reader_feed(&hc->reader, NULL, 0, &req);
    }
    bool in_body;
    size_t body_len;
    if (rc == 0 && hc->conn && !hc->req_started &&
        http_reader_partial(&hc->reader, &in_body, &body_len))
        hc->req_started = uv_now(hc->cfg.loop);
    size_t clen;
    const char *cont = rc == 0 && hc->conn && !conn_is_closing(hc->conn)
                           ? http_reader_continue(&hc->reader, &clen)
                           : NULL;
    if (cont) {
        buf_t *b = buf_from(cont, clen);
        if (b) conn_send_force(hc->conn, b);
        buf_unref(b);
    }
    if (rc < 0 && hc->conn && !conn_is_closing(hc->conn)) {
        int st = hc->reader.error_status ? hc->reader.error_status : 400;
        http_conn_error(hc, st,
                        st == 431   ? "headers_too_large"
                        : st == 413 ? "body_too_large"
                        : st >= 500 ? "internal"
                                    : "bad_request",
                        st == 431   ? "the request head is too large"
                        : st == 413 ? "the request body is too large"
                        : st >= 500 ? "out of memory"
                                    : "malformed HTTP request",
                        false);
    }
    hc->ops->release(hc);
}

static void http__on_read(conn_t *c, uint8_t *data, size_t len) {
    http_conn_t *hc = conn_ctx(c);
    hc->last_rx = uv_now(hc->cfg.loop);
    if (hc->busy || hc->out_paused) {
        sbuf_put(&hc->pending, data, len);
        if (hc->pending.oom || hc->pending.len > HTTP_PENDING_MAX) conn_abort(c);
        return;
    }
    http__drive(hc, data, len);
}

/* The answers drained: read again, starting with the request that waited in the reader. */
static void http__on_drain(conn_t *c) {
    http_conn_t *hc = conn_ctx(c);
    if (!hc->out_paused) return;
    hc->out_paused = false;
    conn_resume_read(c);
    if (hc->busy) return; /* its answer goes on with the rest (http_conn_resume) */
    sbuf_t pending = hc->pending;
    memset(&hc->pending, 0, sizeof(hc->pending));
    http__drive(hc, (const uint8_t *)pending.p, pending.len);
    sbuf_free(&pending);
}

static void http__on_close(conn_t *c) {
    http_conn_t *hc = conn_ctx(c);
    hc->conn = NULL;
    hc->ops->on_close(hc);
}

static const conn_handler_t http__handler = {
    .on_read = http__on_read,
    .on_close = http__on_close,
    .on_drain = http__on_drain,
};

void http_conn_sweep(http_conn_t *hc, uint64_t now, uint64_t idle_ms) {
    conn_t *c = hc->conn;
    if (hc->busy || !c) return;
    bool in_body;
    size_t body_len;
    if (hc->req_started && http_reader_partial(&hc->reader, &in_body, &body_len)) {
        uint64_t allowed = hc->cfg.header_timeout_ms;
        if (in_body) allowed += allowed + (uint64_t)body_len * 1000 / BODY_MIN_RATE;
        if (now - hc->req_started > allowed) {
            char peer[80];
            conn_peer(c, peer, sizeof peer);
            log_info("request_timeout peer=%s in_body=%d", peer, (int)in_body);
            http_conn_error(hc, 408, "request_timeout",
                            in_body ? "the request body arrives too slowly"
                                    : "the request head did not arrive in time",
                            false);
            return;
        }
    }
    uint64_t active = hc->last_rx > conn_last_tx(c) ? hc->last_rx : conn_last_tx(c);
    if (now - active >= idle_ms) conn_close(c);
}
