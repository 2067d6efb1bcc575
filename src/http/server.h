/* http/server: the HTTP/1.1 side of a connection, knowing nothing of what it serves.
 *
 * An http_conn_t sits on a conn_t (core.h) and hands each complete request to its owner's
 * on_request, one at a time and in order (pipelining): while a request waits for an
 * answer that comes later (http_conn_wait), the bytes that arrive are kept aside and parsed
 * after it (http_conn_resume). It answers "100 Continue", strips the body of an answer to
 * HEAD, answers malformed or oversized requests itself (400, 413, 431, then close), and
 * bounds its output: no request is parsed while more than half of max_outbound_bytes of
 * answers waits for the client (reading stops until the queue drains to a quarter); an
 * answer that would take the queue past max_outbound_bytes while earlier answers still wait
 * unread cuts the connection (a reset).
 *
 * Deadlines (http_conn_sweep): a request head must arrive within header_timeout_ms of its
 * first byte, and a body must keep coming at 1 KiB/s on average after a further
 * header_timeout_ms of grace, otherwise 408 and close; a connection idle (no bytes in nor
 * out) for the sweep's idle_ms is closed.
 *
 * The owner embeds the http_conn_t in its own per-connection struct and keeps that alive
 * with its own reference count, which the driver takes through ops->hold/release around
 * any call that may close the connection. Loop thread only.
 */
#ifndef CHAT_HTTP_SERVER_H
#define CHAT_HTTP_SERVER_H

#include <uv.h>

#include "http/http.h"

typedef struct http_conn http_conn_t;

typedef struct http_conn_ops {
    /* A complete request (req valid during the call only; method HTTP_HEAD as sent, its
     * answer's body is dropped by the driver). The callee answers it with
     * http_conn_respond before returning, or calls http_conn_wait and answers later
     * (http_conn_respond then http_conn_resume), or takes the connection away with
     * http_conn_detach. */
    void (*on_request)(http_conn_t *hc, const http_request_t *req);
    /* The owner's reference on the struct holding hc: the driver holds one over each call
     * that may end in on_close, so that hc outlives it. */
    void (*hold)(http_conn_t *hc);
    void (*release)(http_conn_t *hc);
    /* The connection is gone (hc->conn is NULL already); the owner drops the connection's
     * reference here. Called once, never after http_conn_detach. */
    void (*on_close)(http_conn_t *hc);
} http_conn_ops_t;

typedef struct http_conn_cfg {
    uv_loop_t *loop;           /* for uv_now() */
    size_t max_body_bytes;     /* 413 past this */
    size_t max_outbound_bytes; /* the connection's output limit (as given to conn_server) */
    uint64_t header_timeout_ms;
    uint64_t *answered;   /* incremented per answer sent; NULL: not counted */
    const bool *draining; /* the owner's flag: while true, close after every answer */
} http_conn_cfg_t;

struct http_conn {
    conn_t *conn; /* NULL once closed or detached */
    const http_conn_ops_t *ops;
    void *data; /* the owner's */
    http_conn_cfg_t cfg;
    /* private */
    http_reader_t reader;
    bool busy;            /* a request waits for its answer (http_conn_wait) */
    bool head;            /* the request being answered is a HEAD: send no body */
    bool out_paused;      /* answers pile up unread: no request is read until they drain */
    uint64_t req_started; /* uv_now() of the first byte of a request under way, 0 if none */
    uint64_t last_rx;     /* uv_now() of the last bytes received */
    sbuf_t pending;       /* bytes that arrived while busy, parsed after its answer */
};

/* Take over connection c (from its conn_handler's on_open): c's handler becomes the
 * driver's. ops and cfg are copied / borrowed (ops must outlive hc); data is the owner's.
 * The owner later frees hc's buffers with http_conn_free when its struct goes. */
void http_conn_start(http_conn_t *hc, conn_t *c, const http_conn_ops_t *ops,
                     const http_conn_cfg_t *cfg, void *data);
/* Free what hc holds (not hc itself, the owner's memory). After on_close or detach. */
void http_conn_free(http_conn_t *hc);

/* Send the answer to the current request; takes the caller's reference on resp. NULL resp
 * (out of memory) closes. keep_alive false: close once it is written. An answer to HEAD
 * loses its body here. */
void http_conn_respond(http_conn_t *hc, buf_t *resp, bool keep_alive);
/* The usual answers, through http_conn_respond: a JSON error {"error":code,"detail":..}
 * (strings borrowed); a JSON body (borrowed; a 500 if it ran out of memory); a 405 with
 * the Allow header (allow a literal like "GET, POST"). */
void http_conn_error(http_conn_t *hc, int status, const char *code, const char *detail,
                     bool keep_alive);
void http_conn_json(http_conn_t *hc, int status, const sbuf_t *body, bool keep_alive);
void http_conn_not_allowed(http_conn_t *hc, const char *allow, bool keep_alive);

/* From on_request: its answer comes later; hold requests that follow until then. */
void http_conn_wait(http_conn_t *hc);
/* The waited answer was sent (http_conn_respond): go on with the requests that arrived
 * meanwhile. */
void http_conn_resume(http_conn_t *hc);

/* From on_request: the connection leaves HTTP (an upgrade). Returns it, with the bytes
 * already received after the request's head in *rest (valid until on_request returns).
 * The caller sets the connection's new handler; hc no longer touches it and on_close will
 * not be called: the owner drops the connection's reference itself. */
conn_t *http_conn_detach(http_conn_t *hc, const uint8_t **rest, size_t *rest_len);

/* The owner's periodic sweep: 408 for a request that trickles past its deadline, close when
 * idle for idle_ms (now: uv_now()). Nothing while an answer is awaited. */
void http_conn_sweep(http_conn_t *hc, uint64_t now, uint64_t idle_ms);

#endif
